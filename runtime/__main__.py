"""`python -m tunefile.runtime COMMAND ...`: the runtime's entry point, run by a bundle's launch.sh.

Commands: train CONFIG, preprocess CONFIG [--show N], tiny-model DIR [--arch NAME].
Each imports only what it needs, so `preprocess` never loads a model.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunefile.runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a bundle's config.yaml")
    train.add_argument("config")

    preprocess = commands.add_parser("preprocess", help="tokenise into dataset_prepared_path and summarise")
    preprocess.add_argument("config")
    preprocess.add_argument("--show", type=int, default=0, metavar="N",
                            help="print N tokenised examples with the trained tokens marked")

    tiny = commands.add_parser("tiny-model", help="build a tiny random model and tokenizer for tests and demos")
    tiny.add_argument("directory")
    tiny.add_argument("--arch", choices=("llama", "mistral", "qwen2"), default="llama")

    args = parser.parse_args(argv)
    from .config import ConfigFileError
    from .data.errors import DataError

    try:
        if args.command == "train":
            from .train import run_training

            return run_training(args.config)
        if args.command == "preprocess":
            from .data.preprocess import run_preprocess

            return run_preprocess(args.config, show=args.show)
        from .tiny_model import build_tiny_model

        build_tiny_model(args.directory, arch=args.arch)
        return 0
    except (ConfigFileError, DataError) as exc:
        # Problems the user fixes in their config or data: one line, no traceback.
        print(f"tunefile runtime: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
