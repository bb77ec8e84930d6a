"""Axolotl's data options in the runtime: eot_tokens (which tokens end a chat turn, trained per train_on_eos),
eval_packing (packed or padded evaluation, the same loss), skip_prepare (tokenised in memory, nothing on disk)
and streaming (pretraining_dataset: rows of sequence_len tokens read, tokenised and packed as training goes)."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from helpers import require_module

require_module("torch", "make install")

import numpy as np  # noqa: E402
import runtime_plans  # noqa: E402
import torch  # noqa: E402

from runtime_bundles import compile_bundle, launch, metrics, summary, train_losses, workspace, write_config  # noqa: E402
from tunefile.compiler.pipeline import TargetOptions, compile_config  # noqa: E402
from tunefile.compiler.render.config_yaml import dataset_plan  # noqa: E402
from tunefile.compiler.spec import DatasetSpec  # noqa: E402
from tunefile.runtime.checkpoint import load_rank_state  # noqa: E402
from tunefile.runtime.config import load_run_plan  # noqa: E402
from tunefile.runtime.data import prepare_data, prepared_cache_dir  # noqa: E402
from tunefile.runtime.data.batching import collate, plan_eval_batches  # noqa: E402
from tunefile.runtime.data.errors import DataError  # noqa: E402
from tunefile.runtime.data.formats import IGNORE, Example, make_formatter  # noqa: E402
from tunefile.runtime.data.preprocess import run_preprocess  # noqa: E402
from tunefile.runtime.data.streaming import (  # noqa: E402
    StreamedRows,
    StreamPosition,
    open_stream,
    resume_position,
)
from tunefile.runtime.data.tokenizer import add_config_tokens  # noqa: E402
from tunefile.runtime.evaluate import decide_eval_packing, evaluate  # noqa: E402
from tunefile.schemas.run_plan import DataPlan, DatasetPlan  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
TURN_END = "<|turn_end|>"
# Every turn ends with a token of our own, which no built-in list of terminators knows.
TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|turn_end|>' + '\\n' }}{% endfor %}"
TWO_TURNS = {"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "RED"}]}


def data_plan(*datasets: DatasetPlan, **changes: Any) -> DataPlan:
    return runtime_plans.data_plan(*datasets, **{"sequence_len": 64, **changes})


def dataset(path: Path | str, type: str, **options: Any) -> DatasetPlan:
    """One dataset as the compiler writes it into the plan: the defaults of its type filled in."""
    return dataset_plan(DatasetSpec(path=str(path), type=type, **options))


@pytest.fixture(scope="module")
def turn_end_tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny tokenizer with <|turn_end|> added, as `special_tokens: additional_special_tokens` adds it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert add_config_tokens(tokenizer, {"additional_special_tokens": [TURN_END]}, None) == 1
    return tokenizer


def marked(tokenizer: Any, example: Example) -> list[str]:
    """The example's tokens, trained ones in brackets (each label is its token or -100)."""
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (IGNORE, token)
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    return [f"[{t}]" if label != IGNORE else t for t, label in zip(tokens, example.labels, strict=True)]


def chat(tokenizer: Any, row: dict[str, Any], *, template: str = TEMPLATE, **options: Any) -> list[str]:
    entry = dataset("rows.jsonl", "chat_template", chat_template=template,
                    **{k: v for k, v in options.items() if k in ("train_on_eos", "roles_to_train")})
    data = data_plan(entry, **{k: v for k, v in options.items() if k == "eot_tokens"})
    [example] = make_formatter(entry, data, tokenizer)(row)
    return marked(tokenizer, example)


def two_turns(user: str, user_end: str, assistant_end: str) -> list[str]:
    """TWO_TURNS rendered by TEMPLATE, the user's content and the two turn ends marked as given."""
    return ["user", ":", *user.split(), user_end, "Ċ", "assistant", ":", "Ġ", "[RED]", assistant_end, "Ċ"]


PLAIN, TRAINED = "ĠSay Ġred .", "[ĠSay] [Ġred] [.]"


