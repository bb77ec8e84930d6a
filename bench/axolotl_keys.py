"""Write compiler/dialect/axolotl_keys.json: every key of Axolotl's config schema, with its default.

    python bench/axolotl_keys.py [--corpus DIR] [--version 0.19.0]

Reads Axolotl's pydantic schema classes (``src/axolotl/utils/schemas/`` and the plugins' ``args.py``) from
its source release with ``ast``, without importing Axolotl: the top-level keys are the fields of
``AxolotlInputConfig`` and its base classes plus every plugin's arguments; dataset keys those of the dataset
classes; ``fsdp_config`` keys those of ``FSDPConfig``. A default that is not a plain literal is recorded as
null ("none that tunefile compares with"). The compiler reads the JSON to tell Axolotl's keys from typos, and
to accept a key it does not carry out when the config leaves it at Axolotl's own default.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from axolotl_corpus import fetch_corpus

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "compiler" / "dialect" / "axolotl_keys.json"
DATASET_CLASSES = ("SFTDataset", "PretrainingDataset", "DPODataset", "KTODataset", "StepwiseSupervisedDataset")


def _classes(files: list[Path]) -> dict[str, ast.ClassDef]:
    found = {}
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, node)
    return found


def _default(value: ast.expr | None) -> object:
    if value is None:
        return None
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
        candidates = [kw.value for kw in value.keywords if kw.arg == "default"] or value.args[:1]
        value = candidates[0] if candidates else None
        if value is None:
            return None
    try:
        literal = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError):
        return None
    return literal if isinstance(literal, (bool, int, float, str, list, dict)) or literal is None else None


def _fields(name: str, classes: dict[str, ast.ClassDef], seen: set[str] | None = None) -> dict[str, object]:
    seen = seen if seen is not None else set()
    if name in seen or name not in classes:
        return {}
    seen.add(name)
    node = classes[name]
    fields: dict[str, object] = {}
    for base in node.bases:
        if isinstance(base, ast.Name):
            fields.update(_fields(base.id, classes, seen))
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.target.id != "model_config":
            fields[item.target.id] = _default(item.value)
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path.home() / ".cache" / "tunefile")
    parser.add_argument("--version", default="0.19.0")
    args = parser.parse_args()
    source = fetch_corpus(args.corpus, args.version) / "src" / "axolotl"
    schema_files = sorted((source / "utils" / "schemas").rglob("*.py"))
    plugin_files = sorted((source / "integrations").glob("*/args.py"))
    classes = _classes(schema_files + plugin_files)
    top = _fields("AxolotlInputConfig", classes)
    for plugin in plugin_files:
        for node in ast.parse(plugin.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                top.update(_fields(node.name, classes))
    datasets: dict[str, object] = {}
    for name in DATASET_CLASSES:
        datasets.update(_fields(name, classes))
    catalogue = {"axolotl_version": args.version, "top_level": dict(sorted(top.items())),
                 "datasets": dict(sorted(datasets.items())),
                 "fsdp_config": dict(sorted(_fields("FSDPConfig", classes).items()))}
    OUTPUT.write_text(json.dumps(catalogue, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"{OUTPUT.relative_to(ROOT)}: {len(top)} top-level, {len(datasets)} dataset and "
          f"{len(catalogue['fsdp_config'])} fsdp_config keys of Axolotl {args.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
