"""Where a run's set-up time goes, function by function (issue 13, target 5: time to first step).

    python bench/startup_profile.py BUNDLE --cwd WORK [--out profile.txt]

Runs the bundle's runtime set-up (the Trainer's ``setup``: accelerator, tokenizer and data, model, wrapping) in
this one process under cProfile, from the directory the bundle is launched in, and writes the functions with the
most cumulative and the most own time. One process: a bundle compiled for one GPU (or the CPU); the phases the
startup clock reports (train_summary.json's ``startup``) say which part to look into, this says why. The imports
before set-up are timed separately, since the runtime imports most of its stack at module level.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--cwd", type=Path, required=True, help="where the bundle is launched from")
    parser.add_argument("--out", type=Path, default=None, help="default: stdout")
    parser.add_argument("--lines", type=int, default=45)
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    archive = next(bundle.glob("tunefile-runtime-*.pyz"))
    sys.path.insert(0, str(archive))  # the bundle's own runtime, as launch.sh puts it first
    os.chdir(args.cwd)

    started = time.perf_counter()
    profile = cProfile.Profile()
    profile.enable()
    from tunefile.runtime.config import load_run_plan
    from tunefile.runtime.train import Trainer
    profile.disable()
    imports = time.perf_counter() - started

    trainer = Trainer(load_run_plan(bundle / "config.yaml"))
    started = time.perf_counter()
    profile.enable()
    trainer.setup()
    profile.disable()
    setup = time.perf_counter() - started

    text = io.StringIO()
    text.write(f"imports {imports:.2f} s, setup {setup:.2f} s; phases: {trainer.clock.phases}\n\n")
    for order in ("cumulative", "tottime"):
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(args.lines)
    if args.out:
        args.out.write_text(text.getvalue(), encoding="utf-8")
    print(text.getvalue()[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
