"""What every `tunefile` command shares: the hardware flags, and the wrapper that turns a ConfigError into
located messages and exit code 2.

Its own module so that cli.py (the command group) and runtime_commands.py (the commands that hand a bundle to
the runtime) both import it and neither imports the other: cli.py registers the runtime commands on its group.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from .errors import EXIT_INVALID, ConfigError

EXIT_INTERNAL_ERROR = 3


def target_flags(command: Callable[..., Any]) -> Callable[..., Any]:
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


def target_options(target: str | None, nodes: int | None, gpus_per_node: int | None, gpu: str | None):
    from .pipeline import TargetOptions

    return TargetOptions(target=target, nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu)


def reports_problems(command: Callable[..., Any]) -> Callable[..., Any]:
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
            sys.exit(EXIT_INTERNAL_ERROR)

    return run


def print_warnings(plan: Any, sources: Any) -> None:
    for warning in plan.warnings:
        click.echo(sources.format(warning, severity="warning"), err=True)
