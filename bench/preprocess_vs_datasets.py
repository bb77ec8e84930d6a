"""`tunefile preprocess` against `datasets.map(batched=True, num_proc=<cores>)` doing the same work (issue 13,
target 4): an alpaca JSONL, Llama 3's prompt-and-response recipe (the alpaca prompt with bos, the response and
eos, the prompt's labels -100, rows longer than sequence_len dropped), saved to disk.

    python bench/preprocess_vs_datasets.py [--sizes-mb 50 250 1000] [--pairs 2] [--work /tmp/tunefile-vs-datasets]

Everything is built here, offline, and kept in --work for the next call:
- English text: the docstrings of the Python standard library and of the installed packages (site-packages) and
  their .md/.rst/.txt files, /usr/share/common-licenses and /usr/share/doc, cut into paragraphs of prose
  (doctests, tables and code left out);
- a Llama-3-kind tokenizer: byte-level BPE with Llama 3's split regex and no normaliser, 128,000 merged tokens
  trained on that text with the `tokenizers` library, then written the way Llama 3's tokenizer.json is (every
  split of a token into two tokens a merge, ordered by the token's id; whole words looked up first; bos by the
  post-processor; 256 special tokens after the vocabulary);
- alpaca rows (instruction, input in about a third of them, output of one to four paragraphs) drawn from the
  paragraphs with a fixed seed, written until the file has the size asked for.

Each side runs in a fresh process, the pairs interleaved (the order alternates); for each run: wall time, CPU
time of the process and its workers (wait4), the largest process's peak RSS (wait4) and the peak of the whole
process tree's proportional set size (PSS, sampled from /proc every 0.25 s: shared pages counted once). Both
outputs are read back and their token ids and labels compared row by row. Prints a table and writes
bench/results/preprocess_vs_datasets.json.

`python bench/preprocess_vs_datasets.py datasets-side ...` is the Hugging Face side itself (what the bench runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import yaml

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
# Llama 3's pre-tokenizer regex (its tokenizer.json's Split pattern).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
VOCAB = 128_000  # Llama 3: 128,000 BPE tokens, then 256 special tokens
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SEQUENCE_LEN = 2048
TRIPLE_QUOTED = re.compile(r"(\"\"\"|''')(.*?)\1", flags=re.DOTALL)
CORPUS_MB = 30  # unique prose paragraphs collected (the rows reuse them in new combinations)
INSTRUCTIONS = ["Summarize the following text.", "Explain this in plain words.", "Rewrite the paragraph for a "
                "beginner.", "What does the following describe?", "Give the main point of this passage.",
                "Continue the explanation.", "Write a short note about the topic below.", "Answer the question."]


# --- inputs ----------------------------------------------------------------------------------------------------

def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of ``text`` that read as English prose: long enough, mostly letters, no code or tables."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        paragraph = " ".join(block.split())
        if len(paragraph) < 80 or ">>>" in paragraph or "::" in paragraph or "===" in paragraph:
            continue
        letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
        if letters / len(paragraph) >= 0.88 and paragraph[0].isupper():
            found.append(paragraph)
    return found


def docstrings(path: Path) -> list[str]:
    """The triple-quoted strings of a Python file: its docstrings, mostly (a regular expression, not ``ast``:
    parsing every file of site-packages takes many minutes; prose_paragraphs drops what is not prose)."""
    text = path.read_text(encoding="utf-8", errors="ignore")
    return [match.group(2) for match in TRIPLE_QUOTED.finditer(text)]


def build_corpus(path: Path, megabytes: int) -> list[str]:
    """Unique prose paragraphs (about ``megabytes``), one per line, cached in ``path``."""
    if path.exists():
        return path.read_text(encoding="utf-8").splitlines()
    stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = Path(np.__file__).resolve().parent.parent
    roots = [Path("/usr/share/common-licenses"), stdlib, site, Path("/usr/share/doc")]
    seen: set[str] = set()
    paragraphs: list[str] = []
    size = 0
    for root in roots:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for file in files:
            if size >= megabytes * 2**20:
                break
            if file.suffix == ".py":
                texts = docstrings(file)
            elif root.name in ("common-licenses", "doc") or file.suffix in (".md", ".rst", ".txt"):
                texts = [file.read_text(encoding="utf-8", errors="ignore")]
            else:
                continue
            for text in texts:
                for paragraph in prose_paragraphs(text):
                    if paragraph not in seen:
                        seen.add(paragraph)
                        paragraphs.append(paragraph)
                        size += len(paragraph.encode()) + 1
    path.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    return paragraphs


def tiktoken_style_merges(vocab: dict[str, int]) -> list[list[str]]:
    """Every split of every token into two tokens, ordered by the token's id and then the parts' ids: the
    merges of a tokenizer.json converted from a tiktoken vocabulary (Llama 3's)."""
    merges = []
    for token, rank in vocab.items():
        for at in range(1, len(token)):
            left, right = token[:at], token[at:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    return [[left, right] for _, _, _, left, right in merges]


def build_tokenizer(folder: Path, paragraphs: list[str], vocab_size: int = VOCAB) -> Path:
    """A Llama-3-kind tokenizer trained on ``paragraphs`` (``vocab_size`` merged tokens at most), saved as a
    Hugging Face folder (tokenizer.json, tokenizer_config.json and a Llama config.json, as a checkpoint has).
    tests/test_fast_tokenizer.py builds a small one with it."""
    if (folder / "tokenizer.json").exists():
        return folder
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(paragraphs, trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    spec["model"]["merges"] = tiktoken_style_merges(vocab)
    spec["model"]["ignore_merges"] = True
    names = SPECIALS + [f"<|reserved_special_token_{n}|>" for n in range(3, 3 + 256 - len(SPECIALS))]
    first = len(vocab)
    spec["added_tokens"] = [{"id": first + n, "content": name, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True} for n, name in enumerate(names)]
    bos = {"SpecialToken": {"id": SPECIALS[0], "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {SPECIALS[0]: {"id": SPECIALS[0], "ids": [first],
                                                               "tokens": [SPECIALS[0]]}}}
    Tokenizer.from_str(json.dumps(spec))  # it loads
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
        "model_max_length": 131072, "clean_up_tokenization_spaces": True}, indent=1), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": first + 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "bos_token_id": first, "eos_token_id": first + 1,
        "torch_dtype": "bfloat16"}, indent=1), encoding="utf-8")
    return folder


