"""Row formats, token by token against the tiny tokenizer: every token of each example is listed, the trained
ones in [brackets], so a label mask that is off by one token fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

import runtime_plans

from tunefile.compiler.render.config_yaml import dataset_plan  # noqa: E402
from tunefile.compiler.spec import DatasetSpec  # noqa: E402
from tunefile.runtime.data.errors import DataError  # noqa: E402
from tunefile.runtime.data.formats import IGNORE, Example, RowError, make_formatter  # noqa: E402
from tunefile.runtime.data.tokenizer import load_tokenizer  # noqa: E402
from tunefile.schemas.run_plan import DataPlan, DatasetPlan, ModelPlan  # noqa: E402


def dataset(type: str, **options: Any) -> DatasetPlan:
    """One dataset as the compiler writes it into the plan: the defaults of its type filled in."""
    return dataset_plan(DatasetSpec(path="rows.jsonl", type=type, **options))


def data_plan(*datasets: DatasetPlan, **changes: Any) -> DataPlan:
    return runtime_plans.data_plan(*datasets, **changes)


def model_plan(tokenizer: Path, **changes: Any) -> ModelPlan:
    return runtime_plans.model_plan(tokenizer, **changes)


def marked(tokenizer: Any, example: Example) -> list[str]:
    """The example's tokens, trained ones in brackets; also checks each label is its token or -100."""
    assert len(example.input_ids) == len(example.labels)
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (IGNORE, token)
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    return [f"[{t}]" if label != IGNORE else t for t, label in zip(tokens, example.labels, strict=True)]


def formatted(tokenizer: Any, entry: DatasetPlan, row: dict[str, Any], **data: Any) -> list[list[str]]:
    """``row`` formatted as ``entry`` in a run whose data plan has the ``data`` changes."""
    fmt = make_formatter(entry, data_plan(entry, **data), tokenizer)
    return [marked(tokenizer, example) for example in fmt(row)]


ALPACA_NO_INPUT_PROMPT = [
    "<|begin_of_text|>", "Below", "Ġis", "Ġan", "Ġinstruction", "Ġthat", "Ġdescribes", "Ġa", "Ġtask", ".",
    "ĠWrite", "Ġa", "Ġresponse", "Ġthat", "Ġappropriately", "Ġcompletes", "Ġthe", "Ġrequest", ".", "Ċ", "Ċ",
    "###", "ĠInstruction", ":", "Ċ", "Say", "Ġred", ".", "Ċ", "Ċ", "###", "ĠResponse", ":", "Ċ",
]


