"""Row formats, token by token against the tiny tokenizer: every token of each example is listed, the trained
ones in [brackets], so a label mask that is off by one token fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from tunefile.runtime.config import RunConfig  # noqa: E402
from tunefile.runtime.data.errors import DataError  # noqa: E402
from tunefile.runtime.data.formats import IGNORE, Example, RowError, make_formatter  # noqa: E402
from tunefile.runtime.data.tokenizer import load_tokenizer  # noqa: E402


def marked(tokenizer: Any, example: Example) -> list[str]:
    """The example's tokens, trained ones in brackets; also checks each label is its token or -100."""
    assert len(example.input_ids) == len(example.labels)
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (IGNORE, token)
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    return [f"[{t}]" if label != IGNORE else t for t, label in zip(tokens, example.labels, strict=True)]


def formatted(tokenizer: Any, entry: dict[str, Any], row: dict[str, Any], **cfg: Any) -> list[list[str]]:
    cfg.setdefault("sequence_len", 256)
    return [marked(tokenizer, example) for example in make_formatter(entry, cfg, tokenizer)(row)]


ALPACA_NO_INPUT_PROMPT = [
    "<|begin_of_text|>", "Below", "Ġis", "Ġan", "Ġinstruction", "Ġthat", "Ġdescribes", "Ġa", "Ġtask", ".",
    "ĠWrite", "Ġa", "Ġresponse", "Ġthat", "Ġappropriately", "Ġcompletes", "Ġthe", "Ġrequest", ".", "Ċ", "Ċ",
    "###", "ĠInstruction", ":", "Ċ", "Say", "Ġred", ".", "Ċ", "Ċ", "###", "ĠResponse", ":", "Ċ",
]


def test_alpaca_masks_the_prompt_and_trains_output_and_eos(tiny_tokenizer: Any) -> None:
    row = {"instruction": "Say red.", "input": "", "output": "RED"}
    assert formatted(tiny_tokenizer, {"type": "alpaca"}, row) == [
        ALPACA_NO_INPUT_PROMPT + ["[RED]", "[<|end_of_text|>]"]]


def test_alpaca_with_input_and_train_on_inputs_trains_everything(tiny_tokenizer: Any) -> None:
    row = {"instruction": "Add.", "input": "1 + 2", "output": "3"}
    expected = [
        "<|begin_of_text|>", "Below", "Ġis", "Ġan", "Ġinstruction", "Ġthat", "Ġdescribes", "Ġa", "Ġtask", ",",
        "Ġpaired", "Ġwith", "Ġan", "Ġinput", "Ġthat", "Ġprovides", "Ġfurther", "Ġcontext", ".", "ĠWrite", "Ġa",
        "Ġresponse", "Ġthat", "Ġappropriately", "Ġcompletes", "Ġthe", "Ġrequest", ".", "Ċ", "Ċ", "###",
        "ĠInstruction", ":", "Ċ", "Add", ".", "Ċ", "Ċ", "###", "ĠInput", ":", "Ċ", "1", "Ġ+", "Ġ2", "Ċ", "Ċ",
        "###", "ĠResponse", ":", "Ċ", "3", "<|end_of_text|>",
    ]
    assert formatted(tiny_tokenizer, {"type": "alpaca"}, row, train_on_inputs=True) == [[f"[{t}]" for t in expected]]
    masked = formatted(tiny_tokenizer, {"type": "alpaca"}, row, train_on_inputs=False)[0]
    assert masked == expected[:-2] + ["[3]", "[<|end_of_text|>]"]


def test_alpaca_row_without_output_is_a_row_error(tiny_tokenizer: Any) -> None:
    with pytest.raises(RowError, match="missing field 'output'"):
        formatted(tiny_tokenizer, {"type": "alpaca"}, {"instruction": "x"})


CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say red."},
    {"role": "assistant", "content": "RED"},
    {"role": "user", "content": "Say blue."},
    {"role": "assistant", "content": "BLUE"},
]}


