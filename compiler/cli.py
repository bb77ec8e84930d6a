"""The `tunefile` command: parses flags, calls the pipeline, reports. All I/O happens here.

Exit codes: 0 success; 1 a difference was found (diff, verify, check); 2 the input is wrong
(config, target, flags; every problem is listed as FILE:LINE:COL: key: message); 3 internal error.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import click

from .cli_common import output_problem, print_warnings, reports_problems, target_flags, target_options
from .errors import EXIT_DIFFERENT, EXIT_INVALID
from .runtime_commands import RUNTIME_COMMANDS

# `--offline` is `offline: true` in the config: the bundle runs offline, and compile first checks that every model
# and dataset is a local path or in the Hugging Face cache the bundle will use (compiler/preflight.py).
OFFLINE_FLAG = click.option("--offline", is_flag=True,
                            help="Same as offline: true: no network at run time, every model and dataset checked "
                            "against local paths and the Hugging Face cache now.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
@click.version_option(package_name="tunefile")
def cli(debug: bool) -> None:
    """Compile Axolotl-style fine-tuning configs into reviewable launch bundles."""


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@OFFLINE_FLAG
@target_flags
@reports_problems
def validate(config: Path, offline: bool, sources: Any, **flags: Any) -> None:
    """Check a config (and its target rules) without writing anything."""
    from .pipeline import compile_config

    plan = compile_config(config, target_options(**flags), sources, offline=offline, preflight=True).plan
    print_warnings(plan, sources)
    click.echo(f"{config}: valid ({len(plan.warnings)} warning{'s' if len(plan.warnings) != 1 else ''})")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@target_flags
@reports_problems
def explain(config: Path, sources: Any, **flags: Any) -> None:
    """Print the resolved plan: every choice and the reason for it."""
    from .pipeline import compile_config

    plan = compile_config(config, target_options(**flags), sources).plan
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
@click.option("--no-vendor", is_flag=True,
              help="Leave the runtime out of the bundle: launch.sh uses the tunefile installed where it runs.")
@click.option("--stack", metavar="FILE|detect",
              help="Record the package versions the bundle is resolved for: a `pip freeze` of the training "
              "environment, or `detect` for this one (default: tunefile's minimum versions).")
@OFFLINE_FLAG
@target_flags
@reports_problems
def compile_command(config: Path, output: Path | None, force: bool, no_vendor: bool, stack: str | None,
                    offline: bool, sources: Any, **flags: Any) -> None:
    """Compile CONFIG into a launch bundle."""
    from .bundle import BundleExistsError, BundleLocationError, write_bundle
    from .errors import ConfigError
    from .pipeline import BundleOptions, compile_config

    compilation = compile_config(config, target_options(**flags), sources,
                                 BundleOptions(vendor=not no_vendor, stack=stack), offline=offline, preflight=True)
    print_warnings(compilation.plan, sources)
    out_dir = output or Path(compilation.plan.spec.output_dir) / "bundle"
    try:
        write_bundle(compilation.all_files(), out_dir, force=force)
    except BundleExistsError:
        click.echo(f"tunefile: {out_dir} exists and is not empty; pass --force to replace it "
                   "(nothing was written)", err=True)
        sys.exit(EXIT_INVALID)
    except (BundleLocationError, OSError) as exc:  # `-o .`, `-o afile/sub`, a full disk: located, exit 2
        raise ConfigError([output_problem(exc, flag="-o" if output else None)]) from None
    names = ", ".join(compilation.all_files())
    click.echo(f"Wrote {out_dir}/ ({names})")
    click.echo(f"Run it: bash {out_dir}/launch.sh   or on SLURM: sbatch {out_dir}/job.sbatch")
    log_dir = compilation.plan.target.slurm.log_dir
    if log_dir:
        click.echo(f"Before sbatch: mkdir -p {log_dir}   (SLURM does not create the log folder; the job fails "
                   "silently without it)")


@cli.command()
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@target_flags
@reports_problems
def diff(a: Path, b: Path, sources: Any, **flags: Any) -> None:
    """Unified diff of two configs' bundles, or of two bundle directories. Exit 1 when they differ."""
    from .review import load_side, unified_bundle_diff

    options = target_options(**flags)
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
@target_flags
def check(configs_dir: Path, golden_dir: Path, update: bool, **flags: Any) -> None:
    """Compile every config in CONFIGS_DIR and compare with golden bundles. Exit 1 on any difference."""
    from .review import check_golden

    results = check_golden(configs_dir, golden_dir, target_options(**flags), update=update)
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


# The commands that hand a compiled bundle to the runtime (train, preprocess, merge-lora, inference,
# tiny-model) live in their own module, which does not know this group: the group adds them here.
for runtime_command in RUNTIME_COMMANDS:
    cli.add_command(runtime_command)


def main() -> None:
    """The console script: one command per process (training and the other runtime commands run in a child
    process of their own, see runtime_commands.py).

    Python's cyclic garbage collector is off for it: while a compile imports pydantic and builds the Spec's
    validator, the run plan's dataclasses and the templates, the collector ran about 80 times and took about a
    twentieth of the command's time, to free next to nothing (all of it lives until the process exits; `check`
    over 100 configs ends 0.5 MB larger without it, and 17% sooner). Tests call `cli` in their own process,
    which this leaves alone."""
    gc.disable()
    cli(prog_name="tunefile")


if __name__ == "__main__":
    main()
