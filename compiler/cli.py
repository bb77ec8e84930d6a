"""The `tunefile` command: parses flags, calls the pipeline, reports. All I/O happens here.

Exit codes: 0 success; 1 a difference was found (diff, verify, check); 2 the input is wrong
(config, target, flags; every problem is listed as FILE:LINE:COL: key: message); 3 internal error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_DIFFERENT, EXIT_INVALID, ConfigError

_INTERNAL_ERROR = 3


def _target_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """The hardware flags shared by every command that compiles."""
    flags = [
        click.option("--target", "target", metavar="NAME|FILE|detect",
                     help="Built-in target (see `tunefile targets`), a target file, or detect the local GPUs."),
        click.option("--nodes", type=int, help="Number of nodes (overrides the target)."),
        click.option("--gpus-per-node", type=int, help="GPUs per node; processes per node on a CPU target."),
        click.option("--gpu", metavar="NAME", help="GPU kind from the built-in catalog (overrides the target)."),
    ]
    for flag in reversed(flags):
        command = flag(command)
    return command


def _options(target: str | None, nodes: int | None, gpus_per_node: int | None, gpu: str | None):
    from .pipeline import TargetOptions

    return TargetOptions(target=target, nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu)


def _reports_problems(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ConfigError into located messages and exit 2; hide tracebacks unless --debug."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from .pipeline import Sources

        context = click.get_current_context()
        debug = bool(context.find_root().params.get("debug"))
        sources = Sources()
        try:
            return command(*args, sources=sources, **kwargs)
        except ConfigError as exc:
            for problem in sources.in_file_order(exc.problems):
                click.echo(sources.format(problem, severity="error"), err=True)
            count = len(exc.problems)
            click.echo(f"{count} error{'s' if count != 1 else ''}; nothing was written.", err=True)
            if debug:
                raise
            sys.exit(EXIT_INVALID)
        except click.exceptions.Exit:
            raise
        except BrokenPipeError:  # `tunefile explain … | head`: the reader left; not an error of ours
            sys.stderr.close()
            sys.exit(0)
        except Exception as exc:  # noqa: BLE001 - the user gets one line, --debug gets the traceback
            if debug:
                raise
            click.echo(f"tunefile: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                       "traceback)", err=True)
            sys.exit(_INTERNAL_ERROR)

    return run


def _print_warnings(plan: Any, sources: Any) -> None:
    for warning in plan.warnings:
        click.echo(sources.format(warning, severity="warning"), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
@click.version_option(package_name="tunefile")
def cli(debug: bool) -> None:
    """Compile Axolotl-style fine-tuning configs into reviewable launch bundles."""


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@_target_flags
@_reports_problems
def validate(config: Path, sources: Any, **flags: Any) -> None:
    """Check a config (and its target rules) without writing anything."""
    from .pipeline import compile_config

    plan = compile_config(config, _options(**flags), sources).plan
    _print_warnings(plan, sources)
    click.echo(f"{config}: valid ({len(plan.warnings)} warning{'s' if len(plan.warnings) != 1 else ''})")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@_target_flags
@_reports_problems
def explain(config: Path, sources: Any, **flags: Any) -> None:
    """Print the resolved plan: every choice and the reason for it."""
    from .pipeline import compile_config

    plan = compile_config(config, _options(**flags), sources).plan
    click.echo(f"Plan for {config} (tunefile {plan.tunefile_version})\n")
    width = max(len(decision.topic) for decision in plan.decisions)
    for decision in plan.decisions:
        click.echo(f"  {decision.topic:<{width}}  {decision.value}")
        click.echo(f"  {'':<{width}}    because {decision.reason}")
    if plan.warnings:
        click.echo("\nWarnings:")
        for warning in plan.warnings:
            click.echo("  " + sources.format(warning, severity="warning").replace("\n", "\n  "))


@cli.command(name="compile")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path),
              help="Bundle directory (default: <output_dir>/bundle).")
@click.option("--force", is_flag=True, help="Replace an existing non-empty bundle directory.")
@_target_flags
@_reports_problems
def compile_command(config: Path, output: Path | None, force: bool, sources: Any, **flags: Any) -> None:
    """Compile CONFIG into a launch bundle."""
    from .bundle import BundleExistsError, write_bundle
    from .pipeline import compile_config

    compilation = compile_config(config, _options(**flags), sources)
    _print_warnings(compilation.plan, sources)
    out_dir = output or Path(compilation.plan.spec.output_dir) / "bundle"
    try:
        write_bundle(compilation.files, out_dir, force=force)
    except BundleExistsError:
        click.echo(f"tunefile: {out_dir} exists and is not empty; pass --force to replace it "
                   "(nothing was written)", err=True)
        sys.exit(EXIT_INVALID)
    names = ", ".join(sorted(compilation.files))
    click.echo(f"Wrote {out_dir}/ ({names})")
    click.echo(f"Run it: bash {out_dir}/launch.sh   or on SLURM: sbatch {out_dir}/job.sbatch")
    log_dir = compilation.plan.target.slurm.log_dir
    if log_dir:
        click.echo(f"Before sbatch: mkdir -p {log_dir}   (SLURM does not create the log folder; the job fails "
                   "silently without it)")


def _run_runtime(*args: str) -> int:
    """Run `python -m tunefile.runtime ARGS` in this environment; the compiler itself never imports torch."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "tunefile.runtime", *args])


