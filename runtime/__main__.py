"""`python -m tunefile.runtime COMMAND ...`: the runtime's entry point, run by a bundle's launch.sh.

Commands: train CONFIG, preprocess CONFIG [--show N], tiny-model DIR [--arch NAME],
merge-lora CONFIG [--lora-dir DIR] [--output DIR] [--cpu],
inference CONFIG [--lora-dir DIR | --base-only] [--prompt TEXT] [--gradio] …,
check-stack MANIFEST (train's first check, alone: installed package versions; imports none of them),
doctor [BUNDLE] (will this machine run the bundle? one line per check).
Each imports only what it needs, so `preprocess` never loads a model.
"""

from __future__ import annotations

import argparse
import sys


def leave_now(code: int) -> int:
    """End a finished training process without the interpreter's teardown.

    Everything is on disk and the process group is destroyed by then. What is left is C++ destructors of
    libraries imported along the way (accelerate imports DeepSpeed while unwrapping the model for the final
    save, and DeepSpeed pulls in torch's compiler machinery): one of them, seen once in CI, aborted a rank
    with "terminate called without an active exception" after a complete run, which turns a finished job
    into a failed one. Flush what Python buffers, then exit with the run's own code."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def quiet_deepspeed_without_a_gpu() -> None:
    """Where DeepSpeed is installed, transformers and accelerate import it, and on a machine without a GPU it
    announces on stdout that it chose the CPU: stdout that carries merge-lora's result and inference's
    replies. Naming the CPU for it, which is what it would choose, keeps it quiet."""
    import os

    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def report_user_error(exc: Exception, *, debug: bool) -> int:
    """The one place a RuntimeUserError becomes output: one line on stderr (the traceback only with --debug),
    the error's exit code, and that code in $TUNEFILE_EXIT_STATUS_FILE, where launch.sh finds it (accelerate
    launch reports any failed rank as 1). A verdict every rank reaches alike (the watchdog's) is printed by
    rank 0 alone."""
    import os
    import traceback

    code = int(getattr(exc, "exit_code", 2))
    prints = os.environ.get("RANK", "0") == "0" or not getattr(exc, "same_on_every_rank", False)
    if getattr(exc, "once_per_node", False):  # a verdict about the node's software: its first rank says it
        prints = os.environ.get("LOCAL_RANK", "0") == "0"
    if prints:
        if debug:
            traceback.print_exception(exc)
        print(f"tunefile runtime: {exc}", file=sys.stderr, flush=True)
    from .preemption import write_exit_status

    write_exit_status(code)  # for launch.sh: accelerate launch reports any failed rank as 1
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunefile.runtime", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of configuration and data errors too")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a bundle's config.yaml")
    train.add_argument("config")

    preprocess = commands.add_parser("preprocess", help="tokenise into dataset_prepared_path and summarise")
    preprocess.add_argument("config")
    preprocess.add_argument("--show", type=int, default=0, metavar="N",
                            help="print N tokenised examples with the trained tokens marked")

    tiny = commands.add_parser("tiny-model", help="build a tiny random model and tokenizer for tests and demos")
    tiny.add_argument("directory")
    tiny.add_argument("--arch", choices=("llama", "mistral", "qwen2", "llama4"), default="llama")

    merge = commands.add_parser("merge-lora", help="merge the adapter into the base and save a full model")
    merge.add_argument("config")
    merge.add_argument("--lora-dir", help="adapter folder or checkpoint-<step> folder (default: output_dir)")
    merge.add_argument("--output", help="where the merged model goes (default: <output_dir>/merged)")
    merge.add_argument("--cpu", action="store_true", help="merge on the CPU even when there is a GPU")

    infer = commands.add_parser("inference", help="generate replies in the terminal or a browser chat page")
    infer.add_argument("config")
    which = infer.add_mutually_exclusive_group()
    which.add_argument("--lora-dir", help="adapter folder or checkpoint-<step> folder (default: output_dir)")
    which.add_argument("--base-only", action="store_true", help="the base model without the adapter")
    infer.add_argument("--prompt", help="one prompt (`-`: all of stdin); default: one prompt per stdin line")
    infer.add_argument("--max-new-tokens", type=int, default=256)
    infer.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    infer.add_argument("--top-p", type=float, default=1.0)
    infer.add_argument("--cpu", action="store_true", help="run on the CPU even when there is a GPU")
    infer.add_argument("--gradio", action="store_true", help="serve a chat page instead of reading prompts")
    infer.add_argument("--host", default="127.0.0.1")
    infer.add_argument("--port", type=int, default=7860)

    check = commands.add_parser("check-stack", help="check installed package versions against a bundle's manifest")
    check.add_argument("manifest")

    doctor = commands.add_parser("doctor", help="check this machine for a bundle (or for training in general)")
    doctor.add_argument("bundle", nargs="?")

    args = parser.parse_args(argv)
    # check-stack reads package metadata only, the doctor imports torch itself (to report it missing) and
    # preprocess tokenises without torch (and DeepSpeed): no torch import here, no second wasted.
    if args.command not in ("check-stack", "doctor", "preprocess"):
        quiet_deepspeed_without_a_gpu()
    from .errors import RuntimeUserError

    try:
        if args.command == "train":
            from .stack_check import check_bundle_stack

            check_bundle_stack(args.config)  # the packages the bundle was resolved for, before any trains
        return run_command(args)
    except RuntimeUserError as exc:
        code = report_user_error(exc, debug=args.debug)
        return leave_now(code) if args.command == "train" else code


def run_command(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .config import load_run_plan
        from .fault_injection import fault_hook_from_environment
        from .train import run_training

        plan = load_run_plan(args.config)
        return leave_now(run_training(plan, after_step=fault_hook_from_environment()))
    if args.command == "preprocess":
        from .data.preprocess import run_preprocess

        return run_preprocess(args.config, show=args.show)
    if args.command == "merge-lora":
        from .merge import run_merge

        return run_merge(args.config, lora_dir=args.lora_dir, output=args.output, cpu=args.cpu)
    if args.command == "inference":
        from .inference import Sampling, run_inference

        sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        return run_inference(args.config, lora_dir=args.lora_dir, base_only=args.base_only, prompt=args.prompt,
                             sampling=sampling, cpu=args.cpu, gradio=args.gradio, host=args.host, port=args.port)
    if args.command == "check-stack":
        from .stack_check import check_stack

        return check_stack(args.manifest)
    if args.command == "doctor":
        from .doctor import run_doctor

        return run_doctor(args.bundle)
    from .tiny_model import build_tiny_model

    build_tiny_model(args.directory, arch=args.arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
