"""Four of Axolotl's data features in the runtime, against reference computations and without the compiler:
the instruction types alpaca:chat, alpaca:phi and jeopardy (the prompt text Axolotl's AlpacaPrompter builds, the
prompt masked unless train_on_inputs), exact deduplication (repeats dropped before the evaluation split),
group_by_length (Hugging Face's length-grouped order) and streamed SFT datasets (formatted, masked and packed as
the prepared path does)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import fields, replace
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

from helpers import require_module

require_module("torch", "make install")

import numpy as np  # noqa: E402
import runtime_plans  # noqa: E402

from tunefile.runtime.data import prepare_data, prepared_cache_dir  # noqa: E402
from tunefile.runtime.data.batching import collate, length_grouped, plan_batches  # noqa: E402
from tunefile.runtime.data.errors import DataError  # noqa: E402
from tunefile.runtime.data.formats import IGNORE, RowError, make_formatter  # noqa: E402
from tunefile.runtime.data.streaming import EXAMPLE_WINDOW, StreamedRows, open_stream  # noqa: E402
from tunefile.runtime.prompts import PromptBuilder  # noqa: E402
from tunefile.schemas.run_plan import DataPlan, DatasetPlan  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
CHAT_DEFAULTS = {"field_messages": "messages", "message_field_role": "role", "message_field_content": "content",
                 "roles_to_train": ("assistant",), "train_on_eos": "turn", "field_thinking": "reasoning_content",
                 "template_thinking_key": "reasoning_content", "drop_system_message": False}


def entry(path: Path | str, type: str, **options: Any) -> DatasetPlan:
    """A dataset entry as the compiler writes it: the options its type uses, None for the rest."""
    values: dict[str, Any] = {f.name: None for f in fields(DatasetPlan)}
    values.update(path=str(path), type=type, split="train")
    if type == "completion":
        values["field"] = "text"
    if type == "chat_template":
        values.update(CHAT_DEFAULTS)
    return DatasetPlan(**{**values, **options})


def data_plan(*datasets: DatasetPlan, **changes: Any) -> DataPlan:
    return runtime_plans.data_plan(*datasets, **{"skip_prepare": True, **changes})


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- alpaca:chat, alpaca:phi, jeopardy --------------------------------------------------------------------------

# The prompts Axolotl 0.19 builds (src/axolotl/prompters.py, AlpacaPrompter with prompt style chat / phi / instruct),
# written out in full so that a change to either side shows here.
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.")
NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
INSTRUCTION_ROW = {"instruction": "Add the two numbers.", "input": "25 + 49", "output": "74"}
NO_INPUT_ROW = {"instruction": "Say red.", "output": "RED"}
JEOPARDY_ROW = {"question": "This planet is the largest.", "category": "ASTRONOMY", "answer": "Jupiter"}
EXPECTED_PROMPTS = {
    ("alpaca:chat", True): f"SYSTEM: {WITH_INPUT}\nUSER: Add the two numbers.\n25 + 49\nASSISTANT:",
    ("alpaca:chat", False): f"SYSTEM: {NO_INPUT}\nUSER: Say red.\nASSISTANT:",
    ("alpaca:phi", True): f"<|system|>\n{WITH_INPUT}<|end|>\n<|user|>\nAdd the two numbers.<|end|>25 + 49<|assistant|>",
    ("alpaca:phi", False): f"<|system|>\n{NO_INPUT}<|end|>\n<|user|>\nSay red.<|end|>\n<|assistant|>\n",
    ("alpaca", True): f"{WITH_INPUT}\n\n### Instruction:\nAdd the two numbers.\n\n### Input:\n25 + 49\n\n"
                      "### Response:\n",
    ("alpaca", False): f"{NO_INPUT}\n\n### Instruction:\nSay red.\n\n### Response:\n",
    # Jeopardy: alpaca's instruct prompt over question (instruction) and category (input).
    ("jeopardy", True): f"{WITH_INPUT}\n\n### Instruction:\nThis planet is the largest.\n\n### Input:\nASTRONOMY\n\n"
                        "### Response:\n",
    ("jeopardy", False): f"{NO_INPUT}\n\n### Instruction:\nThis planet is the largest.\n\n### Response:\n",
}


def row_of(type: str, with_input: bool) -> dict[str, Any]:
    if type == "jeopardy":
        return JEOPARDY_ROW if with_input else {**JEOPARDY_ROW, "category": ""}
    return INSTRUCTION_ROW if with_input else NO_INPUT_ROW


def response_of(type: str, row: dict[str, Any]) -> str:
    return "what is " + row["answer"] if type == "jeopardy" else row["output"]


@pytest.mark.parametrize("type, with_input", sorted(EXPECTED_PROMPTS))
def test_instruction_prompt_text_is_axolotls(tiny_tokenizer: Any, type: str, with_input: bool) -> None:
    row = row_of(type, with_input)
    fmt = make_formatter(entry("rows.jsonl", type), data_plan(), tiny_tokenizer)
    (prompt, prompt_special), (response, response_special) = fmt.texts(row)[0]
    assert prompt == EXPECTED_PROMPTS[type, with_input]
    assert (response, prompt_special, response_special) == (response_of(type, row), True, False)


@pytest.mark.parametrize("type", ["alpaca:chat", "alpaca:phi", "jeopardy"])
@pytest.mark.parametrize("with_input", [True, False])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_instruction_labels_mask_the_prompt_unless_train_on_inputs(tiny_tokenizer: Any, type: str,
                                                                   with_input: bool, train_on_inputs: bool) -> None:
    row = row_of(type, with_input)
    fmt = make_formatter(entry("rows.jsonl", type), data_plan(train_on_inputs=train_on_inputs), tiny_tokenizer)
    [example] = fmt(row)
    # Reference: the prompt with the tokenizer's bos, then the response without special tokens, then eos.
    prompt = tiny_tokenizer(EXPECTED_PROMPTS[type, with_input]).input_ids
    response = tiny_tokenizer(response_of(type, row), add_special_tokens=False).input_ids
    response += [tiny_tokenizer.eos_token_id]
    assert example.input_ids == prompt + response
    assert example.labels == (prompt if train_on_inputs else [IGNORE] * len(prompt)) + response


def test_jeopardy_rows_need_their_three_columns(tiny_tokenizer: Any) -> None:
    fmt = make_formatter(entry("rows.jsonl", "jeopardy"), data_plan(), tiny_tokenizer)
    for missing in ("question", "category", "answer"):
        with pytest.raises(RowError, match=missing):
            fmt({key: value for key, value in JEOPARDY_ROW.items() if key != missing})


@pytest.mark.parametrize("type", ["alpaca:chat", "alpaca:phi", "jeopardy"])
def test_inference_prompts_are_the_training_prompts(tiny_tokenizer: Any, type: str) -> None:
    builder = PromptBuilder(data_plan(entry("rows.jsonl", type)), tiny_tokenizer)
    fmt = make_formatter(entry("rows.jsonl", type), data_plan(), tiny_tokenizer)
    for with_input in (True, False):
        row = row_of(type, with_input)
        [example] = fmt(row)
        prompt_part = example.input_ids[:example.labels.index(next(x for x in example.labels if x != IGNORE))]
        assert builder.token_ids(json.dumps(row)) == prompt_part  # a line of the training file
    # Plain text is the instruction (the question), with no input.
    plain = "Say red." if type != "jeopardy" else JEOPARDY_ROW["question"]
    assert builder.text(plain) == (EXPECTED_PROMPTS[type, False], True)


# --- exact deduplication ----------------------------------------------------------------------------------------

def duplicated_rows(tmp_path: Path) -> tuple[Path, int]:
    """64 alpaca rows with repeats: exact copies, a copy with an extra column (the same tokens), and rows that
    differ only in their output (not repeats). Returns the file and how many distinct examples it holds."""
    base = [json.loads(line) for line in (EXAMPLES / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [*base[:40], *base[:10], {**base[3], "source": "elsewhere"}, {**base[4], "output": "a different answer"}]
    return write_rows(tmp_path / "dup.jsonl", rows), 41


def examples_of(dataset: Any) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(dataset[i]["input_ids"].tolist()), tuple(dataset[i]["labels"].tolist()))
            for i in range(len(dataset))]


def test_exact_deduplication_keeps_each_example_once(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path, distinct = duplicated_rows(tmp_path)
    plan = data_plan(entry(path, "alpaca"))
    everything = prepare_data(plan, tiny_tokenizer, seed=3, offline=True)
    deduplicated = prepare_data(replace(plan, exact_deduplication=True), tiny_tokenizer, seed=3, offline=True)
    kept = examples_of(deduplicated.train)
    assert len(examples_of(everything.train)) == 52 and len(kept) == len(set(kept)) == distinct
    assert set(kept) == set(examples_of(everything.train))
    # The first occurrence stays: the kept examples are the distinct ones in the order they were first read.
    assert kept == list(dict.fromkeys(examples_of(everything.train)))
    assert deduplicated.stats["dropped"] == {"duplicate": 11} and deduplicated.stats["duplicate_examples"] == 11


def test_deduplication_comes_before_the_evaluation_split(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path, distinct = duplicated_rows(tmp_path)
    plan = data_plan(entry(path, "alpaca"), val_set_size=0.25)
    plain = prepare_data(plan, tiny_tokenizer, seed=3, offline=True)
    # Without deduplication this seed holds out copies of training rows (the leak deduplication prevents) …
    assert set(examples_of(plain.train)) & set(examples_of(plain.eval))
    data = prepare_data(replace(plan, exact_deduplication=True), tiny_tokenizer, seed=3, offline=True)
    train, evaluation = examples_of(data.train), examples_of(data.eval)
    # … with it, no example is in both splits or twice in one, and together they hold every distinct example.
    assert not set(train) & set(evaluation)
    assert len(train) + len(evaluation) == len(set(train) | set(evaluation)) == distinct


def test_the_cache_key_covers_deduplication_but_not_group_by_length(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path, _ = duplicated_rows(tmp_path)
    plan = data_plan(entry(path, "alpaca"), prepared_path=str(tmp_path / "prepared"))
    key = prepared_cache_dir(plan, tiny_tokenizer, seed=3, offline=True)
    assert prepared_cache_dir(replace(plan, exact_deduplication=True), tiny_tokenizer, seed=3, offline=True) != key
    assert prepared_cache_dir(replace(plan, group_by_length=True), tiny_tokenizer, seed=3, offline=True) == key
    # And a cached build with deduplication is reused as such.
    built = prepare_data(replace(plan, skip_prepare=False, exact_deduplication=True), tiny_tokenizer, seed=3,
                         offline=True)
    again = prepare_data(replace(plan, skip_prepare=False, exact_deduplication=True), tiny_tokenizer, seed=3,
                         offline=True)
    assert again.stats["reused"] and examples_of(again.train) == examples_of(built.train)


# --- group_by_length --------------------------------------------------------------------------------------------

def padded_tokens(lengths: np.ndarray, micro_batches: list[list[list[int]]]) -> int:
    """Padding a micro-batch pays without packing: every row padded to the longest."""
    return sum(len(mb) * max(int(lengths[row[0]]) for row in mb) - sum(int(lengths[row[0]]) for row in mb)
               for mb in micro_batches)


LENGTHS = np.random.default_rng(0).integers(8, 500, size=2000)
GEOMETRY = {"micro_batch_size": 4, "sequence_len": 512, "sample_packing": False}


def test_group_by_length_cuts_padding(tmp_path: Path) -> None:
    shuffled = plan_batches(LENGTHS, seed=1, epoch=0, **GEOMETRY)
    grouped = plan_batches(LENGTHS, seed=1, epoch=0, group_by_length=True, accumulation=2, **GEOMETRY)
    assert padded_tokens(LENGTHS, grouped) < padded_tokens(LENGTHS, shuffled) / 10
    # The longest example of all is in the first micro-batch (a batch that does not fit fails at once).
    assert max(int(LENGTHS[row[0]]) for row in grouped[0]) == int(LENGTHS.max())


@pytest.mark.parametrize("world", [1, 3])
def test_group_by_length_trains_every_row_once_an_epoch_on_every_rank(world: int) -> None:
    for epoch in (0, 1):
        shares = [plan_batches(LENGTHS, seed=1, epoch=epoch, group_by_length=True, accumulation=2, world_size=world,
                               rank=rank, **GEOMETRY) for rank in range(world)]
        rows = [row[0] for share in shares for mb in share for row in mb]
        assert len(rows) == len(set(rows)) == len(LENGTHS) - len(LENGTHS) % world
        assert len({len(share) for share in shares}) == 1  # ranks stay in step


def test_group_by_length_order_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[list[list[int]]]:
        return plan_batches(LENGTHS, seed=seed, epoch=epoch, group_by_length=True, accumulation=2, world_size=2,
                            rank=1, **GEOMETRY)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    # Packing ignores it, as in Axolotl.
    packed = {**GEOMETRY, "sample_packing": True}
    assert plan_batches(LENGTHS, seed=1, epoch=0, group_by_length=True, **packed) == \
        plan_batches(LENGTHS, seed=1, epoch=0, **packed)


@pytest.mark.parametrize("count, batch", [(2000, 8), (100, 8), (7, 4)])
def test_length_grouped_is_hugging_faces_order(monkeypatch: pytest.MonkeyPatch, count: int, batch: int) -> None:
    """Given the same shuffle, the order is exactly transformers' get_length_grouped_indices (which draws its
    shuffle from torch; here it is handed ours)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = np.random.default_rng(count).integers(1, 300, size=count)
    shuffle = np.random.default_rng(5).permutation(count)
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.from_numpy(shuffle.copy()))
    assert length_grouped(shuffle, lengths, batch).tolist() == get_length_grouped_indices(lengths.tolist(), batch)


