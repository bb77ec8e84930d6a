"""What every `tunefile` command shares: the hardware flags, and the wrapper that turns a ConfigError into
located messages and exit code 2.

Its own module so that cli.py (the command group) and runtime_commands.py (the commands that hand a bundle to
the runtime) both import it and neither imports the other: cli.py registers the runtime commands on its group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_INVALID, ConfigError

EXIT_INTERNAL_ERROR = 3
CONFIG_ARGUMENTS = ("config", "a", "b")  # the arguments that name a config (`diff A B` takes two)


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
        refused = _names_not_utf8(kwargs)
        if refused:
            for line in refused:
                click.echo(line, err=True)
            click.echo(f"{len(refused)} error{'s' if len(refused) != 1 else ''}; nothing was written.", err=True)
            sys.exit(EXIT_INVALID)
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


def _names_not_utf8(arguments: dict[str, Any]) -> list[str]:
    """An error line for each config argument whose name is not valid UTF-8 (Python holds the undecodable bytes as
    lone surrogates, and the config's name is recorded in the bundle's UTF-8 files): the name is shown with its
    bytes escaped. Output paths are left alone: nothing records their names."""
    lines = []
    for parameter in CONFIG_ARGUMENTS:
        value = arguments.get(parameter)
        if not isinstance(value, Path):
            continue
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(value).decode("utf-8", errors="backslashreplace")
            lines.append(f"{shown}:1:1: error: (top level): the file name is not valid UTF-8; rename it (tunefile "
                         "records the config's name in the bundle's UTF-8 files)")
    return lines


def print_warnings(plan: Any, sources: Any) -> None:
    for warning in plan.warnings:
        click.echo(sources.format(warning, severity="warning"), err=True)


def output_problem(error: Exception, *, flag: str | None) -> Any:
    """A located Problem for a bundle that cannot be written where it was asked to go: BundleLocationError (the
    path cannot hold a bundle) or OSError (a write failed, such as a full disk). FLAG names the command-line flag
    that gave the path; None when it is the config's output_dir."""
    from .errors import Problem
    from .pipeline import COMMAND_LINE

    message = str(error) if not isinstance(error, OSError) else (
        f"cannot write the bundle: {error.strerror or error}" + (f": {error.filename}" if error.filename else ""))
    if flag:
        return Problem((), f"{flag}: {message}", file=COMMAND_LINE, line=1)
    return Problem(("output_dir",), message)