def chatml(system_eos: str, user_eos: str, red_eos: str, blue_eos: str, user: tuple[str, str, str] | None = None,
           blue_user: tuple[str, str, str] | None = None) -> list[str]:
    """The tiny tokenizer's ChatML rendering of CONVERSATION, with the given markings of the variable parts."""
    return [
        "<|im_start|>", "system", "Ċ", "Be", "Ġbrief", ".", system_eos, "Ċ",
        "<|im_start|>", "user", "Ċ", *(user or ("Say", "Ġred", ".")), user_eos, "Ċ",
        "<|im_start|>", "assistant", "Ċ", "[RED]", red_eos, "Ċ",
        "<|im_start|>", "user", "Ċ", *(blue_user or ("Say", "Ġblue", ".")), user_eos, "Ċ",
        "<|im_start|>", "assistant", "Ċ", "[B]", "[L]", "[UE]", blue_eos, "Ċ",
    ]


@pytest.mark.parametrize(("train_on_eos", "expected"), [
    ("turn", chatml("<|im_end|>", "<|im_end|>", "[<|im_end|>]", "[<|im_end|>]")),
    ("all", chatml("[<|im_end|>]", "[<|im_end|>]", "[<|im_end|>]", "[<|im_end|>]")),
    ("last", chatml("<|im_end|>", "<|im_end|>", "<|im_end|>", "[<|im_end|>]")),
    ("none", chatml("<|im_end|>", "<|im_end|>", "<|im_end|>", "<|im_end|>")),
])
def test_chat_template_train_on_eos_modes(tiny_tokenizer: Any, train_on_eos: str, expected: list[str]) -> None:
    entry = {"type": "chat_template", "train_on_eos": train_on_eos}
    assert formatted(tiny_tokenizer, entry, CONVERSATION) == [expected]


def test_chat_template_roles_to_train_includes_user_turns(tiny_tokenizer: Any) -> None:
    entry = {"type": "chat_template", "roles_to_train": ["user", "assistant"], "train_on_eos": "turn"}
    expected = chatml("<|im_end|>", "[<|im_end|>]", "[<|im_end|>]", "[<|im_end|>]",
                      user=("[Say]", "[Ġred]", "[.]"), blue_user=("[Say]", "[Ġblue]", "[.]"))
    assert formatted(tiny_tokenizer, entry, CONVERSATION) == [expected]


def test_named_llama3_template_trims_content_and_trains_eot(tiny_tokenizer: Any) -> None:
    row = {"messages": [{"role": "user", "content": "  Say red. "}, {"role": "assistant", "content": "RED"}]}
    assert formatted(tiny_tokenizer, {"type": "chat_template", "chat_template": "llama3"}, row) == [[
        "<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "Ċ", "Ċ", "Say", "Ġred", ".",
        "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "Ċ", "Ċ", "[RED]", "[<|eot_id|>]",
    ]]