# --- streamed SFT datasets --------------------------------------------------------------------------------------

def sft_rows(tmp_path: Path) -> Path:
    """The alpaca example rows and one far longer than sequence_len, which both paths must drop."""
    rows = [json.loads(line) for line in (EXAMPLES / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    rows.insert(9, {"instruction": "Repeat.", "output": "la " * 400})
    return write_rows(tmp_path / "sft.jsonl", rows)


def stream_cases(tmp_path: Path) -> dict[str, tuple[DatasetPlan, ...]]:
    return {
        "alpaca": (entry(sft_rows(tmp_path), "alpaca"),),
        "alpaca:phi": (entry(sft_rows(tmp_path), "alpaca:phi"),),
        "chat_template": (entry(EXAMPLES / "chat.jsonl", "chat_template"),),
        # Completion rows among SFT rows are whole examples too (chunks of sequence_len tokens).
        "mixed": (entry(EXAMPLES / "alpaca.jsonl", "alpaca"), entry(EXAMPLES / "corpus.jsonl", "completion")),
    }


def prepared_by_origin(plan: DataPlan, tokenizer: Any) -> dict[tuple[int, int], list[tuple[list[int], list[int]]]]:
    """The prepared path's examples of each (dataset, row)."""
    prepared = prepare_data(replace(plan, streaming=False), tokenizer, seed=4, offline=True)
    by_origin: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = {}
    for i in range(len(prepared.train)):
        example = prepared.train[i]
        by_origin.setdefault(prepared.train.source_row(i), []).append(
            (example["input_ids"].tolist(), example["labels"].tolist()))
    return by_origin


@pytest.mark.parametrize("case", ["alpaca", "alpaca:phi", "chat_template", "mixed"])
def test_streamed_examples_are_the_prepared_examples(tmp_path: Path, tiny_tokenizer: Any, case: str) -> None:
    plan = data_plan(*stream_cases(tmp_path)[case], sequence_len=96, streaming=True)
    expected = prepared_by_origin(plan, tiny_tokenizer)
    stream = open_stream(plan, tiny_tokenizer, seed=4, offline=True)
    first = [pieces for pieces, _ in islice(stream.rows(), 40)]
    assert all(len(pieces) == 1 for pieces in first)  # no packing: one whole example per row
    got: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = {}
    for [piece] in first:
        got.setdefault((piece.source, piece.row), []).append((piece.ids.tolist(), piece.trained_labels.tolist()))
    assert got == {origin: expected[origin] for origin in got}  # the same tokens and labels, row for row
    assert any(IGNORE in labels for examples in got.values() for _, labels in examples)  # prompts are masked
    if case in ("alpaca", "alpaca:phi"):  # the long row is dropped, as the prepared path drops it
        assert (0, 9) not in expected and stream.dropped == 1
    # Shuffled: not the file's order.
    assert [origin for origin in got][:10] != sorted(got)[:10]


def test_packed_streams_pack_whole_examples(tmp_path: Path, tiny_tokenizer: Any) -> None:
    plan = data_plan(*stream_cases(tmp_path)["mixed"], sequence_len=256, streaming=True,
                     packing_attention="torch_varlen")
    expected = prepared_by_origin(plan, tiny_tokenizer)
    stream = open_stream(plan, tiny_tokenizer, seed=4, offline=True)
    rows = []
    for pieces, position in stream.rows():
        if position.passes > 0:
            break
        rows.append(pieces)
    assert all(sum(len(piece.ids) for piece in pieces) <= 256 for pieces in rows)
    got = Counter((piece.source, piece.row, tuple(piece.ids.tolist()), tuple(piece.trained_labels.tolist()))
                  for pieces in rows for piece in pieces)
    want = Counter((source, row, tuple(ids), tuple(labels)) for (source, row), examples in expected.items()
                   for ids, labels in examples)
    assert got == want  # one pass: every prepared example once, whole
    assert len(rows) < sum(want.values()) / 2  # and several to a row


def test_streamed_labels_survive_collation(tmp_path: Path, tiny_tokenizer: Any) -> None:
    plan = data_plan(entry(EXAMPLES / "alpaca.jsonl", "alpaca"), sequence_len=96, streaming=True)
    stream = open_stream(plan, tiny_tokenizer, seed=4, offline=True)
    [(rows, _)] = list(islice(stream.micro_batches(), 1))
    store = StreamedRows(stream.files, packed=False)
    batch = collate(store, store.add(rows), pad_token_id=tiny_tokenizer.pad_token_id, sequence_len=96,
                    pad_to_sequence_len=False, packed=False)
    for b, [piece] in enumerate(rows):
        n = len(piece.ids)
        assert batch["labels"][b, :n].tolist() == piece.labels.tolist()
        assert (batch["labels"][b, n:] == IGNORE).all() and (batch["attention_mask"][b, n:] == 0).all()


@pytest.mark.parametrize("packed", [False, True])
def test_a_stream_of_examples_resumes_exactly(tmp_path: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch,
                                              packed: bool) -> None:
    import tunefile.runtime.data.streaming as streaming

    monkeypatch.setattr(streaming, "EXAMPLE_WINDOW", 10)  # several windows per pass
    plan = data_plan(entry(sft_rows(tmp_path), "alpaca"), sequence_len=96, streaming=True,
                     packing_attention="torch_varlen" if packed else None)

    def rows_from(position: Any = None, count: int = 80) -> list[Any]:
        position = position or streaming.StreamPosition()
        return list(islice(open_stream(plan, tiny_tokenizer, seed=4, offline=True).rows(position), count))

    whole = rows_from()
    assert whole[-1][1].passes >= 1  # past the end of a pass
    for stop in (1, 3, 11, 29, len(whole) - 5):
        again = rows_from(whole[stop - 1][1], len(whole) - stop)
        assert [[p.ids.tolist() for p in pieces] for pieces, _ in again] == \
            [[p.ids.tolist() for p in pieces] for pieces, _ in whole[stop:]]
    assert EXAMPLE_WINDOW >= 1000  # the real window packs many documents together


def test_streams_refuse_deduplication(tmp_path: Path, tiny_tokenizer: Any) -> None:
    plan = data_plan(entry(EXAMPLES / "alpaca.jsonl", "alpaca"), streaming=True, exact_deduplication=True)
    with pytest.raises(DataError, match="deduplicat"):
        open_stream(plan, tiny_tokenizer, seed=4, offline=True)
