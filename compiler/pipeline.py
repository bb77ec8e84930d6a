"""The compile pipeline end to end: read inputs → load → validate → resolve → render.

This is the I/O edge the CLI calls: it reads the config and the files it points at, then hands
plain data to the pure stages. Relative paths that the *compiler* reads (a target file, a
DeepSpeed JSON, a local model's config.json) are taken relative to the config file, so the same
config compiles the same from any working directory. Paths the *runtime* reads (datasets,
output_dir) stay as written and are relative to the directory the job is launched from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .dialect.normalize import axolotl_catalogue
from .dialect.stock_deepspeed import STOCK_DEEPSPEED, stock_deepspeed
from .errors import ConfigError, Problem, did_you_mean, format_path
from .loader import Document, decode_text, load_document
from .models import config_json_problems
from .plan import Plan
from .render import render_bundle
from .resolve import DeepSpeedInput, ResolveInputs, resolve
from .resolve.deepspeed import BUILTIN_PRESETS
from .spec import Spec
from .stack import Stack, parse_freeze, pinned_stack, stack_packages
from .targets import (
    TARGET_INT_LIMITS,
    TARGET_NAMES,
    UNSPECIFIED,
    Target,
    apply_overrides,
    builtin_target,
    default_target,
    detect_local_hardware,
    target_from_file_data,
)
from .validate import validate_with_notes
from .vendor import runtime_archive

COMMAND_LINE = "command line"  # Problem.file of mistakes in flags, which have no line to point at


@dataclass(frozen=True)
class TargetOptions:
    """Command-line hardware flags; None means "not given"."""

    target: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    gpu: str | None = None
    # Used when neither --target nor the config's `target:` names one (`tunefile train` detects).
    fallback_target: str | None = None


@dataclass(frozen=True)
class BundleOptions:
    """What the bundle carries: the runtime archive (``--no-vendor`` leaves it out) and the package versions it
    is resolved for (``--stack``: None for tunefile's minimums, ``detect`` for this environment's, or a file)."""

    vendor: bool = True
    stack: str | None = None


@dataclass
class Compilation:
    plan: Plan
    files: dict[str, str]  # the text files: what diffs, golden copies and reviewers read
    binary_files: dict[str, bytes] = field(default_factory=dict)  # the vendored runtime archive

    def all_files(self) -> dict[str, str | bytes]:
        """Everything the bundle directory holds."""
        return dict(sorted({**self.files, **self.binary_files}.items()))


@dataclass
class Sources:
    """Every document read so far, so a problem in any of them can be shown with its line."""

    documents: dict[str, Document] = field(default_factory=dict)
    main: str = ""

    def locate(self, problem: Problem) -> tuple[str, int, int]:
        name = problem.file or self.main
        if problem.line is not None:
            return name, problem.line, problem.column or 1
        if name in self.documents:
            mark = self.documents[name].locate(problem.path, at_key=problem.at_key)
            return name, mark.line, mark.column
        return name, 1, 1

    def in_file_order(self, problems: list[Problem]) -> list[Problem]:
        return sorted(problems, key=self.locate)

    def format(self, problem: Problem, *, severity: str = "") -> str:
        prefix = f"{severity}: " if severity else ""
        if problem.file == COMMAND_LINE:
            return f"tunefile: {prefix}{problem.message}" + (f"\n    hint: {problem.hint}" if problem.hint else "")
        name, line, column = self.locate(problem)
        document = self.documents.get(name)
        path = document.shown_path(problem.path) if document else problem.path
        text = f"{name}:{line}:{column}: {prefix}{format_path(path)}: {problem.message}"
        return text + (f"\n    hint: {problem.hint}" if problem.hint else "")


def read_config(path: Path, sources: Sources) -> tuple[Document, Spec, list[Problem], list[Problem], str]:
    sources.main = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem((), f"cannot read the config: {exc}", file=str(path), line=1)]) from None
    text = decode_text(raw, str(path))  # not UTF-8: the line and column of the first byte that is not
    document = load_document(text, str(path))
    sources.documents[str(path)] = document
    spec, warnings, notes = validate_with_notes(document)
    return document, spec, warnings, notes, hashlib.sha256(text.encode()).hexdigest()


def compile_config(path: Path, options: TargetOptions, sources: Sources | None = None,
                   bundle: BundleOptions | None = None, *, offline: bool = False,
                   preflight: bool = False) -> Compilation:
    """Compile one config file into the bundle's files (nothing is written).

    ``offline`` (`--offline`) sets the config's offline: true. ``preflight`` (compile, validate, train): when the
    run is offline, check that every model and dataset it reads is a local path or in the Hugging Face cache the
    bundle will use, reading this machine (the user asked for an offline run); review commands leave it off."""
    bundle = bundle if bundle is not None else BundleOptions()
    sources = sources if sources is not None else Sources()
    _, spec, warnings, notes, config_sha = read_config(path, sources)
    if offline:
        spec = spec.model_copy(update={"offline": True})
    base_dir = path.parent
    target = _read_target(spec, options, base_dir, sources)
    if preflight and spec.offline:
        _check_offline_assets(spec, target, base_dir)
    inputs = ResolveInputs(
        config_name=path.name,
        config_sha256=config_sha,
        target_sha256=hashlib.sha256(json.dumps(asdict(target), sort_keys=True).encode()).hexdigest(),
        local_model_config=_read_local_model_config(spec.base_model, base_dir),
        deepspeed_file=_read_deepspeed_file(spec, base_dir, sources),
    )
    plan = resolve(spec, target, inputs, spec_warnings=warnings, dialect_notes=notes)
    runtime = runtime_archive(plan.tunefile_version) if bundle.vendor else None
    stack = _read_stack(bundle.stack, plan, vendored=runtime is not None)
    return Compilation(plan=plan, files=render_bundle(plan, runtime=runtime, stack=stack),
                       binary_files={runtime.name: runtime.data} if runtime else {})


def _read_stack(argument: str | None, plan: Plan, *, vendored: bool) -> Stack | None:
    """The --stack versions: None (tunefile's minimums), ``detect`` (this environment's installed distributions,
    read from their metadata: host state, read only when asked) or a ``pip freeze`` file."""
    if argument is None:
        return None
    if argument == "detect":
        import importlib.metadata  # here, not at the top: it costs a plain compile a tenth of its time

        versions = {}
        for name in stack_packages(plan.required_packages, vendored=vendored):
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        source = "the compiling environment (compile --stack detect)"
    else:
        file = Path(argument)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([Problem((), f"--stack: cannot read {argument}: {exc}", file=COMMAND_LINE,
                                       line=1)]) from None
        versions, problems = parse_freeze(text)
        if problems:
            raise ConfigError([Problem(("stack",), message, file=argument, line=line, column=1)
                               for line, message in problems])
        source = f"{file.name} (compile --stack)"
    stack, missing = pinned_stack(plan.required_packages, versions, source=source, vendored=vendored,
                                  tunefile_version=plan.tunefile_version)
    if missing:
        where = "is not installed here" if argument == "detect" else f"is not listed in {argument}"
        raise ConfigError([Problem((), f"--stack {argument}: {name} {where}, and the plan needs it",
                                   hint="install it (or list it), or compile without --stack to record tunefile's "
                                   "minimum versions", file=COMMAND_LINE, line=1) for name in missing])
    return stack


def _check_offline_assets(spec: Spec, target: Target, base_dir: Path) -> None:
    """The air-gapped preflight (compiler/preflight.py): the cache the bundle will use is the one the target's
    env names (launch.sh exports it) over this environment's; local paths count from the config's folder or here."""
    import os

    from .preflight import check_offline_assets, offline_assets, read_offline_facts

    assets = offline_assets(spec)
    facts = read_offline_facts(assets, {**os.environ, **dict(target.env)}, (base_dir, Path.cwd()))
    problems = check_offline_assets(assets, facts)
    if problems:
        raise ConfigError(problems)


def _read_target(spec: Spec, options: TargetOptions, base_dir: Path, sources: Sources) -> Target:
    flag_problems = []
    if options.gpu is not None and options.gpu not in (*TARGET_NAMES, UNSPECIFIED):
        message = f"--gpu: unknown GPU {options.gpu!r}" + did_you_mean(options.gpu, TARGET_NAMES)
        flag_problems.append(Problem((), message, hint="built-in GPUs: " + ", ".join(TARGET_NAMES),
                                     file=COMMAND_LINE, line=1))
    for flag, value, limit in (("--nodes", options.nodes, TARGET_INT_LIMITS["nodes"]),
                               ("--gpus-per-node", options.gpus_per_node, TARGET_INT_LIMITS["gpus_per_node"])):
        if value is not None and value < 1:
            flag_problems.append(Problem((), f"{flag} must be at least 1", file=COMMAND_LINE, line=1))
        elif value is not None and value > limit:
            flag_problems.append(Problem((), f"{flag} must be at most {limit:,}", file=COMMAND_LINE, line=1))
    if flag_problems:
        raise ConfigError(flag_problems)

    if options.target:
        name, relative_to = options.target, Path.cwd()
    else:
        name, relative_to = spec.target or options.fallback_target, base_dir
    if name is None:
        target = default_target()
    elif name in (*TARGET_NAMES, UNSPECIFIED):
        target = builtin_target(name)
    elif name == "detect":
        target = detect_local_hardware()
    else:
        file = relative_to / name
        shown = name if options.target else str(file)
        if not _is_file(file):
            problem = Problem(("target",), f"target {name!r} is neither a built-in name nor a file",
                              hint="built-in targets: " + ", ".join((*TARGET_NAMES, "detect")))
            if options.target:
                problem = Problem((), problem.message, hint=problem.hint, file=COMMAND_LINE, line=1)
            raise ConfigError([problem])
        document = load_document(decode_text(_read_bytes(file, shown), shown), shown)
        sources.documents[shown] = document
        target, problems = target_from_file_data(document.data, Path(name).stem, shown)
        if problems:
            raise ConfigError(problems)
    return apply_overrides(target, nodes=options.nodes, gpus_per_node=options.gpus_per_node, gpu=options.gpu)


def _read_local_model_config(base_model: str, base_dir: Path) -> dict | None:
    for candidate in (base_dir / base_model, Path(base_model).expanduser()):
        config = candidate / "config.json"
        if _is_file(config):
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            problems = config_json_problems(data)
            if problems:  # sizes no model has: a broken file, named here rather than trusted
                raise ConfigError([Problem(path, message, file=str(config), line=1) for path, message in problems])
            return data
    return None


def _read_deepspeed_file(spec: Spec, base_dir: Path, sources: Sources) -> DeepSpeedInput | None:
    if not spec.deepspeed or spec.deepspeed in BUILTIN_PRESETS:
        return None
    file = base_dir / spec.deepspeed
    if not _is_file(file):
        # Axolotl configs name the files of Axolotl's own deepspeed_configs/ folder: compile what they hold.
        stock = stock_deepspeed(Path(spec.deepspeed).name)
        if stock is not None:
            version = axolotl_catalogue().version
            return DeepSpeedInput(name=f"Axolotl {version}'s deepspeed_configs/{Path(spec.deepspeed).name}",
                                  data=stock)
        raise ConfigError([Problem(("deepspeed",), f"no such file: {spec.deepspeed} (relative to the config)",
                                   hint="built-in presets: " + ", ".join(BUILTIN_PRESETS) + "; Axolotl's stock "
                                   "files: " + ", ".join(sorted(STOCK_DEEPSPEED)))])
    shown = str(file)
    document = load_document(decode_text(_read_bytes(file, shown), shown), shown)
    sources.documents[shown] = document
    return DeepSpeedInput(name=shown, data=document.data)


def _is_file(path: Path) -> bool:
    """Path.is_file(), except that a path the system will not look at (a name too long, a folder not permitted)
    counts as no file, which the caller reports at its key, instead of an OSError."""
    try:
        return path.is_file()
    except OSError:
        return False


def _read_bytes(file: Path, shown: str) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem((), f"cannot read {shown}: {exc}", file=shown, line=1)]) from None
