"""Compile speed: whole-process `tunefile compile` time (median of 20) and `tunefile check` over 100 configs.

Target (issues 2 and 13): under 0.3 s per compile on the 2-core CI machine, with no torch import.
Prints a table and writes bench/results/compile_speed.json.

tunefile's own modules are byte-compiled first, as `pip install` of a wheel does: an editable install under
PYTHONDONTWRITEBYTECODE=1 (this machine's environment sets it) would otherwise compile every module from source
in every process, which is most of a compile's time. Three references are measured beside it, interleaved in
the same run: a bare Python's start (`python -c pass`), and Python importing the compiler's dependencies that a
compile loads (click, PyYAML, Jinja2, and pydantic with one model class built), with and without pydantic. They
are the machine's floor: no change to tunefile's own code can take a compile below the second.

    python bench/compile_speed.py [--runs 20] [--configs 100] [--results PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests" / "golden_configs" / "lora-single.yml"
RESULTS = REPO / "bench" / "results" / "compile_speed.json"
TARGET_SECONDS = 0.3
# The references: what a compile's process costs before any of tunefile's code runs. pydantic imports most of
# itself, and looks up its plugins, when the first model class is built, so one tiny model stands for that.
# (jsonschema, the fifth dependency, serves `tunefile schema --check`; a compile does not import it.)
REFERENCES = {
    "python -c pass": "pass",
    "python + click, PyYAML, Jinja2 + a pydantic model": (
        "import click, yaml, jinja2\nfrom pydantic import BaseModel\nclass Model(BaseModel):\n    x: int = 0\n"),
    "the same without pydantic": "import click, yaml, jinja2",
}


def tunefile_command() -> list[str]:
    """The installed console script, as users run it (falls back to the module)."""
    script = Path(sys.executable).parent / "tunefile"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tunefile.compiler.cli"]


def byte_compile_tunefile() -> list[str]:
    """Write the .pyc files of tunefile's packages (compileall writes them whatever PYTHONDONTWRITEBYTECODE says)."""
    code = ("import compileall, importlib, sys\n"
            "for name in ('compiler', 'runtime', 'schemas'):\n"
            "    for folder in importlib.import_module('tunefile.' + name).__path__:\n"
            "        compileall.compile_dir(folder, quiet=1)\n"
            "        print(folder)\n")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return done.stdout.split()


def imports_torch(command: list[str], cwd: Path) -> bool:
    """Whether a compile imports torch (it must not: the compiler runs on login nodes without it)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return any(line.split("|")[-1].strip() == "torch" for line in done.stderr.splitlines() if "|" in line)


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (Linux), so that figures from two machines are told apart."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else "unknown"


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--configs", type=int, default=100)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes (default: %(default)s)")
    args = parser.parse_args()
    tunefile = tunefile_command()
    compiled = byte_compile_tunefile()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        compile_command = [*tunefile, "compile", str(CONFIG), "--output", str(work / "bundle"), "--force"]
        timed(compile_command, work)  # warm the file cache
        torch_imported = imports_torch(compile_command, work)
        compile_times: list[float] = []
        reference_times: dict[str, list[float]] = {name: [] for name in REFERENCES}
        for _ in range(args.runs):  # interleaved, so that all see the same load
            compile_times.append(timed(compile_command, work))
            for name, code in REFERENCES.items():
                reference_times[name].append(timed([sys.executable, "-c", code], work))
        configs, golden = work / "configs", work / "golden"
        configs.mkdir()
        shutil.copytree(CONFIG.parent / "targets", configs / "targets")
        text = CONFIG.read_text(encoding="utf-8")
        for index in range(args.configs):
            (configs / f"case{index:03d}.yml").write_text(text.replace("lora_r: 32", f"lora_r: {index + 1}"))
        timed([*tunefile, "check", str(configs), "--golden", str(golden), "--update"], work)
        check_seconds = timed([*tunefile, "check", str(configs), "--golden", str(golden)], work)

    median = statistics.median(compile_times)
    references = {name: statistics.median(times) for name, times in reference_times.items()}
    python_median = references["python -c pass"]
    result = {
        "benchmark": "compile_speed",
        "config": str(CONFIG.relative_to(REPO)),
        "runs": args.runs,
        "compile_median_s": round(median, 4),
        "compile_min_s": round(min(compile_times), 4),
        "compile_max_s": round(max(compile_times), 4),
        "python_start_median_s": round(python_median, 4),
        "compile_over_python_start": round(median / python_median, 2),
        "reference_medians_s": {name: round(seconds, 4) for name, seconds in references.items()},
        "imports_torch": torch_imported,
        "bytecode": f"compiled first for {len(compiled)} package folder(s), as pip install of a wheel does",
        "check_configs": args.configs,
        "check_total_s": round(check_seconds, 3),
        "check_per_config_s": round(check_seconds / args.configs, 4),
        "target_compile_s": TARGET_SECONDS,
        "meets_target": median < TARGET_SECONDS and not torch_imported,
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    rows = [
        ("compile, whole process (median)", f"{median:.3f} s", f"< {TARGET_SECONDS} s"),
        ("compile, min / max", f"{min(compile_times):.3f} / {max(compile_times):.3f} s", ""),
        *((f"{name} (median)", f"{seconds:.3f} s", "") for name, seconds in references.items()),
        ("compile imports torch", "yes" if torch_imported else "no", "no"),
        (f"check {args.configs} configs (one process)", f"{check_seconds:.2f} s", ""),
        ("check, per config", f"{check_seconds / args.configs * 1000:.1f} ms", ""),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"{'measure':<{width}}  {'value':>16}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>16}  {target}")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