# --- eot_tokens -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("train_on_eos", "roles", "expected"), [
    ("turn", ["assistant"], two_turns(PLAIN, TURN_END, f"[{TURN_END}]")),
    ("all", ["assistant"], two_turns(PLAIN, f"[{TURN_END}]", f"[{TURN_END}]")),
    ("none", ["assistant"], two_turns(PLAIN, TURN_END, TURN_END)),
    ("turn", ["user", "assistant"], two_turns(TRAINED, f"[{TURN_END}]", f"[{TURN_END}]")),
    ("last", ["user", "assistant"], two_turns(TRAINED, TURN_END, f"[{TURN_END}]")),
])
def test_eot_tokens_end_the_turns_and_train_on_eos_picks_which_train(
        turn_end_tokenizer: Any, train_on_eos: str, roles: list[str], expected: list[str]) -> None:
    assert chat(turn_end_tokenizer, TWO_TURNS, eot_tokens=(TURN_END,), train_on_eos=train_on_eos,
                roles_to_train=roles) == expected


def test_without_eot_tokens_an_unknown_turn_end_is_never_trained(turn_end_tokenizer: Any) -> None:
    """The default end of a turn is eos or a known terminator; <|turn_end|> is neither, so only eot_tokens
    makes it one."""
    assert chat(turn_end_tokenizer, TWO_TURNS, train_on_eos="all") == two_turns(PLAIN, TURN_END, TURN_END)


def test_eos_after_a_turn_still_follows_train_on_eos(turn_end_tokenizer: Any) -> None:
    """As in Axolotl (train_on_eot defaults to train_on_eos): naming eot_tokens leaves eos a turn end too."""
    template = TEMPLATE + "{{ eos_token }}"
    trained = chat(turn_end_tokenizer, TWO_TURNS, template=template, eot_tokens=(TURN_END,), train_on_eos="turn")
    assert trained == two_turns(PLAIN, TURN_END, f"[{TURN_END}]") + ["[<|end_of_text|>]"]
    untrained = chat(turn_end_tokenizer, TWO_TURNS, template=template, eot_tokens=(TURN_END,), train_on_eos="none")
    assert untrained == two_turns(PLAIN, TURN_END, TURN_END) + ["<|end_of_text|>"]


def test_an_eot_token_outside_the_vocabulary_is_one_error_naming_each(turn_end_tokenizer: Any) -> None:
    with pytest.raises(DataError) as error:
        chat(turn_end_tokenizer, TWO_TURNS, eot_tokens=(TURN_END, "<|nope|>", "Ġred"))
    message = str(error.value)
    assert "'<|nope|>' is not in the tokenizer's vocabulary" in message
    assert "'Ġred' is read as 3 token(s)" in message  # a byte-level vocabulary entry, not text
    assert TURN_END not in message.replace("eot_tokens:", "")  # the good one is not blamed


def test_eot_tokens_are_part_of_the_prepared_data_key(tmp_path: Path, turn_end_tokenizer: Any) -> None:
    plan = data_plan(dataset(EXAMPLES / "chat.jsonl", "chat_template"), prepared_path=str(tmp_path))
    keys = {prepared_cache_dir(replace(plan, eot_tokens=eot), turn_end_tokenizer, seed=1, offline=True)
            for eot in (None, (TURN_END,), ("<|im_end|>",))}
    assert len(keys) == 3


# --- eval_packing ---------------------------------------------------------------------------------------------

def test_every_rank_count_evaluates_every_example_once_in_step() -> None:
    lengths = np.array([5, 9, 3, 0, 12, 7, 7, 1, 16, 4, 2])
    for packed in (False, True):
        for world in (1, 2, 3, 4):
            plans = [plan_eval_batches(lengths, micro_batch_size=2, sequence_len=16, packed=packed, world_size=world,
                                       rank=rank) for rank in range(world)]
            seen = [i for plan in plans for micro_batch in plan.micro_batches for row in micro_batch for i in row]
            assert sorted(seen) == [i for i in range(len(lengths)) if lengths[i]]  # the empty one has no tokens
            passes = {len(plan.micro_batches) + len(plan.idle) for plan in plans}
            assert len(passes) == 1, (packed, world)  # every rank makes as many forward passes
            for plan in plans:
                for row in (row for micro_batch in plan.micro_batches for row in micro_batch):
                    assert lengths[row].sum() <= 16 and (packed or len(row) == 1)