def _compile_own_bundle(config: Path, sources: Any, options: Any) -> Path:
    """Compile into <output_dir>/bundle, replacing the bundle a previous train/preprocess left there."""
    from .bundle import write_bundle
    from .pipeline import compile_config

    compilation = compile_config(config, options, sources)
    _print_warnings(compilation.plan, sources)
    out_dir = Path(compilation.plan.spec.output_dir) / "bundle"
    write_bundle(compilation.files, out_dir, force=True)
    click.echo(f"Compiled {config} into {out_dir}/ (target {compilation.plan.target.name})", err=True)
    return out_dir


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@_target_flags
@_reports_problems
def train(config: Path, sources: Any, **flags: Any) -> None:
    """Compile CONFIG into <output_dir>/bundle and run its launch.sh (detects the local GPUs by default)."""
    import subprocess
    from dataclasses import replace

    options = replace(_options(**flags), fallback_target="detect")
    bundle = _compile_own_bundle(config, sources, options)
    # launch.sh starts `accelerate` from PATH; put this interpreter's scripts first, so that a tunefile run
    # from a virtual environment that is not activated launches with that environment's accelerate.
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}
    sys.exit(subprocess.call(["bash", str(bundle / "launch.sh")], env=env))


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--show", type=int, default=0, metavar="N", help="Print N tokenised examples, trained tokens marked.")
@_target_flags
@_reports_problems
def preprocess(config: Path, show: int, sources: Any, **flags: Any) -> None:
    """Tokenise CONFIG's datasets into dataset_prepared_path and print a summary."""
    # A temporary bundle: <output_dir>/bundle stays the record of what trained (or will train) the model.
    with _temporary_bundle(config, sources, _options(**flags)) as bundle:
        code = _run_runtime("preprocess", str(bundle / "config.yaml"), "--show", str(show))
    sys.exit(code)


def _run_runtime_passing_sigterm(*args: str) -> int:
    """_run_runtime for long-running commands (merging, a chat server): a SIGTERM sent to tunefile, as a process
    supervisor sends it, is passed on to the runtime process, which would otherwise outlive it. Ctrl-C reaches
    both already (the terminal signals the whole process group)."""
    import signal
    import subprocess

    runtime = subprocess.Popen([sys.executable, "-m", "tunefile.runtime", *args])
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: runtime.send_signal(signum))
    try:
        code = runtime.wait()
    except KeyboardInterrupt:  # the runtime got the Ctrl-C too: let it finish and report its own status
        code = runtime.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N


@contextmanager
def _temporary_bundle(config: Path, sources: Any, options: Any) -> Iterator[Path]:
    """Compile CONFIG into a bundle that lives as long as the command. preprocess, merge-lora and inference
    read the current config (shrink_embeddings, a new chat template) and must not replace
    <output_dir>/bundle, the record of what trained the model."""
    import tempfile

    from .bundle import write_bundle
    from .pipeline import compile_config

    compilation = compile_config(config, options, sources)
    _print_warnings(compilation.plan, sources)
    with tempfile.TemporaryDirectory(prefix="tunefile-bundle-") as temp:
        bundle = Path(temp) / "bundle"
        write_bundle(compilation.files, bundle, force=True)
        yield bundle


def _lora_dir_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--lora-dir", type=click.Path(path_type=Path),
                        help="Adapter folder, or a checkpoint-<step> folder (default: the config's "
                             "output_dir).")(command)


@cli.command(name="merge-lora")
@click.argument("config", type=click.Path(path_type=Path))
@_lora_dir_option
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Merged model folder (default: <output_dir>/merged).")
@click.option("--cpu", is_flag=True, help="Merge on the CPU (when the GPU is too small for the base model).")
@_target_flags
@_reports_problems
def merge_lora(config: Path, lora_dir: Path | None, output: Path | None, cpu: bool, sources: Any,
               **flags: Any) -> None:
    """Merge the LoRA/QLoRA adapter into the base model and save a full model (safetensors and tokenizer)."""
    # --flag=VALUE throughout: a value that starts with "-" stays a value for the runtime's parser.
    args = [*([f"--lora-dir={lora_dir}"] if lora_dir else []), *([f"--output={output}"] if output else []),
            *(["--cpu"] if cpu else [])]
    with _temporary_bundle(config, sources, _options(**flags)) as bundle:
        code = _run_runtime_passing_sigterm("merge-lora", str(bundle / "config.yaml"), *args)
    sys.exit(code)


@cli.command()
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
@_target_flags
@_reports_problems
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
    with _temporary_bundle(config, sources, _options(**flags)) as bundle:
        code = _run_runtime_passing_sigterm("inference", str(bundle / "config.yaml"), *args)
    sys.exit(code)


