"""The chat_template options that reshape a conversation before it is rendered: field_thinking /
template_thinking_key (a reasoning trace, trained with its turn), drop_system_message, and the run's
chat_template_kwargs; and the prepared-data cache key, which each of them changes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from test_runtime_formats import CONVERSATION, data_plan, dataset  # noqa: E402

from tunefile.runtime.data.build import cache_key, resolve_sources  # noqa: E402
from tunefile.runtime.data.errors import DataError  # noqa: E402
from tunefile.runtime.data.formats import IGNORE, Example, RowError, make_formatter  # noqa: E402
from tunefile.runtime.prompts import PromptBuilder  # noqa: E402

# ChatML that writes a message's trace, read under the key `thinking` (as gpt-oss's template reads it), in
# <reasoning> tags before the content; LAST_TRACE writes only the last message's trace, as Qwen3 drops the traces
# of turns before the last user message.
TRACE = "{% if m['thinking'] is defined %}{{ '<reasoning>' + m['thinking'] + '</reasoning>\\n' }}{% endif %}"
THINKING = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}" + TRACE +
            "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LAST_TRACE = THINKING.replace("m['thinking'] is defined", "m['thinking'] is defined and loop.last")
# ChatML whose template writes a system prompt of its own when the conversation has none.
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nDefault.<|im_end|>\\n' }}"
                  "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                  "'<|im_end|>\\n' }}{% endfor %}")
# ChatML that opens with a variable only chat_template_kwargs supplies.
GREETING = ("{% if greeting is defined %}{{ greeting + '\\n' }}{% endif %}{% for m in messages %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def trained_runs(tokenizer: Any, example: Example) -> list[str]:
    """The text of each run of consecutive trained tokens."""
    runs: list[list[int]] = []
    previous = IGNORE
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def one_example(tokenizer: Any, entry: Any, row: dict[str, Any], **data: Any) -> tuple[str, list[str]]:
    """(the rendered text, its trained runs) of ``row`` formatted as ``entry``."""
    [example] = make_formatter(entry, data_plan(entry, **data), tokenizer)(row)
    return tokenizer.decode(example.input_ids), trained_runs(tokenizer, example)


def test_trace_moves_to_the_template_key_and_trains_with_its_turn(tiny_tokenizer: Any) -> None:
    entry = dataset("chat_template", chat_template=THINKING, field_thinking="reasoning",
                    template_thinking_key="thinking")
    row = {"messages": [
        {"role": "user", "content": "Say red.", "reasoning": "Easy."},  # a user's trace: not trained, as its turn
        {"role": "assistant", "content": "RED", "reasoning": "Red in capitals is RED."},  # quotes the content
        {"role": "user", "content": "Say blue."},  # no trace …
        {"role": "assistant", "content": "BLUE", "reasoning": None},  # … or null: the template gets none
    ]}
    text, trained = one_example(tiny_tokenizer, entry, row)
    assert text == ("<|im_start|>user\n<reasoning>Easy.</reasoning>\nSay red.<|im_end|>\n"
                    "<|im_start|>assistant\n<reasoning>Red in capitals is RED.</reasoning>\nRED<|im_end|>\n"
                    "<|im_start|>user\nSay blue.<|im_end|>\n<|im_start|>assistant\nBLUE<|im_end|>\n")
    # The trace, what the template writes around it, and the content train as one span.
    assert trained == ["<reasoning>Red in capitals is RED.</reasoning>\nRED<|im_end|>", "BLUE<|im_end|>"]
    messages = make_formatter(entry, data_plan(entry), tiny_tokenizer).conversation(row)  # type: ignore[attr-defined]
    assert [sorted(message) for message in messages] == [
        ["content", "role", "thinking"], ["content", "role", "thinking"], ["content", "role"], ["content", "role"]]


def test_trace_under_the_default_key_and_a_trace_in_content_parts(tiny_tokenizer: Any) -> None:
    entry = dataset("chat_template", chat_template=THINKING.replace("'thinking'", "'reasoning_content'"))
    assert (entry.field_thinking, entry.template_thinking_key) == ("reasoning_content", "reasoning_content")
    parts = [{"type": "text", "text": "Red."}]  # OpenAI content parts, joined as content's are
    row = {"messages": [{"role": "user", "content": "Say red."},
                        {"role": "assistant", "content": "RED", "reasoning_content": parts}]}
    assert one_example(tiny_tokenizer, entry, row)[1] == ["<reasoning>Red.</reasoning>\nRED<|im_end|>"]
    bad = {"messages": [{"role": "user", "content": "Hi", "reasoning_content": 3}]}
    with pytest.raises(RowError, match="'reasoning_content' is not text"):
        make_formatter(entry, data_plan(entry), tiny_tokenizer)(bad)


def test_a_trace_the_template_leaves_out_is_not_searched_for_elsewhere(tiny_tokenizer: Any) -> None:
    # The first answer's trace is the next user message's text: only a rendering without it shows it is absent.
    entry = dataset("chat_template", chat_template=LAST_TRACE, template_thinking_key="thinking")
    row = {"messages": [
        {"role": "user", "content": "Say red."},
        {"role": "assistant", "content": "RED", "reasoning_content": "Say blue."},
        {"role": "user", "content": "Say blue."},
        {"role": "assistant", "content": "BLUE", "reasoning_content": "Blue."},
    ]}
    text, trained = one_example(tiny_tokenizer, entry, row)
    assert text.count("<reasoning>") == 1
    assert trained == ["RED<|im_end|>", "<reasoning>Blue.</reasoning>\nBLUE<|im_end|>"]


def test_drop_system_message_leaves_out_the_leading_system_turn(tiny_tokenizer: Any) -> None:
    keep, drop = dataset("chat_template"), dataset("chat_template", drop_system_message=True)
    assert keep.drop_system_message is False
    without_system = {"messages": CONVERSATION["messages"][1:]}
    dropped = one_example(tiny_tokenizer, drop, CONVERSATION)
    assert "Be brief." in one_example(tiny_tokenizer, keep, CONVERSATION)[0]
    assert "system" not in dropped[0]
    assert dropped == one_example(tiny_tokenizer, keep, without_system)
    # A system prompt the template writes by itself stays (Axolotl: the option does not drop it) …
    own = one_example(tiny_tokenizer, replace(drop, chat_template=DEFAULT_SYSTEM), CONVERSATION)[0]
    assert own.startswith("<|im_start|>system\nDefault.<|im_end|>\n") and "Be brief." not in own
    # … and so does a system turn later in the conversation: only a leading one is dropped, as in Axolotl.
    later = {"messages": [*without_system["messages"][:2], {"role": "system", "content": "Now in blue."},
                          *without_system["messages"][2:]]}
    assert "Now in blue." in one_example(tiny_tokenizer, drop, later)[0]
    with pytest.raises(RowError, match="only a system message"):
        make_formatter(drop, data_plan(drop), tiny_tokenizer)({"messages": CONVERSATION["messages"][:1]})


def test_chat_template_kwargs_reach_the_template_in_training_and_inference(tiny_tokenizer: Any) -> None:
    entry = dataset("chat_template", chat_template=GREETING)
    row = {"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "RED"}]}
    assert one_example(tiny_tokenizer, entry, row)[0].startswith("<|im_start|>user")
    text, trained = one_example(tiny_tokenizer, entry, row, chat_template_kwargs={"greeting": "Hello there."})
    assert text.startswith("Hello there.\n<|im_start|>user") and trained == ["RED<|im_end|>"]
    prompt, _ = PromptBuilder(data_plan(entry, chat_template_kwargs={"greeting": "Hello there."}),
                              tiny_tokenizer).text("Say red.")
    assert prompt == "Hello there.\n<|im_start|>user\nSay red.<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(DataError, match="add_generation_prompt, tokenize cannot be set"):
        make_formatter(entry, data_plan(entry, chat_template_kwargs={"tokenize": True, "add_generation_prompt": 1}),
                       tiny_tokenizer)


def test_each_option_changes_the_cache_key(tmp_path: Path, tiny_tokenizer: Any) -> None:
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n', encoding="utf-8")
    chat = dataset("chat_template")
    chat = replace(chat, path=str(tmp_path / "chat.jsonl"))

    def key(entry: Any = chat, **changes: Any) -> str:
        data = data_plan(entry, **changes)
        return cache_key(data, tiny_tokenizer, resolve_sources(data.datasets, offline=True), seed=0)

    keys = [key(), key(replace(chat, field_thinking="reasoning")), key(replace(chat, template_thinking_key="thinking")),
            key(replace(chat, drop_system_message=True)), key(chat_template_kwargs={"enable_thinking": False}),
            key(chat_template_kwargs={"enable_thinking": True})]
    assert len(set(keys)) == len(keys)
    assert key(chat_template_kwargs={"enable_thinking": False}) == keys[4]  # the same options, the same cache