def test_packed_and_padded_evaluation_give_the_same_loss(tmp_path: Path, tiny_model_dir: Path,
                                                         tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    from tunefile.runtime.attention import packing_forward_kwargs

    plan = data_plan(dataset(EXAMPLES / "alpaca.jsonl", "alpaca"), sequence_len=256, micro_batch_size=3,
                     skip_prepare=True, prepared_path=str(tmp_path / "prepared"))
    rows = prepare_data(plan, tiny_tokenizer, seed=3, offline=True).train
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").float()
    accelerator = SimpleNamespace(device=torch.device("cpu"), reduce=lambda tensor, reduction: tensor)

    def eval_loss(packed: bool, isolation: str | None) -> tuple[float, int]:
        evaluated = rows.lengths[:24]  # plenty to pack, and quick
        eval_plan = plan_eval_batches(evaluated, micro_batch_size=3, sequence_len=256, packed=packed)
        batch_of = lambda micro_batch: collate(rows, micro_batch, pad_token_id=tiny_tokenizer.pad_token_id,  # noqa: E731
                                               sequence_len=256, pad_to_sequence_len=False, packed=packed)
        isolate = lambda position_ids: packing_forward_kwargs(isolation, position_ids, attn_implementation="sdpa",  # noqa: E731
                                                              dtype=torch.float32)
        loss = evaluate(model, accelerator, eval_plan.micro_batches, batch_of, isolate, idle=eval_plan.idle)
        return loss, sum(len(micro_batch) for micro_batch in eval_plan.micro_batches)

    packed, packed_rows = eval_loss(True, "block_mask")
    padded, padded_rows = eval_loss(False, None)  # a run without packing: a padding mask
    padded_isolated, _ = eval_loss(False, "block_mask")  # a packing run evaluating padded rows
    assert packed_rows < padded_rows == 24  # packing did put several examples in a row
    assert math.isfinite(packed) and packed > 0
    assert packed == pytest.approx(padded, rel=1e-5) and padded_isolated == pytest.approx(padded, rel=1e-5)


def test_a_plan_that_packs_evaluation_without_a_packing_attention_evaluates_padded_and_says_why() -> None:
    packed, why = decide_eval_packing(True, packing=False, has_eval=True)
    assert packed is False and why.startswith("padded: the plan packs evaluation but chose no packing attention")
    assert decide_eval_packing(True, packing=True, has_eval=True) == (True, None)
    assert decide_eval_packing(False, packing=True, has_eval=True) == (False, None)
    assert decide_eval_packing(True, packing=False, has_eval=False) == (False, None)  # nothing to evaluate


# --- skip_prepare ---------------------------------------------------------------------------------------------

def test_skip_prepare_tokenises_in_memory_and_writes_nothing(tmp_path: Path, tiny_tokenizer: Any) -> None:
    plan = data_plan(dataset(EXAMPLES / "alpaca.jsonl", "alpaca"), sequence_len=256, val_set_size=0.25,
                     prepared_path=str(tmp_path / "prepared"))
    in_memory = prepare_data(replace(plan, skip_prepare=True), tiny_tokenizer, seed=5, offline=True)
    assert not (tmp_path / "prepared").exists() and in_memory.cache_dir is None
    cached = prepare_data(plan, tiny_tokenizer, seed=5, offline=True)  # the same tokenisation, on disk
    assert cached.cache_dir is not None and cached.cache_dir.is_dir()
    for split in ("train", "eval"):
        ours, theirs = getattr(in_memory, split), getattr(cached, split)
        assert len(ours) == len(theirs) > 0
        for i in range(len(ours)):
            assert ours[i]["input_ids"].tolist() == theirs[i]["input_ids"].tolist()
            assert ours[i]["labels"].tolist() == theirs[i]["labels"].tolist()
            assert ours.origin(i) == theirs.origin(i)


def compiled(tmp_path: Path, model: Path, **values: Any) -> Path:
    """A bundle's config.yaml, compiled in-process from a user config with absolute paths."""
    config = {"base_model": str(model), "sequence_len": 64, "micro_batch_size": 2, "max_steps": 3, "seed": 11,
              "dataset_prepared_path": str(tmp_path / "prepared"), "output_dir": str(tmp_path / "out"), **values}
    source = tmp_path / "cfg.yml"
    source.write_text(yaml.safe_dump(config), encoding="utf-8")
    path = tmp_path / "bundle" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compile_config(source, TargetOptions(target="cpu")).files["config.yaml"], encoding="utf-8")
    return path


def test_preprocess_with_skip_prepare_shows_the_data_and_keeps_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = compiled(tmp_path, tiny_model_dir, skip_prepare_dataset=True,
                      datasets=[{"path": str(EXAMPLES / "alpaca.jsonl"), "type": "alpaca"}])
    out = _Output()
    assert run_preprocess(config, show=1, out=out) == 0
    assert "prepared data: in memory only (skip_prepare: nothing is written to" in out.text
    assert "rows: 64 read from 1 dataset(s)" in out.text and "--- example 1 (" in out.text
    assert not (tmp_path / "prepared").exists()