def test_sharegpt_fields_and_roles_are_mapped(tiny_tokenizer: Any) -> None:
    entry = {"type": "chat_template", "field_messages": "conversations", "message_field_role": "from",
             "message_field_content": "value"}
    row = {"conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "RED"}]}
    assert formatted(tiny_tokenizer, entry, row) == [[
        "<|im_start|>", "user", "Ċ", "Say", "Ġred", ".", "<|im_end|>", "Ċ",
        "<|im_start|>", "assistant", "Ċ", "[RED]", "[<|im_end|>]", "Ċ",
    ]]


def test_content_that_repeats_the_header_is_located_after_it(tiny_tokenizer: Any) -> None:
    row = {"messages": [{"role": "user", "content": "Say assistant."}, {"role": "assistant", "content": "assistant"}]}
    assert formatted(tiny_tokenizer, {"type": "chat_template"}, row) == [[
        "<|im_start|>", "user", "Ċ", "Say", "Ġassistant", ".", "<|im_end|>", "Ċ",
        "<|im_start|>", "assistant", "Ċ", "[assistant]", "[<|im_end|>]", "Ċ",
    ]]


def test_jinja_string_template_and_top_level_template(tiny_tokenizer: Any) -> None:
    jinja = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    row = {"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "RED"}]}
    expected = [["user", ":", "ĠSay", "Ġred", ".", "<|end_of_text|>", "assistant", ":", "Ġ", "RED",
                 "<|end_of_text|>"]]
    expected[0][-2:] = ["[RED]", "[<|end_of_text|>]"]
    by_dataset = formatted(tiny_tokenizer, {"type": "chat_template", "chat_template": jinja}, row)
    by_run = formatted(tiny_tokenizer, {"type": "chat_template"}, row, chat_template="jinja",
                       chat_template_jinja=jinja)
    assert by_dataset == by_run == expected


def test_unknown_template_name_and_missing_tokenizer_template_are_data_errors(tiny_tokenizer: Any) -> None:
    with pytest.raises(DataError, match="chat_template 'vicuna' is not known"):
        make_formatter({"type": "chat_template", "chat_template": "vicuna"}, {"sequence_len": 8}, tiny_tokenizer)
    bare = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        make_formatter({"type": "chat_template"}, {"sequence_len": 8}, bare)
    fallback = make_formatter({"type": "chat_template", "chat_template": "tokenizer_default_fallback_chatml"},
                              {"sequence_len": 64}, bare)
    assert fallback(CONVERSATION)[0].trained_tokens == 6


def test_completion_splits_long_text_into_sequence_len_chunks(tiny_tokenizer: Any) -> None:
    row = {"text": "the quick brown fox jumps over the lazy dog."}
    assert formatted(tiny_tokenizer, {"type": "completion"}, row, sequence_len=4) == [
        ["[<|begin_of_text|>]", "[the]", "[Ġquick]", "[Ġbrown]"],
        ["[Ġfox]", "[Ġjumps]", "[Ġover]", "[Ġthe]"],
        ["[Ġlazy]", "[Ġdog]", "[.]", "[<|end_of_text|>]"],
    ]
    chunks = make_formatter({"type": "completion", "field": "body"}, {"sequence_len": 5}, tiny_tokenizer)(
        {"body": row["text"]})
    assert [len(chunk.input_ids) for chunk in chunks] == [5, 5, 2]  # 12 tokens: none dropped


def test_pretokenized_rows_keep_their_labels(tiny_tokenizer: Any) -> None:
    fmt = make_formatter({"type": "pretokenized"}, {"sequence_len": 8}, tiny_tokenizer)
    assert fmt({"input_ids": [5, 6, 7]}) == [Example([5, 6, 7], [5, 6, 7])]
    assert fmt({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}) == [Example([5, 6, 7], [-100, 6, 7])]
    with pytest.raises(RowError, match="labels has 1 entries"):
        fmt({"input_ids": [5, 6], "labels": [5]})


def test_load_tokenizer_adds_special_tokens_and_tokens(tiny_model_dir: Path) -> None:
    cfg = RunConfig(values={"base_model": str(tiny_model_dir), "resolved": {},
                            "special_tokens": {"pad_token": "<|pad|>", "unk_token": "<|unk|>",
                                               "additional_special_tokens": ["<tool>"]},
                            "tokens": ["zebracorn"]}, bundle_dir=tiny_model_dir)
    tokenizer, added = load_tokenizer(cfg)
    assert added == 3  # <|unk|>, <tool>, zebracorn; the pad token already existed
    assert tokenizer.unk_token == "<|unk|>"
    assert "<|im_start|>" in tokenizer.extra_special_tokens and "<tool>" in tokenizer.extra_special_tokens
    for text in ("<tool>", "zebracorn"):
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def test_load_tokenizer_names_a_missing_local_folder(tmp_path: Path) -> None:
    cfg = RunConfig(values={"base_model": str(tmp_path / "nope"), "resolved": {}}, bundle_dir=tmp_path)
    with pytest.raises(DataError, match="nope: no such folder"):
        load_tokenizer(cfg)