def build_alpaca(path: Path, paragraphs: list[str], megabytes: int) -> Path:
    """Alpaca rows from the paragraphs, seeded, until the file holds ``megabytes``."""
    if path.exists():
        return path
    rng = random.Random(0)
    target = megabytes * 2**20
    written = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target:
            sentence = rng.choice(paragraphs).split(". ")[0].rstrip(".") + "."
            instruction = rng.choice([rng.choice(INSTRUCTIONS), sentence if len(sentence) < 200 else
                                      rng.choice(INSTRUCTIONS)])
            extra = rng.choice(paragraphs) if rng.random() < 0.35 else ""
            output = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(1, 4)))
            line = json.dumps({"instruction": instruction, "input": extra, "output": output}) + "\n"
            handle.write(line)
            written += len(line.encode())
    return path


# --- the two sides ---------------------------------------------------------------------------------------------

def datasets_side(data: Path, tokenizer_dir: Path, out: Path, cache: Path, num_proc: int) -> None:
    """What a Hugging Face user writes for the same examples: load the JSONL, map a batched function over
    num_proc processes (the alpaca prompt with bos; the response without, then eos; the prompt's labels -100;
    rows too long, too short or with nothing to train dropped, as tunefile drops them), save to disk."""
    import datasets
    from transformers import AutoTokenizer

    from tunefile.runtime.data.instruction import INSTRUCT

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tokenizer.eos_token_id

    def tokenise(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = [INSTRUCT.render(i, x or "") for i, x in zip(batch["instruction"], batch["input"], strict=True)]
        prompt_ids = tokenizer(prompts)["input_ids"]
        response_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        ids_out, labels_out = [], []
        for prompt, response in zip(prompt_ids, response_ids, strict=True):
            ids = prompt + response + [eos]
            if not 2 <= len(ids) <= SEQUENCE_LEN:
                continue
            ids_out.append(ids)
            labels_out.append([-100] * len(prompt) + response + [eos])
        return {"input_ids": ids_out, "labels": labels_out}

    rows = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    mapped = rows.map(tokenise, batched=True, num_proc=num_proc, remove_columns=rows.column_names)
    mapped.save_to_disk(str(out))


def tunefile_config(case: Path, data: Path, tokenizer_dir: Path) -> Path:
    config = {"base_model": str(tokenizer_dir), "datasets": [{"path": str(data), "type": "alpaca"}],
              "dataset_prepared_path": str(case / "prepared"), "output_dir": str(case / "out"),
              "sequence_len": SEQUENCE_LEN, "micro_batch_size": 1, "val_set_size": 0.0, "train_on_inputs": False}
    (case / "cfg.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    subprocess.run([PYTHON, "-m", "tunefile.compiler", "compile", str(case / "cfg.yml"), "--target", "cpu",
                    "--output", str(case / "bundle"), "--force"], check=True, stdout=subprocess.DEVNULL)
    return case / "bundle" / "config.yaml"


