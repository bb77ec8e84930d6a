"""`inference CONFIG [--lora-dir DIR | --base-only] [--prompt TEXT] [--gradio]`: talk to the trained model.

The model is what training produced (trained_model.py): the base with the adapter from output_dir, a
checkpoint or --lora-dir; a full fine-tune's output_dir; or the base alone with --base-only. Prompts are
formatted as the training data was (prompts.py) and replies stream (reply.py) to stdout token by token;
everything else (loading messages, warnings) goes to stderr, so `… | tee replies.txt` keeps only replies.

Prompts come from --prompt, or from stdin: one per line, each answered on its own line (a terminal shows a
"> " prompt); `--prompt -` reads all of stdin until EOF as one multi-line prompt. Lines are independent
prompts; the browser page (--gradio, chat_ui.py) keeps the conversation for chat templates.

A problem the user fixes (no trained model yet, a wrong --lora-dir, a bad plan) is raised as a
RuntimeUserError, which the entry point prints as one line (exit 2); a prompt that is not a usable row is
reported here, skipped, and makes the exit status 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import torch

from ..schemas.run_plan import Precision, RunPlan
from .config import load_run_plan
from .model import HALF, ModelLoadError
from .prompts import PromptBuilder, PromptError
from .reply import ReplyStreamer, Sampling

__all__ = ["ReplyStreamer", "Sampling", "run_inference"]

GREEDY = Sampling()  # the command line's defaults: greedy replies of at most 256 new tokens


def inference_device(cpu: bool) -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() and not cpu else torch.device("cpu")


def inference_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """The run's half precision on a GPU; fp32 on the CPU, where half-precision matmuls are slow or missing."""
    if device.type == "cuda" and precision in HALF:
        return HALF[precision]
    return torch.float32


def attention_for(attn_implementation: str, device: torch.device) -> str:
    """The run's attention kernel where this machine has it; PyTorch SDPA instead of flash-attn off a GPU."""
    from .attention import choose_packing_attention

    if device.type != "cuda" and attn_implementation.startswith("flash_attention"):
        return "sdpa"
    return choose_packing_attention(None, sample_packing=False, attn_implementation=attn_implementation,
                                    device_type=device.type)[1]


def load_reply_streamer(plan: RunPlan, *, lora_dir: str | None, base_only: bool, sampling: Sampling,
                        cpu: bool = False) -> ReplyStreamer:
    from .trained_model import load_trained_model, locate_adapter

    device = inference_device(cpu)
    output_dir = Path(plan.checkpointing.output_dir).expanduser()
    adapter, base_source = None, None
    if not base_only:
        # ReLoRA's output is the merged model, as in Axolotl: no adapter to attach.
        relora_output = plan.model.relora is not None and lora_dir is None
        if lora_dir is not None or (plan.model.adapter is not None and not relora_output):
            adapter = locate_adapter(Path(lora_dir) if lora_dir is not None else output_dir)
        elif (output_dir / "config.json").is_file():
            base_source = str(output_dir)  # a full fine-tune saved the whole model there
        else:
            raise ModelLoadError(f"{output_dir}: no trained model yet (no config.json); train first "
                                 "(`tunefile train CONFIG`) or pass --base-only to talk to the base model")
    trained = load_trained_model(plan.model, adapter, offline=plan.offline, device=device,
                                 dtype=inference_dtype(plan.model.precision, device),
                                 attn_implementation=attention_for(plan.model.attn_implementation, device),
                                 base_source=base_source)
    prompts = PromptBuilder(plan.data, trained.tokenizer)
    base = plan.model.base_model
    if adapter is not None:
        what = f"{base} + adapter {adapter.directory}"
    elif base_source is not None:
        what = f"{base_source} (fine-tuned {base})"
    else:
        what = f"{base} (no adapter)"
    print(f"tunefile inference: {what} on {device.type}; prompts formatted as {prompts.kind} data",
          file=sys.stderr)
    return ReplyStreamer(trained.model, trained.tokenizer, prompts, sampling)

def prompts_from(prompt: str | None, stdin: TextIO) -> Iterable[str]:
    """--prompt TEXT; `--prompt -`: all of stdin as one prompt; no --prompt: one prompt per stdin line."""
    if prompt == "-":
        yield stdin.read()
        return
    if prompt is not None:
        yield prompt
        return
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def answer(chat: ReplyStreamer, prompts: Iterable[str], out: TextIO) -> int:
    """Stream a reply to each prompt, one reply per line. Exit status: 2 when a prompt was not usable (a JSON
    row of the wrong shape; reported on stderr and skipped), else 0."""
    status = 0
    for prompt in prompts:
        if not prompt.strip():
            continue
        try:
            for piece in chat.stream(prompt):
                out.write(piece)
                out.flush()  # shown as it comes, also through a pipe
        except PromptError as exc:
            print(f"tunefile inference: {exc}", file=sys.stderr)
            status = 2
            continue
        out.write("\n")
        out.flush()
    return status


def run_inference(config_path: str | Path, *, lora_dir: str | None = None, base_only: bool = False,
                  prompt: str | None = None, sampling: Sampling = GREEDY, cpu: bool = False,
                  gradio: bool = False, host: str = "127.0.0.1", port: int = 7860,
                  stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Exit status: 0; 2 when a prompt was not usable; 130 after Ctrl-C. A problem the user fixes before any
    reply (the plan, the model, the adapter) raises a RuntimeUserError."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        plan = load_run_plan(config_path)
        if gradio:
            from .chat_ui import require_gradio, serve

            require_gradio()  # before minutes of model loading
        chat = load_reply_streamer(plan, lora_dir=lora_dir, base_only=base_only, sampling=sampling, cpu=cpu)
        if gradio:
            serve(chat, host=host, port=port, title=f"tunefile · {plan.model.base_model}")
            return 0
        return answer(chat, prompts_from(prompt, sys.stdin if stdin is None else stdin),
                      sys.stdout if out is None else out)
    except KeyboardInterrupt:  # Ctrl-C ends a session, also while the model loads
        print(file=sys.stderr)
        return 130