def test_preprocess_of_a_stream_says_there_is_nothing_to_prepare(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = compiled(tmp_path, tiny_model_dir,
                      pretraining_dataset=[{"path": str(EXAMPLES / "corpus.jsonl"), "type": "completion"}])
    out = _Output()
    assert run_preprocess(config, show=2, out=out) == 0
    assert out.text.startswith("streaming: nothing to prepare;")
    assert "--- row 1 (64 tokens, all trained; from " in out.text and "corpus.jsonl row" in out.text
    assert not (tmp_path / "prepared").exists()


class _Output:
    """A text sink that is not a terminal (so no colour)."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text


# --- streaming ------------------------------------------------------------------------------------------------

def corpus(tmp_path: Path, documents: int = 23) -> Path:
    """Documents of different lengths, each naming its number, so order and coverage are visible."""
    path = tmp_path / "corpus.jsonl"
    lines = [f'{{"text": "{" ".join(["one two three"] * (1 + i % 5))} number {i}"}}' for i in range(documents)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stream_plan(path: Path, **changes: Any) -> DataPlan:
    return data_plan(dataset(path, "completion"), sequence_len=16, micro_batch_size=2, skip_prepare=True,
                     streaming=True, **changes)


def texts(stream: Any, pass_number: int = 0) -> list[str]:
    return [document.fields["text"] for document in stream.documents(pass_number)]


def test_stream_shares_are_disjoint_and_cover_every_row(tmp_path: Path, tiny_tokenizer: Any) -> None:
    plan = stream_plan(corpus(tmp_path))
    for world in (1, 2, 3):
        shares = [texts(open_stream(plan, tiny_tokenizer, seed=4, offline=True, rank=rank, world_size=world))
                  for rank in range(world)]
        everything = [text for share in shares for text in share]
        assert len(everything) == len(set(everything)) == 23  # disjoint, and together every row
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_streamed_rows_are_sequence_len_tokens_of_documents_separated_by_eos(tmp_path: Path,
                                                                               tiny_tokenizer: Any) -> None:
    stream = open_stream(stream_plan(corpus(tmp_path)), tiny_tokenizer, seed=4, offline=True)
    rows = [np.concatenate([piece.ids for piece in pieces]) for pieces, _ in islice(stream.rows(), 30)]
    assert {len(row) for row in rows} == {16}
    # Each document as the completion format tokenises it (bos, text, eos), in the stream's order, back to back.
    documents = [tiny_tokenizer(text).input_ids + [tiny_tokenizer.eos_token_id] for text in texts(stream)]
    assert all(ids[0] == tiny_tokenizer.bos_token_id for ids in documents)
    expected = [token for ids in documents for token in ids]
    assert np.concatenate(rows)[:len(expected)].tolist() == expected[:30 * 16]


def test_stream_order_is_a_function_of_the_seed(tmp_path: Path, tiny_tokenizer: Any) -> None:
    plan = stream_plan(corpus(tmp_path))

    def first_rows(seed: int) -> list[list[int]]:
        stream = open_stream(plan, tiny_tokenizer, seed=seed, offline=True, rank=1, world_size=2)
        return [np.concatenate([p.ids for p in pieces]).tolist() for pieces, _ in islice(stream.rows(), 12)]

    assert first_rows(4) == first_rows(4)
    assert first_rows(4) != first_rows(5)


def test_stream_reads_the_sources_again_in_a_new_order_when_they_run_out(tmp_path: Path,
                                                                         tiny_tokenizer: Any) -> None:
    stream = open_stream(stream_plan(corpus(tmp_path, documents=5)), tiny_tokenizer, seed=4, offline=True)
    positions = [position for _, position in islice(stream.rows(), 40)]
    assert positions[-1].passes >= 2  # five short documents fill only a few rows per pass
    assert sorted(texts(stream, 0)) == sorted(texts(stream, 1)) and texts(stream, 0) != texts(stream, 1)


def test_a_stream_resumes_exactly_where_it_stopped(tmp_path: Path, tiny_tokenizer: Any) -> None:
    plan = stream_plan(corpus(tmp_path, documents=7))
    whole = list(islice(open_stream(plan, tiny_tokenizer, seed=4, offline=True).rows(), 60))
    for stop in (1, 5, 17, 33):  # mid-document, and past the end of a pass
        _, position = whole[stop - 1]
        again = islice(open_stream(plan, tiny_tokenizer, seed=4, offline=True).rows(position), 60 - stop)
        assert [[p.ids.tolist() for p in pieces] for pieces, _ in again] == \
            [[p.ids.tolist() for p in pieces] for pieces, _ in whole[stop:]]


def test_resume_needs_the_same_number_of_processes() -> None:
    saved = {"world_size": 2, "stream": {"passes": 1, "documents": 3, "tokens": 4}}
    position, decision = resume_position(saved, resuming=True, world_size=2)
    assert position == StreamPosition(1, 3, 4) and decision.startswith("resumed exactly")
    position, decision = resume_position(saved, resuming=True, world_size=4)
    assert position == StreamPosition() and "shared by 2 processes, this run has 4" in decision
    position, decision = resume_position({"world_size": 1}, resuming=True, world_size=1)
    assert position == StreamPosition() and "holds no stream position" in decision
    assert resume_position(None, resuming=False, world_size=1) == (StreamPosition(), None)


def test_streamed_rows_collate_packed_pieces_apart_and_unpacked_rows_whole(tmp_path: Path,
                                                                          tiny_tokenizer: Any) -> None:
    stream = open_stream(stream_plan(corpus(tmp_path)), tiny_tokenizer, seed=4, offline=True)
    [(rows, _)] = list(islice(stream.micro_batches(), 1))
    for packed in (True, False):
        store = StreamedRows(stream.files, packed=packed)
        micro_batch = store.add(rows)
        batch = collate(store, micro_batch, pad_token_id=tiny_tokenizer.pad_token_id, sequence_len=16,
                        pad_to_sequence_len=False, packed=packed)
        assert batch["input_ids"].shape == (2, 16)
        starts = batch["position_ids"] == 0
        assert starts.sum(dim=1).tolist() == ([len(pieces) for pieces in rows] if packed else [1, 1])
        # Every token is trained, except (packed) a piece's first, which nothing in its piece predicts.
        assert ((batch["labels"] == IGNORE) == starts).all() if packed else (batch["labels"] != IGNORE).all()
        sources = [pair for row in micro_batch for item in row for pair in store.source_rows(item)]
        assert all(store.file_row(*pair)[0].endswith("corpus.jsonl") for pair in sources)


# --- end to end -----------------------------------------------------------------------------------------------

def test_a_streaming_run_trains_max_steps_and_checkpoints_its_place_in_the_stream(
        tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    root = workspace(tmp_path, tiny_model_dir)
    config = write_config(root, datasets=None, max_steps=5, save_steps=2,
                          pretraining_dataset=[{"path": "data/corpus.jsonl", "type": "completion"}])
    bundle = compile_bundle(config)
    launch(bundle)
    losses = train_losses(root / "out")
    assert len(losses) == 5 and all(math.isfinite(loss) for loss in losses)
    assert not (root / "prepared").exists()  # nothing prepared, nothing cached
    assert "stream_resume" not in summary(root / "out")["runtime_decisions"]  # a fresh run starts the stream

    # checkpoint-2 holds where rank 0's stream stood: after 2 steps × 1 micro-batch × 4 rows; resuming from it
    # continues with the ninth row, which step 3 trained on.
    monkeypatch.chdir(root)  # the plan's paths are relative to where the bundle is launched from
    plan = load_run_plan(bundle / "config.yaml")
    assert plan.data.streaming and plan.data.micro_batch_size == 4
    rows = list(islice(open_stream(plan.data, tiny_tokenizer, seed=plan.seed, offline=True).rows(), 9))
    position, decision = resume_position(load_rank_state(root / "out" / "checkpoint-2", 0), resuming=True,
                                         world_size=1)
    assert position == rows[7][1] and decision.startswith("resumed exactly")
    [(pieces, _)] = islice(open_stream(plan.data, tiny_tokenizer, seed=plan.seed, offline=True).rows(position), 1)
    assert [p.ids.tolist() for p in pieces] == [p.ids.tolist() for p in rows[8][0]]


def test_a_skip_prepare_run_trains_and_evaluates_without_a_prepared_folder(tmp_path: Path,
                                                                          tiny_model_dir: Path) -> None:
    root = workspace(tmp_path, tiny_model_dir)
    config = write_config(root, fmt="alpaca", skip_prepare_dataset=True, sample_packing=True,
                          eval_sample_packing=False, val_set_size=0.25, max_steps=4, eval_steps=2)
    launch(compile_bundle(config))
    losses = train_losses(root / "out")
    eval_losses = [record["eval_loss"] for record in metrics(root / "out") if "eval_loss" in record]
    assert len(losses) == 4 and len(eval_losses) == 2
    assert all(math.isfinite(loss) for loss in losses + eval_losses)
    assert not (root / "prepared").exists()
