"""The tiktoken engine (runtime/data/fast_tokenizer.py) and the multi-process build: tiktoken gives the Hugging Face
tokenizer's ids on awkward text for a Llama-3-kind tokenizer (trained here, as bench/preprocess_vs_datasets.py
trains its 128k one); other tokenizers and a missing tiktoken fall back with a reason; the prepared data is the
same bytes with one process or several, and with either engine; `preprocess` never imports torch."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import REPO, require_module

require_module("transformers", "make install")
require_module("tiktoken", "pip install 'tunefile[fast-tokenize]'")

import runtime_plans  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from tunefile.compiler.render.config_yaml import dataset_plan  # noqa: E402
from tunefile.compiler.spec import DatasetSpec  # noqa: E402
from tunefile.runtime.data import build as build_module  # noqa: E402
from tunefile.runtime.data import fast_tokenizer  # noqa: E402
from tunefile.runtime.data.chat import ChatTemplateFormat  # noqa: E402
from tunefile.runtime.data.examples import batch_encoder  # noqa: E402
from tunefile.runtime.data.fast_tokenizer import EngineSelector, build_tiktoken  # noqa: E402
from tunefile.runtime.data.instruction import AlpacaFormat  # noqa: E402
from tunefile.runtime.data.sources import resolve_source  # noqa: E402

EXAMPLES = REPO / "examples" / "data"


def load_bench() -> Any:
    path = REPO / "bench" / "preprocess_vs_datasets.py"
    spec = importlib.util.spec_from_file_location("preprocess_vs_datasets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def english_paragraphs() -> list[str]:
    """Prose from the docstrings of a few standard library modules (what the bench reads, in small)."""
    bench = load_bench()
    stdlib = Path(json.__file__).resolve().parent.parent
    paragraphs = []
    for name in ("argparse.py", "subprocess.py", "pathlib.py", "logging/__init__.py", "json/__init__.py"):
        for text in bench.docstrings(stdlib / name):
            paragraphs += bench.prose_paragraphs(text)
    return paragraphs + ["It's 3.14159 o'clock; we'll see.", "Naïve café résumé — déjà vu!", "東京 北京 서울"]


@pytest.fixture(scope="module")
def llama3_kind_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return load_bench().build_tokenizer(tmp_path_factory.mktemp("llama3-kind"), english_paragraphs(),
                                        vocab_size=1500)


@pytest.fixture(scope="module")
def llama3_kind(llama3_kind_dir: Path) -> Any:
    return PreTrainedTokenizerFast.from_pretrained(llama3_kind_dir)


def varied_texts() -> list[str]:
    """Unicode of many scripts, runs of whitespace, digits, special tokens inside text, and random code points."""
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F6FF), (0x2000, 0x206F)]
    randoms = ["".join(chr(rng.randint(*rng.choice(ranges))) if rng.random() < 0.8 else rng.choice(" \n\t\r")
                       for _ in range(rng.randint(1, 200))) for _ in range(200)]
    return [
        "", " ", "  ", "\n", "\n\n\n", "\t\t x", "a  b   c    d", "trailing spaces   ", "   leading", "\r\n\r\nwin",
        "1 12 123 1234 12345 123456 3.14159 1,000,000 2024-01-31 0x7fff", "I'm you're HE'LL we'VE it's 'quoted'",
        "naïve café 日本語 中文 한국어 Ελληνικά русский العربية हिन्दी", "👍🏽👨‍👩‍👧 🙂🙃",
        "e\u0301 ﬁ ＡＢＣ \u00a0 \u2009",
        "<|begin_of_text|>Hello<|eot_id|> <|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "x<|end_of_text|>y<|begin_of_text|><|begin_of_text|>", "<|begin_of_text", "<|not_a_token|>",
        "def f(x):\n    return x  # comment\n\n\tpass", "!!!???... --- ***", "a" * 5000, " " * 300 + "end",
        *english_paragraphs()[:50], *randoms,
    ]


def test_tiktoken_gives_the_tokenizers_ids_on_varied_text(llama3_kind: Any) -> None:
    engine, reason = build_tiktoken(llama3_kind)
    assert engine is not None, reason
    reference = batch_encoder(llama3_kind)
    texts = varied_texts()
    for special in (False, True):
        mine = [ids for ids, _ in engine(texts, special)]
        theirs = [list(ids) for ids, _ in reference(texts, special)]
        mismatched = [text[:40] for text, a, b in zip(texts, mine, theirs, strict=True) if a != b]
        assert not mismatched, mismatched
    # Special tokens inside text are single tokens, and bos comes from the post-processor only when asked.
    bos = llama3_kind.convert_tokens_to_ids("<|begin_of_text|>")
    assert engine(["<|eot_id|>"], False)[0][0] == [llama3_kind.convert_tokens_to_ids("<|eot_id|>")]
    assert engine(["hi"], True)[0][0][0] == bos and bos not in engine(["hi"], False)[0][0]


def test_alpaca_uses_tiktoken_after_checking_rows_and_chat_keeps_offsets(llama3_kind: Any) -> None:
    rows = [json.loads(line) for line in (EXAMPLES / "alpaca.jsonl").read_text().splitlines() if line.strip()]
    alpaca = AlpacaFormat(llama3_kind, train_on_inputs=False)
    before = alpaca.batch(rows)
    selector = EngineSelector(llama3_kind)
    choice = selector.choose(alpaca, rows, label="alpaca.jsonl")
    assert choice.engine == "tiktoken" and choice.reason is None and choice.checked_texts > 2 * len(rows)
    assert isinstance(alpaca.encode_many, fast_tokenizer.TiktokenEncoder)
    assert alpaca.batch(rows) == before  # the same examples, ids and labels
    data = runtime_plans.data_plan(dataset_plan(DatasetSpec(path="chat.jsonl", type="chat_template")),
                                   chat_template="llama3")
    chat = ChatTemplateFormat(data.datasets[0], data, llama3_kind)
    choice = selector.choose(chat, [], label="chat.jsonl")
    assert choice.engine == "huggingface" and "offsets" in choice.reason
    assert not isinstance(chat.encode_many, fast_tokenizer.TiktokenEncoder)


def test_a_disagreement_on_the_rows_keeps_the_tokenizer(llama3_kind: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = build_tiktoken(llama3_kind)
    wrong = fast_tokenizer.TiktokenEncoder(engine.encoding, prefix=[], suffix=[])  # forgets bos
    monkeypatch.setattr(fast_tokenizer, "build_tiktoken", lambda tokenizer: (wrong, None))
    alpaca = AlpacaFormat(llama3_kind, train_on_inputs=False)
    choice = EngineSelector(llama3_kind).choose(alpaca, [], label="x")
    assert choice.engine == "huggingface" and choice.reason.startswith("tiktoken and the tokenizer disagree")


def wordpiece_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(english_paragraphs(), trainers.WordPieceTrainer(vocab_size=300,
                                                                                   special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def test_other_tokenizers_fall_back_with_their_reason(tiny_tokenizer: Any, llama3_kind_dir: Path) -> None:
    assert build_tiktoken(wordpiece_tokenizer()) == (None, "the tokenizer's model is WordPiece, not byte-level BPE")
    engine, reason = build_tiktoken(tiny_tokenizer)  # byte-level BPE, but GPT-2's regex inside ByteLevel
    assert engine is None and "ignore_merges" in reason
    spec = json.loads((llama3_kind_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # one split of a token that is no longer a merge
    assert "not a tiktoken vocabulary" in fast_tokenizer.mergeable_ranks(spec)[1]
    spec = json.loads((llama3_kind_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"].reverse()
    assert "not a Split regex then ByteLevel" in fast_tokenizer.structure_reason(spec, split_special_tokens=False)
    spec["normalizer"] = {"type": "NFC"}
    assert "normalises" in fast_tokenizer.structure_reason(spec, split_special_tokens=False)


def test_missing_tiktoken_falls_back(llama3_kind: Any, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` raises ImportError
    alpaca = AlpacaFormat(llama3_kind, train_on_inputs=False)
    selector = EngineSelector(llama3_kind)
    with caplog.at_level("INFO", logger=fast_tokenizer.__name__):
        first = selector.choose(alpaca, [], label="a.jsonl")
        second = selector.choose(AlpacaFormat(llama3_kind, train_on_inputs=False), [], label="b.jsonl")
    assert first.engine == second.engine == "huggingface"
    assert first.reason == "tiktoken is not installed (pip install 'tunefile[fast-tokenize]')"
    assert len([record for record in caplog.records if "not installed" in record.message]) == 1  # logged once


def alpaca_rows(count: int) -> list[dict[str, str]]:
    rng = random.Random(1)
    paragraphs = english_paragraphs()
    return [{"instruction": rng.choice(paragraphs)[:120], "input": rng.choice(["", rng.choice(paragraphs)]),
             "output": " ".join(rng.choice(paragraphs) for _ in range(rng.randint(1, 3)))} for _ in range(count)]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_several_processes_write_the_same_bytes_as_one(tmp_path: Path, llama3_kind: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data_file = tmp_path / "alpaca.jsonl"
    rows = alpaca_rows(5000)
    rows[7] = {"instruction": 3}  # malformed, counted and named
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    data = runtime_plans.data_plan(dataset_plan(DatasetSpec(path=str(data_file), type="alpaca")),
                                   sequence_len=400, val_set_size=0.05, exact_deduplication=True)
    sources = [resolve_source(entry, offline=True) for entry in data.datasets]
    monkeypatch.setattr(build_module, "WORKER_BATCH", 300)  # many batches in flight, out of order in time
    built = {}
    for processes in (1, 2, 3):
        # The same folder name under different parents: the COMPLETE marker holds the name.
        build_module.build(data, llama3_kind, sources, tmp_path / f"p{processes}" / "key", seed=3,
                           shard_rows=700, processes=processes)
        built[processes] = folder_bytes(tmp_path / f"p{processes}" / "key")
    assert built[1] == built[2] == built[3]
    stats = json.loads(built[1]["stats.json"])
    assert stats["datasets"][0]["tokenizer_engine"]["engine"] == "tiktoken"
    assert stats["dropped"]["malformed"] == 1 and stats["dropped"]["too_long"] > 0 and stats["eval"]["examples"] > 0
    assert len([name for name in built[1] if name.startswith("train/") and name.endswith("input_ids.npy")]) > 3
    # The Hugging Face engine (today's path, one process) writes the same shards.
    monkeypatch.setattr(fast_tokenizer, "build_tiktoken", lambda tokenizer: (None, "switched off by the test"))
    build_module.build(data, llama3_kind, sources, tmp_path / "hf" / "key", seed=3, shard_rows=700)
    slow = folder_bytes(tmp_path / "hf" / "key")
    assert {name: blob for name, blob in slow.items() if name != "stats.json"} == \
        {name: blob for name, blob in built[1].items() if name != "stats.json"}
    assert json.loads(slow["stats.json"])["datasets"][0]["tokenizer_engine"] == \
        {"engine": "huggingface", "reason": "switched off by the test", "checked_texts": 0}


def test_preprocess_runs_without_torch(tmp_path: Path, llama3_kind_dir: Path) -> None:
    from tunefile.compiler.pipeline import TargetOptions, compile_config

    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(row) + "\n" for row in alpaca_rows(300)),
                                           encoding="utf-8")
    config = {"base_model": str(llama3_kind_dir), "datasets": [{"path": str(tmp_path / "alpaca.jsonl"),
                                                                "type": "alpaca"}],
              "sequence_len": 512, "dataset_prepared_path": str(tmp_path / "prepared"), "micro_batch_size": 1,
              "output_dir": str(tmp_path / "out")}
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    bundle = tmp_path / "config.yaml"
    bundle.write_text(compile_config(tmp_path / "cfg.yml", TargetOptions(target="cpu")).files["config.yaml"],
                      encoding="utf-8")
    probe = ("import sys\nfrom tunefile.runtime.__main__ import main\n"
             f"code = main(['preprocess', {str(bundle)!r}])\n"
             "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout
    assert "tokenised with tiktoken: " in result.stdout and "huggingface/tokenizers" not in result.stderr