# --- measuring -------------------------------------------------------------------------------------------------

def _tree(root: int) -> list[int]:
    """``root`` and every process below it (through /proc's children lists: cheap enough to sample often)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                todo.extend(int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            continue
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measured(command: list[str]) -> dict[str, float]:
    """Run ``command``; wall seconds, CPU seconds (it and its workers), largest process's peak RSS and the
    tree's peak PSS, in MiB."""
    load = round(os.getloadavg()[0], 2)  # other work on the machine shows here: the pairs share it alike
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peak[0] = max(peak[0], sum(_pss_kib(pid) for pid in _tree(child.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = child.stderr.read() if child.stderr else b""
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {stderr.decode()[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "load_before": load,
            "peak_rss_largest_process_mib": round(usage.ru_maxrss / 1024, 1),
            "peak_pss_all_processes_mib": round(peak[0] / 1024, 1)}


def tunefile_tokens(prepared: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, row lengths) of the train split tunefile wrote."""
    folder = next(prepared.glob("*/train"))
    index = json.loads((folder / "index.json").read_text())
    parts = {name: [np.load(folder / f"{shard['name']}-{name}.npy") for shard in index["shards"]]
             for name in ("input_ids", "labels", "offsets")}
    lengths = np.concatenate([np.diff(offsets) for offsets in parts["offsets"]])
    return np.concatenate(parts["input_ids"]), np.concatenate(parts["labels"]), lengths


def datasets_tokens(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import datasets

    table = datasets.load_from_disk(str(out)).data.table
    ids, labels = table.column("input_ids").combine_chunks(), table.column("labels").combine_chunks()
    lengths = np.diff(ids.offsets.to_numpy())
    return ids.values.to_numpy().astype(np.int32), labels.values.to_numpy().astype(np.int32), lengths


def run_size(work: Path, size: int, pairs: int, tokenizer_dir: Path, paragraphs: list[str],
             cores: int) -> dict[str, Any]:
    case = work / f"{size}mb"
    case.mkdir(parents=True, exist_ok=True)
    data = build_alpaca(case / "alpaca.jsonl", paragraphs, size)
    config = tunefile_config(case, data, tokenizer_dir)
    subprocess.run(["cat", str(data)], check=True, stdout=subprocess.DEVNULL)  # both sides read a warm file
    sides = {
        "tunefile": ([PYTHON, "-m", "tunefile.runtime", "preprocess", str(config)], [case / "prepared"]),
        "datasets": ([PYTHON, __file__, "datasets-side", "--data", str(data), "--tokenizer", str(tokenizer_dir),
                      "--out", str(case / "hf-out"), "--cache", str(case / "hf-cache"), "--num-proc", str(cores)],
                     [case / "hf-out", case / "hf-cache"]),
    }
    runs: dict[str, list[dict[str, float]]] = {"tunefile": [], "datasets": []}
    for pair in range(pairs):
        for side in (("tunefile", "datasets") if pair % 2 == 0 else ("datasets", "tunefile")):
            command, outputs = sides[side]
            for output in outputs:
                shutil.rmtree(output, ignore_errors=True)
            runs[side].append(measured(command))
            print(f"  {size} MB pair {pair + 1} {side}: {runs[side][-1]}", flush=True)
    mine, theirs = tunefile_tokens(case / "prepared"), datasets_tokens(case / "hf-out")
    identical = all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))
    output_mb = {"tunefile": sum(f.stat().st_size for f in (case / "prepared").rglob("*") if f.is_file()) / 1e6,
                 "datasets": sum(f.stat().st_size for f in (case / "hf-out").rglob("*") if f.is_file()) / 1e6}
    stats = json.loads(next((case / "prepared").glob("*/stats.json")).read_text())
    ratios = [d["wall_s"] / t["wall_s"] for t, d in zip(runs["tunefile"], runs["datasets"], strict=True)]
    cpu_ratios = [d["cpu_s"] / t["cpu_s"] for t, d in zip(runs["tunefile"], runs["datasets"], strict=True)]
    return {"input_mb": round(data.stat().st_size / 1e6, 1), "rows": stats["rows"], "examples": len(mine[2]),
            "tokens": int(len(mine[0])), "identical_ids_and_labels": bool(identical),
            "tokenizer_engine": stats["datasets"][0].get("tokenizer_engine"),
            "output_mb": {k: round(v, 1) for k, v in output_mb.items()}, "runs": runs,
            "wall_speedup_per_pair": [round(r, 2) for r in ratios],
            "wall_speedup_median": round(float(np.median(ratios)), 2),
            "cpu_ratio_median": round(float(np.median(cpu_ratios)), 2)}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("tunefile", "tiktoken", "tokenizers", "transformers", "datasets", "numpy", "pyarrow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "datasets-side":
        parser = argparse.ArgumentParser()
        for flag in ("--data", "--tokenizer", "--out", "--cache"):
            parser.add_argument(flag, type=Path, required=True)
        parser.add_argument("--num-proc", type=int, required=True)
        args = parser.parse_args(sys.argv[2:])
        datasets_side(args.data, args.tokenizer, args.out, args.cache, args.num_proc)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 250])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunefile-vs-datasets"))
    parser.add_argument("--results", type=Path, default=BENCH / "results" / "preprocess_vs_datasets.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    paragraphs = build_corpus(args.work / "corpus.txt", CORPUS_MB)
    print(f"corpus: {len(paragraphs):,} paragraphs", flush=True)
    began = time.perf_counter()
    tokenizer_dir = build_tokenizer(args.work / "llama3-kind-tokenizer", paragraphs)
    print(f"tokenizer: {tokenizer_dir} ({time.perf_counter() - began:.0f} s)", flush=True)
    results = {str(size): run_size(args.work, size, args.pairs, tokenizer_dir, paragraphs, cores)
               for size in args.sizes_mb}
    print(f"\n{'input':>8} {'rows':>9} {'tokens':>12} {'side':>9} {'wall s':>16} {'cpu s':>16} "
          f"{'peak RSS MiB':>14} {'tree PSS MiB':>14}")
    for size, result in results.items():
        for side in ("tunefile", "datasets"):
            runs = result["runs"][side]
            print(f"{result['input_mb']:>6} MB {result['rows']:>9,} {result['tokens']:>12,} {side:>9} "
                  f"{'/'.join(str(r['wall_s']) for r in runs):>16} {'/'.join(str(r['cpu_s']) for r in runs):>16} "
                  f"{max(r['peak_rss_largest_process_mib'] for r in runs):>14} "
                  f"{max(r['peak_pss_all_processes_mib'] for r in runs):>14}")
        print(f"{size:>6} MB: tunefile {result['wall_speedup_median']}x datasets' wall-time throughput (median), "
              f"identical ids and labels: {result['identical_ids_and_labels']}")
    record = {"benchmark": "preprocess_vs_datasets", "date": date.today().isoformat(),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": cores,
                          "python": platform.python_version()},
              "versions": versions(), "sequence_len": SEQUENCE_LEN,
              "text": "prose paragraphs of the Python standard library's and site-packages' docstrings and "
                      ".md/.rst/.txt files, /usr/share/common-licenses and /usr/share/doc",
              "tokenizer": f"byte-level BPE, Llama 3's split regex, {VOCAB:,} tokens + 256 special, trained locally",
              "results": results}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
