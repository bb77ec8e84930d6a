"""How much of Axolotl's own example configs tunefile compiles, unmodified.

    python bench/axolotl_corpus.py [--corpus DIR] [--version 0.19.0] [--show N]

The corpus is Axolotl's source release (its ``examples/`` folder), fetched from the package index
with ``pip download --no-binary`` into ``--corpus`` (default ``~/.cache/tunefile``); it is never
copied into this repository. Every ``examples/**/*.y*ml`` file with a ``base_model`` is a training
config. RL configs (``rl:`` set) and multimodal ones (``processor_type`` set) must be refused with
one line naming the feature; every other config must compile with ``--gpu h100-80gb`` and the GPU
count it is written for: 1, or 8 (one node) when it shards the model (DeepSpeed, FSDP) or sets
parallel sizes whose product says otherwise.

Prints a table and writes ``bench/results/axolotl_corpus.json``; ``--show`` prints the most common
refusal lines, which is where the next piece of dialect work is.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "axolotl_corpus.json"
PARALLEL_KEYS = ("tensor_parallel_size", "context_parallel_size", "dp_shard_size", "dp_replicate_size",
                 "expert_parallel_size")


def fetch_corpus(corpus: Path, version: str) -> Path:
    """Axolotl's source tree at ``version``, downloaded once and unpacked under ``corpus``."""
    tree = corpus / f"axolotl-{version}"
    if (tree / "examples").is_dir():
        return tree
    corpus.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"axolotl=={version}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(corpus)], check=True, capture_output=True)
    with tarfile.open(corpus / f"axolotl-{version}.tar.gz") as archive:
        archive.extractall(corpus, filter="data")
    return tree


def training_configs(tree: Path) -> list[Path]:
    found = []
    for path in sorted((tree / "examples").rglob("*")):
        if path.suffix not in (".yml", ".yaml") or not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and data.get("base_model"):
            found.append(path)
    return found


def kind_of(data: dict) -> str:
    if data.get("rl"):
        return "rl"
    if data.get("processor_type"):
        return "multimodal"
    return "sft"


def gpus_for(data: dict) -> int:
    product = 1
    for key in PARALLEL_KEYS:
        value = data.get(key)
        if isinstance(value, int) and value > 1:
            product *= value
    if product > 1:
        return product
    return 8 if data.get("deepspeed") or data.get("fsdp") or data.get("fsdp_config") else 1