@cli.command(name="tiny-model")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["llama", "mistral", "qwen2"]), default="llama", show_default=True)
def tiny_model(directory: Path, arch: str) -> None:
    """Build a tiny random model with a locally trained tokenizer in DIRECTORY (tests, demos, smoke runs)."""
    sys.exit(_run_runtime("tiny-model", str(directory), "--arch", arch))


@cli.command()
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@_target_flags
@_reports_problems
def diff(a: Path, b: Path, sources: Any, **flags: Any) -> None:
    """Unified diff of two configs' bundles, or of two bundle directories. Exit 1 when they differ."""
    from .review import load_side, unified_bundle_diff

    options = _options(**flags)
    text = unified_bundle_diff(load_side(a, options, sources), load_side(b, options, sources), str(a), str(b))
    click.echo(text, nl=False)
    sys.exit(EXIT_DIFFERENT if text else 0)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def verify(bundle: Path) -> None:
    """Check a bundle's files against its manifest. Exit 1 naming any changed file."""
    from .bundle import verify_bundle

    problems = verify_bundle(bundle)
    for problem in problems:
        click.echo(f"{bundle}: {problem}", err=True)
    if problems:
        sys.exit(EXIT_DIFFERENT)
    click.echo(f"{bundle}: every file matches manifest.json")


@cli.command()
@click.argument("configs_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--golden", "golden_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory of committed bundles, one sub-directory per config (named after its file).")
@click.option("--update", is_flag=True, help="Rewrite the golden bundles instead of comparing.")
@_target_flags
def check(configs_dir: Path, golden_dir: Path, update: bool, **flags: Any) -> None:
    """Compile every config in CONFIGS_DIR and compare with golden bundles. Exit 1 on any difference."""
    from .review import check_golden

    results = check_golden(configs_dir, golden_dir, _options(**flags), update=update)
    failed = [result for result in results if result.status not in ("same", "updated")]
    for result in results:
        click.echo(f"{result.status:>9}  {result.case}")
        if result.diff:
            click.echo(result.diff, nl=False)
    if not results:
        click.echo(f"no *.yml or *.yaml configs in {configs_dir}", err=True)
        sys.exit(EXIT_INVALID)
    if failed:
        click.echo(f"\n{len(failed)} of {len(results)} differ; to accept the new output run:\n"
                   f"  tunefile check {configs_dir} --golden {golden_dir} --update", err=True)
        sys.exit(EXIT_DIFFERENT)
    click.echo(f"{len(results)} config(s) match {golden_dir}")


@cli.command()
@click.option("--output", type=click.Path(path_type=Path), help="Write the JSON Schema to this file.")
@click.option("--check", "check_file", type=click.Path(exists=True, path_type=Path),
              help="Exit 1 when this file differs from the schema the models generate.")
@click.option("--markdown", is_flag=True, help="Print the config reference as Markdown.")
@click.option("--readme", type=click.Path(exists=True, path_type=Path),
              help="Refresh the config reference between the markers in this README.")
def schema(output: Path | None, check_file: Path | None, markdown: bool, readme: Path | None) -> None:
    """Print (or write, or check) the JSON Schema of the config language."""
    from .schema import reference_markdown, schema_text, splice_readme

    if check_file:
        current = schema_text()
        if check_file.read_text(encoding="utf-8") != current:
            click.echo(f"{check_file} is out of date; run: tunefile schema --output {check_file}", err=True)
            sys.exit(EXIT_DIFFERENT)
        import json

        import jsonschema

        jsonschema.Draft202012Validator.check_schema(json.loads(current))
        click.echo(f"{check_file} is current and a valid JSON Schema 2020-12 document")
        return
    if readme:
        readme.write_text(splice_readme(readme.read_text(encoding="utf-8"), reference_markdown()), encoding="utf-8")
        click.echo(f"refreshed the config reference in {readme}")
        return
    text = reference_markdown() if markdown else schema_text()
    if output:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@cli.command()
def targets() -> None:
    """List the built-in targets (GPU catalog)."""
    from .targets import GPU_CATALOG

    click.echo(f"{'name':<11} {'memory':>7}  {'cc':>4}  bf16  fp8   description")
    for gpu in GPU_CATALOG.values():
        cc = ".".join(map(str, gpu.compute_capability))
        click.echo(f"{gpu.name:<11} {gpu.memory_gib:>5g}GB  {cc:>4}  {'yes' if gpu.bf16 else 'no':<4}  "
                   f"{'yes' if gpu.fp8 else 'no':<4}  {gpu.description}")
    click.echo(f"{'cpu':<11} {'-':>7}  {'-':>4}  -     -     CPU processes (gloo); --gpus-per-node counts processes")
    click.echo(f"{'detect':<11} reads the local GPUs with nvidia-smi and records what it found")


def main() -> None:
    cli(prog_name="tunefile")


if __name__ == "__main__":
    main()
