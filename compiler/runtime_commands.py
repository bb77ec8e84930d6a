"""The commands that hand work to the runtime: train, preprocess, merge-lora, inference, tiny-model.

Each compiles the user's config (the same pipeline as `tunefile compile`) and runs
`python -m tunefile.runtime COMMAND BUNDLE/config.yaml` in a subprocess, so the compiler itself never
imports torch. `train` compiles into <output_dir>/bundle, the record of what trained the model; the
others compile into a temporary bundle and leave that record alone.

The commands belong to no group here: cli.py adds RUNTIME_COMMANDS to the `tunefile` group, so this module
imports only cli_common and never cli.py itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from .cli_common import output_problem, print_warnings, reports_problems, target_flags, target_options
from .errors import EXIT_INVALID


def _run(command: list[str], env: dict[str, str] | None = None, *, own_process_group: bool = False) -> int:
    """Run COMMAND to its end and return its exit status. A SIGTERM sent to tunefile, as a process supervisor
    sends it, is passed on: the child (a training launch, a merge, a chat server) would otherwise outlive it.
    Ctrl-C reaches both already (the terminal signals the whole process group).

    ``own_process_group``: the child leads a process group of its own and signals go to the whole group. For
    launch.sh, which waits for `accelerate launch` rather than exec'ing it (to pass the runtime's exit status
    on): a signal to bash alone would leave the ranks training. Not for commands that read the terminal
    (inference), which must stay in its foreground group."""
    import signal
    import subprocess

    child = subprocess.Popen(command, env=env, start_new_session=own_process_group)

    def forward(signum: int, _frame: Any = None) -> None:
        if own_process_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signum)
        else:
            child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    except KeyboardInterrupt:  # the child got the Ctrl-C too, unless it has a group of its own
        if own_process_group:
            forward(signal.SIGINT)
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N


def _run_runtime(*args: str) -> int:
    """`python -m tunefile.runtime ARGS` in this environment; the compiler itself never imports torch."""
    return _run([sys.executable, "-m", "tunefile.runtime", *args])


def _compile(config: Path, sources: Any, options: Any) -> Any:
    """The compiled bundle's files, its warnings printed (the same pipeline as `tunefile compile`)."""
    from .pipeline import compile_config

    # The offline preflight (offline: true) as in `tunefile compile`: a missing model stops here, located.
    compilation = compile_config(config, options, sources, preflight=True)
    print_warnings(compilation.plan, sources)
    return compilation


def _compile_own_bundle(config: Path, sources: Any, options: Any) -> Path:
    """Compile into <output_dir>/bundle, replacing the bundle a previous `train` left there, and nothing else:
    with `output_dir: .` that path is ./bundle, which may well be the user's own folder."""
    from .bundle import BundleLocationError, is_occupied, is_tunefile_bundle, write_bundle
    from .errors import ConfigError, Problem

    compilation = _compile(config, sources, options)
    out_dir = Path(compilation.plan.spec.output_dir) / "bundle"
    if is_occupied(out_dir) and not is_tunefile_bundle(out_dir):
        raise ConfigError([Problem(("output_dir",), f"{out_dir} exists and is not a tunefile bundle (it has no "
                                   "tunefile manifest.json); train writes its bundle there: move it away or choose "
                                   "another output_dir")])
    try:
        write_bundle(compilation.all_files(), out_dir, force=True)  # the runtime archive too: a bundle like compile's
    except (BundleLocationError, OSError) as exc:
        raise ConfigError([output_problem(exc, flag=None)]) from None
    click.echo(f"Compiled {config} into {out_dir}/ (target {compilation.plan.target.name})", err=True)
    return out_dir


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@target_flags
@reports_problems
def train(config: Path, sources: Any, **flags: Any) -> None:
    """Compile CONFIG into <output_dir>/bundle and run its launch.sh (detects the local GPUs by default)."""
    from dataclasses import replace

    options = replace(target_options(**flags), fallback_target="detect")
    bundle = _compile_own_bundle(config, sources, options)
    # launch.sh starts `accelerate` from PATH; put this interpreter's scripts first, so that a tunefile run
    # from a virtual environment that is not activated launches with that environment's accelerate.
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}
    sys.exit(_run(["bash", str(bundle / "launch.sh")], env=env, own_process_group=True))


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--show", type=int, default=0, metavar="N", help="Print N tokenised examples, trained tokens marked.")
@target_flags
@reports_problems
def preprocess(config: Path, show: int, sources: Any, **flags: Any) -> None:
    """Tokenise CONFIG's datasets into dataset_prepared_path and print a summary."""
    # A temporary bundle: <output_dir>/bundle stays the record of what trained (or will train) the model.
    with _temporary_bundle(config, sources, target_options(**flags)) as bundle:
        code = _run_runtime("preprocess", str(bundle / "config.yaml"), "--show", str(show))
    sys.exit(code)


