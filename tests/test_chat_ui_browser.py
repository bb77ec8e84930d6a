"""`tunefile inference --gradio` in a real browser: headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) loads the page, types two messages and waits for the streamed replies, which must be the
model's greedy replies to the conversation formatted as in training. On a laptop without Chromium or Gradio
the test skips; in CI (CI=true) it fails, since .ci/run and `make install` provide them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_inference import data_plan
from test_merge_lora import compiled_config

from helpers import require_module, require_tool
from runtime_bundles import VENV_BIN, free_port, subprocess_env
from tunefile.runtime.data.chat import ChatTemplateFormat

MAX_NEW_TOKENS = 10
CHAT_DATA = {"path": "data/chat.jsonl", "type": "chat_template"}


def expected_reply(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Greedy reply computed without inference.py: training's chat rendering, plain generate and decode."""
    data = data_plan(CHAT_DATA)
    chat = ChatTemplateFormat(data.datasets[0], data, tokenizer)
    ids = torch.tensor([tokenizer(chat.render(messages, generation_prompt=True), add_special_tokens=False).input_ids])
    stops = [*model.generation_config.eos_token_id, tokenizer.eos_token_id]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def squeeze(text: str) -> str:
    """The browser shows runs of whitespace as one space and trims the ends."""
    return " ".join(text.split())


@dataclass
class ChatServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def chat_server(tmp_path: Path, tiny_model_dir: Path) -> Iterator[ChatServer]:
    """`tunefile inference --gradio` on the tiny base model. The base alone: an adapter with random weights
    replies in control characters a page does not show; the adapter path is tested in test_inference.py."""
    compiled_config(tmp_path, tiny_model_dir, adapter="lora", datasets=[CHAT_DATA])
    port, log_path = free_port(), tmp_path / "server.log"
    with log_path.open("w", encoding="utf-8") as log:
        # A session of its own, so that whatever the test leaves running can be stopped as a group.
        process = subprocess.Popen([str(VENV_BIN / "tunefile"), "inference", "cfg.yml", "--base-only", "--gradio",
                                    "--port", str(port), "--max-new-tokens", str(MAX_NEW_TOKENS)], cwd=tmp_path,
                                   env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = ChatServer(f"http://127.0.0.1:{port}/", process, log_path)
        try:
            wait_until_serving(server)
            yield server
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until_serving(server: ChatServer, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the chat server exited with {server.process.returncode}:\n{server.log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(server.url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the chat server did not answer on {server.url} within {timeout:.0f} s:\n"
                f"{server.log.read_text()[-4000:]}")


@pytest.fixture
def browser() -> Iterator[Any]:
    require_module("gradio", "pip install 'tunefile[ui]'; `make install` does")
    require_module("selenium", "pip install 'tunefile[dev]'; `make install` does")
    chromium, chromedriver = require_tool("chromium"), require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def send_and_wait_for_reply(browser: Any, message: str, reply_number: int, expected: str, screenshot: Path) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    box = WebDriverWait(browser, 30).until(lambda b: b.find_element(By.CSS_SELECTOR, "#message textarea"))
    box.send_keys(message)
    box.send_keys(Keys.ENTER)

    def replies(b: Any) -> list[str]:
        return [element.text for element in b.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")]

    try:
        WebDriverWait(browser, 30).until(lambda b: len(replies(b)) >= reply_number
                                         and squeeze(replies(b)[reply_number - 1]) == squeeze(expected))
    except TimeoutException:
        browser.save_screenshot(str(screenshot))
        pytest.fail(f"reply {reply_number} never became {expected!r}; the page shows {replies(browser)!r} "
                    f"(screenshot: {screenshot})")


def test_chat_page_streams_replies_to_a_conversation(chat_server: ChatServer, browser: Any,
                                                    tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    first = [{"role": "user", "content": "Say red."}]
    first_reply = expected_reply(model, tiny_tokenizer, first)
    follow_up = {"role": "user", "content": "Tell me a story about a cat and a dog."}
    # Gradio hands back the conversation as the page shows it, replies trimmed of surrounding whitespace.
    second = [*first, {"role": "assistant", "content": first_reply.strip()}, follow_up]
    second_reply = expected_reply(model, tiny_tokenizer, second)
    # Preconditions that make the waits below mean something: visible text, and a second reply that depends
    # on the history.
    assert squeeze(first_reply).isprintable() and squeeze(second_reply).isprintable()
    assert squeeze(first_reply) and squeeze(second_reply) != squeeze(expected_reply(model, tiny_tokenizer, [follow_up]))

    browser.get(chat_server.url)
    assert "tunefile" in browser.page_source
    send_and_wait_for_reply(browser, first[0]["content"], 1, first_reply, tmp_path / "first.png")
    # The second reply matches only if the page sent the conversation so far along with the new message.
    send_and_wait_for_reply(browser, follow_up["content"], 2, second_reply, tmp_path / "second.png")
    assert "Traceback" not in chat_server.log.read_text(encoding="utf-8")

    # A SIGTERM to `tunefile` alone, as a process supervisor sends it, stops the server process it started.
    chat_server.process.terminate()
    assert chat_server.process.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(OSError):
        urllib.request.urlopen(chat_server.url, timeout=2)
