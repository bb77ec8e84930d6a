"""`inference CONFIG [--lora-dir DIR | --base-only] [--prompt TEXT] [--gradio]`: talk to the trained model.

The model is what training produced (trained_model.py): the base with the adapter from output_dir, a
checkpoint or --lora-dir; a full fine-tune's output_dir; or the base alone with --base-only. Prompts are
formatted as the training data was (prompts.py). Replies stream to stdout token by token; everything else
(loading messages, warnings) goes to stderr, so `… | tee replies.txt` keeps only replies.

Prompts come from --prompt, or from stdin: one per line, each answered on its own line (a terminal shows a
"> " prompt); `--prompt -` reads all of stdin until EOF as one multi-line prompt. Lines are independent
prompts; the browser page (--gradio, chat_ui.py) keeps the conversation for chat templates.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from .config import ConfigFileError, RunConfig, load_run_config
from .data.errors import DataError
from .model import HALF, ModelLoadError
from .prompts import Message, PromptBuilder, PromptError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy, the same reply every time
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        # None switches off what the model's generation_config sets (Llama 3 ships temperature 0.6, top_p 0.9,
        # sampling on), so these flags alone decide how replies are drawn.
        if self.temperature <= 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
                    "top_k": None}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": None}


class ReplyStreamer:
    """Replies to messages, yielded as text pieces while the model generates them."""

    def __init__(self, model: Any, tokenizer: Any, prompts: PromptBuilder, sampling: Sampling) -> None:
        self.model, self.tokenizer, self.prompts, self.sampling = model, tokenizer, prompts, sampling
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured] if configured is not None else []
        self.stop_ids = list(dict.fromkeys([*configured, *prompts.stop_token_ids()]))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)

    def stream(self, message: str, history: Sequence[Message] = ()) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        input_ids = torch.tensor([self.prompts.token_ids(message, history)], device=self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        streamer=streamer, eos_token_id=self.stop_ids or None,
                                        pad_token_id=self.pad_id, **self.sampling.generate_kwargs())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                failure.append(exc)
                streamer.end()  # unblock the reader

        # generate() runs in a thread and feeds the streamer; this thread reads pieces as they are decoded.
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failure:
            raise failure[0]

    def reply(self, message: str, history: Sequence[Message] = ()) -> str:
        return "".join(self.stream(message, history))


def inference_device(cpu: bool) -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() and not cpu else torch.device("cpu")


def inference_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """The run's half precision on a GPU; fp32 on the CPU, where half-precision matmuls are slow or missing."""
    if device.type == "cuda":
        return HALF.get(cfg.resolved.get("precision"), torch.float32)
    return torch.float32


def attention_for(cfg: RunConfig, device: torch.device) -> str:
    from .attention import choose_packing_attention

    requested = cfg.resolved.get("attn_implementation") or "sdpa"
    if device.type != "cuda" and requested.startswith("flash_attention"):
        return "sdpa"
    return choose_packing_attention(None, sample_packing=False, attn_implementation=requested,
                                    device_type=device.type)[1]


def load_reply_streamer(cfg: RunConfig, *, lora_dir: str | None, base_only: bool, sampling: Sampling,
                        cpu: bool = False) -> ReplyStreamer:
    from .trained_model import load_trained_model, locate_adapter

    device = inference_device(cpu)
    adapter, base_source = None, None
    if not base_only:
        if lora_dir or cfg.get("adapter"):
            adapter = locate_adapter(Path(lora_dir) if lora_dir else cfg.output_dir)
        elif (cfg.output_dir / "config.json").is_file():
            base_source = str(cfg.output_dir)  # a full fine-tune saved the whole model there
        else:
            raise ModelLoadError(f"{cfg.output_dir}: no trained model yet (no config.json); train first "
                                 "(`tunefile train CONFIG`) or pass --base-only to talk to the base model")
    trained = load_trained_model(cfg, adapter, device=device, dtype=inference_dtype(cfg, device),
                                 attn_implementation=attention_for(cfg, device), base_source=base_source)
    prompts = PromptBuilder(cfg, trained.tokenizer)
    base = cfg["base_model"]
    what = (f"{base} + adapter {adapter.directory}" if adapter else
            f"{base_source} (fine-tuned {base})" if base_source else f"{base} (no adapter)")
    print(f"tunefile inference: {what} on {device.type}; prompts formatted as {prompts.kind} data",
          file=sys.stderr)
    return ReplyStreamer(trained.model, trained.tokenizer, prompts, sampling)

def prompts_from(prompt: str | None, stdin: TextIO) -> Iterable[str]:
    """--prompt TEXT; `--prompt -`: all of stdin as one prompt; no --prompt: one prompt per stdin line."""
    if prompt == "-":
        yield stdin.read()
        return
    if prompt is not None:
        yield prompt
        return
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def answer(chat: ReplyStreamer, prompts: Iterable[str], out: TextIO) -> int:
    """Stream a reply to each prompt, one reply per line. Exit status: 2 when a prompt was not usable (a JSON
    row of the wrong shape; reported on stderr and skipped), else 0."""
    status = 0
    for prompt in prompts:
        if not prompt.strip():
            continue
        try:
            for piece in chat.stream(prompt):
                out.write(piece)
                out.flush()  # shown as it comes, also through a pipe
        except PromptError as exc:
            print(f"tunefile inference: {exc}", file=sys.stderr)
            status = 2
            continue
        out.write("\n")
        out.flush()
    return status


def run_inference(config_path: str | Path, *, lora_dir: str | None = None, base_only: bool = False,
                  prompt: str | None = None, sampling: Sampling = Sampling(), cpu: bool = False,
                  gradio: bool = False, host: str = "127.0.0.1", port: int = 7860,
                  stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Exit status: 0, or 2 with a one-line message on stderr for a problem the user fixes."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(config_path, lora_dir=lora_dir, base_only=base_only, prompt=prompt, sampling=sampling, cpu=cpu,
                    gradio=gradio, host=host, port=port, stdin=stdin or sys.stdin, out=out or sys.stdout)
    except (ConfigFileError, DataError, ModelLoadError) as exc:
        print(f"tunefile inference: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C ends a session, also while the model loads
        print(file=sys.stderr)
        return 130


def _run(config_path: str | Path, *, lora_dir: str | None, base_only: bool, prompt: str | None, sampling: Sampling,
         cpu: bool, gradio: bool, host: str, port: int, stdin: TextIO, out: TextIO) -> int:
    cfg = load_run_config(config_path)
    if gradio:
        from .chat_ui import require_gradio

        require_gradio()  # before minutes of model loading
    chat = load_reply_streamer(cfg, lora_dir=lora_dir, base_only=base_only, sampling=sampling, cpu=cpu)
    if gradio:
        from .chat_ui import serve

        serve(chat, host=host, port=port, title=f"tunefile · {cfg['base_model']}")
        return 0
    return answer(chat, prompts_from(prompt, stdin), out)