def layout(gpus: int) -> tuple[int, int]:
    """(nodes, GPUs per node) for a GPU count: nodes of eight H100s."""
    return (1, gpus) if gpus <= 8 else (-(-gpus // 8), 8)


def compile_one(path: Path, gpus: int, out: Path) -> tuple[str, list[str]]:
    """('ok' | 'refused' | 'crashed', the error lines)."""
    from tunefile.compiler.errors import ConfigError
    from tunefile.compiler.pipeline import Sources, TargetOptions, compile_config

    sources = Sources()
    try:
        nodes, per_node = layout(gpus)
        compile_config(path, TargetOptions(gpu="h100-80gb", nodes=nodes, gpus_per_node=per_node), sources)
    except ConfigError as exc:
        lines = [sources.format(problem).split("\n")[0] for problem in sources.in_file_order(exc.problems)]
        return "refused", lines
    except Exception:  # noqa: BLE001 - a crash is exactly what this benchmark looks for
        return "crashed", traceback.format_exc().splitlines()[-3:]
    return "ok", []


def corpus_keys(paths: list[Path]) -> set[str]:
    """Every key the configs write: top-level ones, datasets[].key and fsdp_config.key."""
    keys: set[str] = set()
    for path in paths:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        keys |= set(data)
        for entry in data.get("datasets") or []:
            if isinstance(entry, dict):
                keys |= {f"datasets[].{key}" for key in entry}
        if isinstance(data.get("fsdp_config"), dict):
            keys |= {f"fsdp_config.{key}" for key in data["fsdp_config"]}
    return keys


def missing_from_readme(keys: set[str]) -> list[str]:
    """Keys the README's config reference does not name (fsdp_-prefixed keys are listed under their plain
    name, with one line saying so)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = []
    for key in sorted(keys):
        plain = key.replace("fsdp_config.fsdp_", "fsdp_config.")
        names = {f"`{key}`", f"`{plain}`", f"`{key}: true`", f"`{key}: [", f"`plugins: [{key}"}
        if key == "fsdp_config.fsdp_version":
            names.add("`fsdp_version`")
        if not any(name in readme for name in names):
            missing.append(key)
    return missing


def _pattern(line: str, tree: Path) -> str:
    """An error line without its file and position, to count how often each kind occurs."""
    text = line.replace(str(tree) + "/", "")
    return re.sub(r"^\S+?:\d+:\d+: ", "", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path.home() / ".cache" / "tunefile")
    parser.add_argument("--version", default="0.19.0")
    parser.add_argument("--show", type=int, default=25, help="print the N most common refusal lines")
    parser.add_argument("--list", action="store_true", help="print every refused file with its lines")
    args = parser.parse_args()

    tree = fetch_corpus(args.corpus, args.version)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for path in training_configs(tree):
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            kind, gpus = kind_of(data), gpus_for(data)
            outcome, lines = compile_one(path, gpus, Path(scratch))
            rows.append({"file": str(path.relative_to(tree)), "kind": kind, "gpus": gpus,
                         "outcome": outcome, "lines": lines})

    def expected(row: dict) -> bool:
        if row["kind"] == "sft":
            return row["outcome"] == "ok"
        return row["outcome"] == "refused" and len(row["lines"]) == 1 and row["kind"] in row["lines"][0].lower()

    from tunefile.compiler.dialect.normalize import axolotl_catalogue

    catalogue = axolotl_catalogue()
    schema_keys = {*catalogue.top_level, *(f"datasets[].{key}" for key in catalogue.datasets),
                   *(f"fsdp_config.{key}" for key in catalogue.fsdp_config)}
    unlisted = missing_from_readme(corpus_keys(training_configs(tree)))
    unlisted_axolotl = [key for key in unlisted if key in schema_keys]
    table = collections.Counter((row["kind"], row["outcome"]) for row in rows)
    sft = [row for row in rows if row["kind"] == "sft"]
    sft_ok = sum(row["outcome"] == "ok" for row in sft)
    others = [row for row in rows if row["kind"] != "sft"]
    others_ok = sum(expected(row) for row in others)
    crashed = sum(row["outcome"] == "crashed" for row in rows)
    print(f"Axolotl {args.version} example training configs: {len(rows)}")
    print(f"{'kind':<12}{'outcome':<10}{'files':>6}")
    for (kind, outcome), count in sorted(table.items()):
        print(f"{kind:<12}{outcome:<10}{count:>6}")
    print(f"\nSFT configs compiling unmodified: {sft_ok}/{len(sft)} ({100 * sft_ok / max(len(sft), 1):.1f}%)")
    print(f"RL/multimodal refused with one line naming the feature: {others_ok}/{len(others)}")
    print(f"crashes (tracebacks): {crashed}")
    print(f"Axolotl keys the configs use that the README's config reference does not name: "
          f"{len(unlisted_axolotl)}; other keys they use (not in Axolotl's schema, unknown to tunefile): "
          f"{', '.join(key for key in unlisted if key not in unlisted_axolotl) or 'none'}")

    if args.show:
        patterns = collections.Counter(_pattern(line, tree) for row in sft if row["outcome"] != "ok"
                                       for line in row["lines"])
        print(f"\nMost common refusal lines ({sum(patterns.values())} in all):")
        for line, count in patterns.most_common(args.show):
            print(f"{count:>5}  {line[:150]}")
    if args.list:
        for row in rows:
            if not expected(row):
                print(f"\n{row['file']} ({row['kind']}, {row['gpus']} GPUs, {row['outcome']})")
                for line in row["lines"]:
                    print("   " + _pattern(line, tree)[:160])

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "axolotl_version": args.version, "files": len(rows), "sft": len(sft), "sft_compiled": sft_ok,
        "sft_compiled_percent": round(100 * sft_ok / max(len(sft), 1), 1),
        "rl_or_multimodal": len(others), "rl_or_multimodal_refused_in_one_line": others_ok,
        "crashes": crashed, "axolotl_keys_missing_from_readme": unlisted_axolotl,
        "non_axolotl_keys_used": [key for key in unlisted if key not in unlisted_axolotl],
        "not_as_expected": [{key: row[key] for key in ("file", "kind", "gpus", "outcome", "lines")}
                            for row in rows if not expected(row)],
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