def test_alpaca_masks_the_prompt_and_trains_output_and_eos(tiny_tokenizer: Any) -> None:
    row = {"instruction": "Say red.", "input": "", "output": "RED"}
    assert formatted(tiny_tokenizer, dataset("alpaca"), row) == [
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
    assert formatted(tiny_tokenizer, dataset("alpaca"), row, train_on_inputs=True) == [[f"[{t}]" for t in expected]]
    masked = formatted(tiny_tokenizer, dataset("alpaca"), row, train_on_inputs=False)[0]
    assert masked == expected[:-2] + ["[3]", "[<|end_of_text|>]"]


def test_alpaca_row_without_output_is_a_row_error(tiny_tokenizer: Any) -> None:
    with pytest.raises(RowError, match="missing field 'output'"):
        formatted(tiny_tokenizer, dataset("alpaca"), {"instruction": "x"})


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
    entry = dataset("chat_template", train_on_eos=train_on_eos)
    assert formatted(tiny_tokenizer, entry, CONVERSATION) == [expected]


def test_chat_template_roles_to_train_includes_user_turns(tiny_tokenizer: Any) -> None:
    entry = dataset("chat_template", roles_to_train=["user", "assistant"], train_on_eos="turn")
    expected = chatml("<|im_end|>", "[<|im_end|>]", "[<|im_end|>]", "[<|im_end|>]",
                      user=("[Say]", "[Ġred]", "[.]"), blue_user=("[Say]", "[Ġblue]", "[.]"))
    assert formatted(tiny_tokenizer, entry, CONVERSATION) == [expected]


def test_named_llama3_template_trims_content_and_trains_eot(tiny_tokenizer: Any) -> None:
    row = {"messages": [{"role": "user", "content": "  Say red. "}, {"role": "assistant", "content": "RED"}]}
    assert formatted(tiny_tokenizer, dataset("chat_template", chat_template="llama3"), row) == [[
        "<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "Ċ", "Ċ", "Say", "Ġred", ".",
        "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "Ċ", "Ċ", "[RED]", "[<|eot_id|>]",
    ]]


def test_sharegpt_fields_and_roles_are_mapped(tiny_tokenizer: Any) -> None:
    entry = dataset("chat_template", field_messages="conversations",
                    message_property_mappings={"role": "from", "content": "value"})
    row = {"conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "RED"}]}
    assert formatted(tiny_tokenizer, entry, row) == [[
        "<|im_start|>", "user", "Ċ", "Say", "Ġred", ".", "<|im_end|>", "Ċ",
        "<|im_start|>", "assistant", "Ċ", "[RED]", "[<|im_end|>]", "Ċ",
    ]]


def test_content_that_repeats_the_header_is_located_after_it(tiny_tokenizer: Any) -> None:
    row = {"messages": [{"role": "user", "content": "Say assistant."}, {"role": "assistant", "content": "assistant"}]}
    assert formatted(tiny_tokenizer, dataset("chat_template"), row) == [[
        "<|im_start|>", "user", "Ċ", "Say", "Ġassistant", ".", "<|im_end|>", "Ċ",
        "<|im_start|>", "assistant", "Ċ", "[assistant]", "[<|im_end|>]", "Ċ",
    ]]


def test_jinja_string_template_and_top_level_template(tiny_tokenizer: Any) -> None:
    jinja = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    row = {"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "RED"}]}
    expected = [["user", ":", "ĠSay", "Ġred", ".", "<|end_of_text|>", "assistant", ":", "Ġ", "RED",
                 "<|end_of_text|>"]]
    expected[0][-2:] = ["[RED]", "[<|end_of_text|>]"]
    by_dataset = formatted(tiny_tokenizer, dataset("chat_template", chat_template=jinja), row)
    by_run = formatted(tiny_tokenizer, dataset("chat_template"), row, chat_template="jinja",
                       chat_template_jinja=jinja)
    assert by_dataset == by_run == expected


def test_unknown_template_name_and_missing_tokenizer_template_are_data_errors(tiny_tokenizer: Any) -> None:
    vicuna = dataset("chat_template", chat_template="vicuna")
    with pytest.raises(DataError, match="chat_template 'vicuna' is not known"):
        make_formatter(vicuna, data_plan(vicuna, sequence_len=8), tiny_tokenizer)
    bare = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    bare.chat_template = None
    own = dataset("chat_template")
    with pytest.raises(DataError, match="has no chat template"):
        make_formatter(own, data_plan(own, sequence_len=8), bare)
    fallback = dataset("chat_template", chat_template="tokenizer_default_fallback_chatml")
    assert make_formatter(fallback, data_plan(fallback, sequence_len=64), bare)(CONVERSATION)[0].trained_tokens == 6


def test_chat_template_of_the_run_applies_unless_the_dataset_names_its_own(tiny_tokenizer: Any) -> None:
    from tunefile.runtime.data.chat import LLAMA3, dataset_chat_template

    own, named = dataset("chat_template"), dataset("chat_template", chat_template="chatml")
    run = data_plan(own, named, chat_template="llama3")
    assert dataset_chat_template(own, run, tiny_tokenizer) == LLAMA3
    assert dataset_chat_template(named, run, tiny_tokenizer) != LLAMA3
    assert dataset_chat_template(own, data_plan(own), tiny_tokenizer) == tiny_tokenizer.chat_template


def test_completion_splits_long_text_into_sequence_len_chunks(tiny_tokenizer: Any) -> None:
    row = {"text": "the quick brown fox jumps over the lazy dog."}
    assert formatted(tiny_tokenizer, dataset("completion"), row, sequence_len=4) == [
        ["[<|begin_of_text|>]", "[the]", "[Ġquick]", "[Ġbrown]"],
        ["[Ġfox]", "[Ġjumps]", "[Ġover]", "[Ġthe]"],
        ["[Ġlazy]", "[Ġdog]", "[.]", "[<|end_of_text|>]"],
    ]
    body = dataset("completion", field="body")
    chunks = make_formatter(body, data_plan(body, sequence_len=5), tiny_tokenizer)({"body": row["text"]})
    assert [len(chunk.input_ids) for chunk in chunks] == [5, 5, 2]  # 12 tokens: none dropped


def test_pretokenized_rows_keep_their_labels(tiny_tokenizer: Any) -> None:
    entry = dataset("pretokenized")
    fmt = make_formatter(entry, data_plan(entry, sequence_len=8), tiny_tokenizer)
    assert fmt({"input_ids": [5, 6, 7]}) == [Example([5, 6, 7], [5, 6, 7])]
    assert fmt({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}) == [Example([5, 6, 7], [-100, 6, 7])]
    with pytest.raises(RowError, match="labels has 1 entries"):
        fmt({"input_ids": [5, 6], "labels": [5]})


def test_load_tokenizer_adds_special_tokens_and_tokens(tiny_model_dir: Path) -> None:
    model = model_plan(tiny_model_dir, special_tokens={"pad_token": "<|pad|>", "unk_token": "<|unk|>",
                                                       "additional_special_tokens": ["<tool>"]},
                       tokens=("zebracorn",))
    tokenizer, added = load_tokenizer(model, offline=True)
    assert added == 3  # <|unk|>, <tool>, zebracorn; the pad token already existed
    assert tokenizer.unk_token == "<|unk|>"
    assert "<|im_start|>" in tokenizer.extra_special_tokens and "<tool>" in tokenizer.extra_special_tokens
    for text in ("<tool>", "zebracorn"):
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def test_load_tokenizer_names_a_missing_local_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope: no such folder"):
        load_tokenizer(model_plan(tmp_path / "nope"), offline=False)


def test_load_tokenizer_honours_tokenizer_class(tiny_model_dir: Path) -> None:
    from transformers import GPT2TokenizerFast

    automatic, _ = load_tokenizer(model_plan(tiny_model_dir), offline=True)
    named, _ = load_tokenizer(model_plan(tiny_model_dir, tokenizer_class="GPT2TokenizerFast"), offline=True)
    assert isinstance(named, GPT2TokenizerFast) and not isinstance(automatic, GPT2TokenizerFast)
    assert named("Say red.")["input_ids"] == automatic("Say red.")["input_ids"] and named.pad_token == "<|pad|>"
    for name in ("NoSuchTokenizer", "LlamaConfig"):
        with pytest.raises(DataError, match=f"tokenizer_class {name}: transformers has no tokenizer class"):
            load_tokenizer(model_plan(tiny_model_dir, tokenizer_class=name), offline=True)


def test_offline_comes_from_the_plan_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunefile.runtime.data.tokenizer import is_offline

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert is_offline(True) and not is_offline(False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert is_offline(False)


def test_formats_and_chat_import_without_a_cycle() -> None:
    """chat.py builds on examples.py only; formats.py (the registry) imports both."""
    import ast

    import tunefile.runtime.data.chat as chat
    import tunefile.runtime.data.examples as examples

    for module in (chat, examples):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "formats" not in imported, module.__name__