@contextmanager
def _temporary_bundle(config: Path, sources: Any, options: Any) -> Iterator[Path]:
    """Compile CONFIG into a bundle that lives as long as the command. preprocess, merge-lora and inference
    read the current config (shrink_embeddings, a new chat template) and must not replace
    <output_dir>/bundle, the record of what trained the model."""
    import tempfile

    from .bundle import write_bundle

    compilation = _compile(config, sources, options)
    with tempfile.TemporaryDirectory(prefix="tunefile-bundle-") as temp:
        bundle = Path(temp) / "bundle"
        write_bundle(compilation.files, bundle, force=True)
        yield bundle


def _lora_dir_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--lora-dir", type=click.Path(path_type=Path),
                        help="Adapter folder, or a checkpoint-<step> folder (default: the config's "
                             "output_dir).")(command)


@click.command(name="merge-lora")
@click.argument("config", type=click.Path(path_type=Path))
@_lora_dir_option
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Merged model folder (default: <output_dir>/merged).")
@click.option("--cpu", is_flag=True, help="Merge on the CPU (when the GPU is too small for the base model).")
@target_flags
@reports_problems
def merge_lora(config: Path, lora_dir: Path | None, output: Path | None, cpu: bool, sources: Any,
               **flags: Any) -> None:
    """Merge the LoRA/QLoRA adapter into the base model and save a full model (safetensors and tokenizer)."""
    # --flag=VALUE throughout: a value that starts with "-" stays a value for the runtime's parser.
    args = [*([f"--lora-dir={lora_dir}"] if lora_dir else []), *([f"--output={output}"] if output else []),
            *(["--cpu"] if cpu else [])]
    with _temporary_bundle(config, sources, target_options(**flags)) as bundle:
        code = _run_runtime("merge-lora", str(bundle / "config.yaml"), *args)
    sys.exit(code)


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@_lora_dir_option
@click.option("--base-only", is_flag=True, help="Talk to the base model without the adapter.")
@click.option("--prompt", metavar="TEXT", help="One prompt (`-`: all of stdin). Default: one prompt per stdin line.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 = greedy decoding: the same reply every time.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--cpu", is_flag=True, help="Run on the CPU even when there is a GPU.")
@click.option("--gradio", is_flag=True, help="Serve a chat page in the browser (needs the `ui` extra).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the chat page listens on.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=7860, show_default=True)
@target_flags
@reports_problems
def inference(config: Path, lora_dir: Path | None, base_only: bool, prompt: str | None, max_new_tokens: int,
              temperature: float, top_p: float, cpu: bool, gradio: bool, host: str, port: int, sources: Any,
              **flags: Any) -> None:
    """Generate with the trained model: stream replies to prompts, or chat in the browser with --gradio."""
    if lora_dir and base_only:
        click.echo("tunefile: --lora-dir and --base-only exclude each other; give one", err=True)
        sys.exit(EXIT_INVALID)
    args = [*([f"--lora-dir={lora_dir}"] if lora_dir else []), *(["--base-only"] if base_only else []),
            *([f"--prompt={prompt}"] if prompt is not None else []), f"--max-new-tokens={max_new_tokens}",
            f"--temperature={temperature}", f"--top-p={top_p}", *(["--cpu"] if cpu else []),
            *(["--gradio", f"--host={host}", f"--port={port}"] if gradio else [])]
    with _temporary_bundle(config, sources, target_options(**flags)) as bundle:
        code = _run_runtime("inference", str(bundle / "config.yaml"), *args)
    sys.exit(code)


@click.command(name="tiny-model")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["llama", "mistral", "qwen2", "llama4"]), default="llama", show_default=True)
def tiny_model(directory: Path, arch: str) -> None:
    """Build a tiny random model with a locally trained tokenizer in DIRECTORY (tests, demos, smoke runs)."""
    sys.exit(_run_runtime("tiny-model", str(directory), "--arch", arch))


@click.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
def doctor(bundle: Path | None) -> None:
    """Check this machine for BUNDLE (Python, torch and CUDA, GPUs, bf16, packages, disk, the offline cache, the
    runtime); without BUNDLE, for training in general. One line per check; exit 1 when something is missing."""
    sys.exit(_run_runtime("doctor", *([str(bundle)] if bundle else [])))


RUNTIME_COMMANDS = (train, preprocess, merge_lora, inference, tiny_model, doctor)
