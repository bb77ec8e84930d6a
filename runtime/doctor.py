"""`python -m tunefile.runtime doctor [BUNDLE]` (and `tunefile doctor`): will this machine run the bundle?

One line per check, `ok`, `MISSING` (with the command that fixes it) or `note` (worth knowing, not a failure);
exit 0 when nothing is missing, 1 otherwise. With BUNDLE the checks follow its plan (config.yaml) and manifest:
the packages it needs, GPUs of the kind and number it was compiled for, bf16, free disk for the checkpoints it
will write, the Hugging Face cache for an offline run, the runtime launch.sh would import. Without BUNDLE: the
machine in general. Nothing here imports torch before the torch check, so a machine without it is told so.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import RuntimeUserError

OK, MISSING, NOTE = "ok", "MISSING", "note"
# The extra of tunefile that installs each package (pyproject.toml); the fix the doctor prints.
EXTRA_OF = {
    "torch": "train", "transformers": "train", "peft": "train", "accelerate": "train", "safetensors": "train",
    "datasets": "train", "tokenizers": "train", "tensorboard": "train", "bitsandbytes": "qlora",
    "deepspeed": "deepspeed", "flash-attn": "flash", "liger-kernel": "liger", "cut-cross-entropy": "cce",
    "torchao": "torchao", "mistral-common": "mistral", "wandb": "wandb", "mlflow-skinny": "mlflow",
    "swanlab": "swanlab", "gradio": "ui",
}
TRAIN_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "datasets", "tokenizers")
OPTIONAL_PACKAGES = ("bitsandbytes", "deepspeed", "flash-attn", "liger-kernel")
MIN_PYTHON = (3, 10)
HF_CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "XDG_CACHE_HOME")
ADAM_BYTES = 8  # AdamW's two fp32 moments per trained parameter
ADAPTER_SHARE = 0.02  # a LoRA adapter's parameters as a share of the base's: a generous bound for r ≤ 64


class DoctorError(RuntimeUserError):
    """BUNDLE is not a bundle."""


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.status:<8} {self.name}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


def pip_fix(package: str) -> str:
    extra = EXTRA_OF.get(package)
    return f"pip install 'tunefile[{extra}]'" if extra else f"pip install {package}"


def run_doctor(bundle: str | None) -> int:
    checks = diagnose(Path(bundle) if bundle else None)
    for check in checks:
        print(check.line(), flush=True)
    missing = sum(check.status == MISSING for check in checks)
    where = f"bundle {bundle}" if bundle else "training in general"
    print(f"{missing} missing: this machine is not ready for {where}" if missing
          else f"this machine is ready for {where}")
    return 1 if missing else 0


def diagnose(bundle: Path | None) -> list[Check]:
    plan, manifest = read_bundle(bundle) if bundle else (None, None)
    checks = [python_check()]
    torch = _import_torch()
    checks += package_checks(manifest, plan)
    checks += gpu_checks(torch, plan, manifest)
    if bundle is not None:
        checks.append(disk_check(plan))
        if plan.offline:
            checks += offline_cache_checks(plan, launch_environment(bundle))
    checks.append(runtime_check(bundle, manifest))
    return checks


def read_bundle(bundle: Path) -> tuple[Any, dict]:
    from .config import load_run_plan

    manifest_path = bundle / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DoctorError(f"{bundle}: not a bundle (cannot read manifest.json: {exc}); give the folder "
                          "`tunefile compile` wrote") from None
    return load_run_plan(bundle / "config.yaml"), manifest


def python_check() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", MISSING, f"{version} at {sys.executable}; tunefile needs "
                     f"{'.'.join(map(str, MIN_PYTHON))} or newer", "use a newer Python (e.g. python3.11 -m venv)")
    return Check("python", OK, f"{version} at {sys.executable}")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def package_checks(manifest: dict | None, plan: Any) -> list[Check]:
    """The packages the bundle needs (manifest.json's required_packages, versions from its "stack"), the kernels
    its plan asks for; without a bundle, the train extra and a note on each optional package."""
    from .stack_check import satisfies

    stack = (manifest or {}).get("stack", {}).get("packages", {})
    if manifest is None:
        needed = list(TRAIN_PACKAGES)
    else:
        needed = [name for name in manifest.get("required_packages", ()) if name != "tunefile"]
        needed += _kernel_packages(plan)
    checks = []
    for name in dict.fromkeys(needed):
        installed = _installed(name)
        requires = stack.get(name, {}).get("requires", "any")
        if installed is None:
            checks.append(Check(name, MISSING, "not installed" + (f" (the bundle needs {requires})"
                                                                   if requires != "any" else ""), pip_fix(name)))
        elif not satisfies(installed, requires):
            checks.append(Check(name, MISSING, f"{installed} installed, the bundle needs {requires}",
                                f"pip install '{name}{requires.replace('==', '~=').replace('.*', '.0')}'"))
        else:
            checks.append(Check(name, OK, installed))
    if manifest is None:
        for name in OPTIONAL_PACKAGES:
            installed = _installed(name)
            detail = installed or f"not installed (only bundles that use it need it: {pip_fix(name)})"
            checks.append(Check(name, OK if installed else NOTE, detail))
    return checks


def _kernel_packages(plan: Any) -> list[str]:
    kernels = plan.kernels
    liger = (kernels.liger_rms_norm or kernels.liger_glu_activation or kernels.liger_layer_norm or kernels.liger_rope
             or kernels.liger_rms_norm_gated or kernels.liger_fused_linear_cross_entropy)
    return (["liger-kernel"] if liger else []) + (["cut-cross-entropy"] if kernels.cut_cross_entropy else [])


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def gpu_checks(torch: Any, plan: Any, manifest: dict | None) -> list[Check]:
    if torch is None:
        return [Check("cuda", MISSING, "cannot tell: torch is not installed", pip_fix("torch"))]
    built = torch.version.cuda
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    names = sorted({torch.cuda.get_device_name(index) for index in range(count)})
    found = f"{count} × {', '.join(names)}" if count else "no CUDA GPU visible"
    torch_line = f"torch {torch.__version__} built for " + (f"CUDA {built}" if built else "the CPU only")
    wants_gpu = plan is not None and plan.distribution.device == "cuda"
    if plan is None:
        return [Check("gpu", OK if count else NOTE, f"{found}; {torch_line}" + ("" if count else
                      "; only CPU bundles (--target cpu) run here")), *_bf16_checks(torch, count, None)]
    if not wants_gpu:
        return [Check("gpu", OK, f"none needed (a CPU bundle, {plan.distribution.processes_per_node} process(es) "
                      f"per node); this machine has {found}")]
    per_node = plan.distribution.processes_per_node
    if not available:
        fix = ("install a CUDA build of torch (https://pytorch.org/get-started/locally/)" if not built
               else "run it on a GPU node (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        return [Check("gpu", MISSING, f"the bundle trains on {per_node} GPU(s) per node; {found}; {torch_line}",
                      fix)]
    checks = [Check("gpu count", OK if count >= per_node else MISSING,
                    f"{found}; the bundle starts {per_node} process(es) per node",
                    None if count >= per_node else f"recompile with --gpus-per-node {count}, or run on a node "
                    f"with {per_node} GPUs")]
    target = str((manifest or {}).get("target", ""))
    family = target.split("-")[0].lower()
    if family and family not in ("unspecified", "detect") and any(char.isdigit() for char in family):
        same = all(family in name.lower().replace(" ", "") for name in names)
        checks.append(Check("gpu kind", OK if same else NOTE,
                            f"compiled for {target}, this machine has {', '.join(names)}" + (
                                "" if same else "; memory estimates and precision choices were made for the "
                                "target: recompile with --target detect here")))
    return checks + _bf16_checks(torch, count, plan)


def _bf16_checks(torch: Any, count: int, plan: Any) -> list[Check]:
    if not count:
        return []
    supported = torch.cuda.is_bf16_supported()
    needed = plan is not None and plan.model.precision == "bf16"
    if needed and not supported:
        return [Check("bf16", MISSING, "the bundle trains in bf16 and this GPU has no bf16",
                      "recompile with --target detect (fp16 is chosen), or run on an Ampere or newer GPU")]
    return [Check("bf16", OK if supported or not needed else NOTE, "supported" if supported else "not supported")]


def checkpoint_bytes(plan: Any) -> tuple[int, str]:
    """An estimate of what the run writes to output_dir, and how it was made."""
    parameters = plan.model.parameters or 0
    # An adapter is saved in fp32; a full model in the dtype it trains in (fp32 master weights unless
    # half_precision_weights).
    trained = int(parameters * ADAPTER_SHARE) if plan.model.adapter else parameters
    saved_weights = trained * (2 if plan.model.half_precision_weights and not plan.model.adapter else 4)
    per_checkpoint = saved_weights + trained * ADAM_BYTES
    limit = plan.checkpointing.save_total_limit
    cadence = plan.checkpointing.save_steps or plan.checkpointing.saves_per_epoch
    kept = limit or 1  # at least one: a preempted or signalled run saves a checkpoint whatever the cadence
    total = kept * per_checkpoint + saved_weights
    how = (f"{kept} checkpoint(s) × {_size(per_checkpoint)} (weights + AdamW state of "
           f"{'≈2% of ' if plan.model.adapter else ''}{parameters:,} parameters) + the final "
           f"{'adapter' if plan.model.adapter else 'model'} {_size(saved_weights)}")
    if cadence and limit is None:
        how += "; save_total_limit is not set, so every checkpoint is kept: this counts one"
    return total, how


def disk_check(plan: Any) -> Check:
    output_dir = Path(plan.checkpointing.output_dir).expanduser()
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not plan.model.parameters:
        return Check("disk", NOTE, f"{_size(shutil.disk_usage(existing).free)} free at {existing}; the plan does "
                     "not know the model's size, so no estimate")
    need, how = checkpoint_bytes(plan)
    free = shutil.disk_usage(existing).free
    detail = f"{_size(free)} free at {existing} for output_dir {plan.checkpointing.output_dir}; needs ≈{_size(need)}" \
             f" ({how})"
    if free < need:
        return Check("disk", MISSING, detail, "free space there, point output_dir elsewhere, or lower "
                     "save_total_limit")
    return Check("disk", OK, detail)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def launch_environment(bundle: Path) -> dict[str, str]:
    """This environment with the Hugging Face cache variables launch.sh exports (the target's env:), which win."""
    env = dict(os.environ)
    try:
        lines = (bundle / "launch.sh").read_text(encoding="utf-8").splitlines()
    except OSError:
        return env
    for line in lines:
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export "):].partition("=")
            if name in HF_CACHE_VARIABLES:
                env[name] = " ".join(shlex.split(value))  # launch.sh single-quotes target values
    return env


def offline_cache_checks(plan: Any, env: dict[str, str]) -> list[Check]:
    """The compiler's offline preflight, on this machine: each model, tokenizer, adapter and dataset is a local
    path or in the Hugging Face cache the bundle will use (the same folders and files)."""
    hf_home = _expand(env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"),
                      env)
    hub = _expand(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(hf_home, "hub"), env)
    prepared = _expand(env.get("HF_DATASETS_CACHE") or os.path.join(hf_home, "datasets"), env)
    model, checks = plan.model, []
    items = [("base_model", model.base_model, "models", ("config.json",), model.revision),
             ("tokenizer", model.tokenizer, "models", ("tokenizer_config.json", "tokenizer.json"), model.revision)]
    if model.lora is not None and model.lora.model_dir:
        items.append(("lora_model_dir", model.lora.model_dir, "models", ("adapter_config.json",), None))
    items += [(f"dataset {entry.path}", entry.path, "datasets", (), None) for entry in plan.data.datasets]
    missing: set[str] = set()
    for label, name, kind, files, revision in items:
        if name in missing:  # the tokenizer of a missing base_model: one line is enough
            continue
        if Path(name).expanduser().exists():
            checks.append(Check(f"offline {label}", OK, f"{name} (local)"))
        elif kind == "models" and _in_hub_cache(Path(hub) / f"models--{name.replace('/', '--')}", files, revision):
            checks.append(Check(f"offline {label}", OK, f"{name} in the Hugging Face cache at {hub}"))
        elif kind == "datasets" and _prepared(Path(prepared) / name.replace("/", "___")):
            checks.append(Check(f"offline {label}", OK, f"{name} prepared in the datasets cache at {prepared}"))
        else:
            # Offline, load_dataset reads a Hub dataset from the datasets library's prepared copy only.
            where, fix = (f"the datasets cache at {prepared}", f"`python -c \"import datasets; "
                          f"datasets.load_dataset('{name}')\"`") if kind == "datasets" else \
                (f"the Hugging Face cache at {hub}", f"`hf download {name}" +
                 (f" --revision {revision}`" if revision else "`"))
            missing.add(name)
            checks.append(Check(f"offline {label}", MISSING, f"{name} is neither a local path (from {Path.cwd()}) "
                                f"nor in {where}", f"{fix} where there is network, with HF_HOME={hf_home}, and "
                                "copy that folder here"))
    return checks


def _expand(path: str, env: dict[str, str]) -> str:
    return env.get("HOME", "~") + path[1:] if path == "~" or path.startswith("~/") else path


def _prepared(folder: Path) -> bool:
    """The datasets library's cache holds a prepared copy: ``org___name/<config>/<version>/<hash>/``."""
    return any(path.is_dir() for path in folder.glob("*/*/*"))


def _in_hub_cache(repo: Path, files: tuple[str, ...], revision: str | None) -> bool:
    wanted = revision or "main"
    ref = repo / "refs" / wanted
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else wanted
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        return False
    return any((snapshot / name).exists() for name in files)


def runtime_check(bundle: Path | None, manifest: dict | None) -> Check:
    """Whether launch.sh's Python (python3 on PATH) imports tunefile.runtime: from the bundle's archive when it
    carries one (first on PYTHONPATH, as launch.sh puts it), else installed."""
    python = shutil.which("python3") or sys.executable
    env = dict(os.environ)
    runtime = (manifest or {}).get("runtime") or {}
    archive = bundle / runtime["archive"] if bundle is not None and runtime.get("vendored") else None
    if archive is not None:
        if not archive.is_file():
            return Check("tunefile.runtime", MISSING, f"the bundle's runtime archive {archive} is missing",
                         "recompile the bundle (or copy it whole)")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(archive), env.get("PYTHONPATH")]))
    probe = subprocess.run([python, "-c", "import tunefile.runtime, sys; sys.stdout.write(tunefile.runtime.__file__)"],
                           capture_output=True, text=True, env=env, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["failed"])[-1]
        return Check("tunefile.runtime", MISSING, f"{python} cannot import it ({last})",
                     "recompile without --no-vendor, or pip install tunefile in that environment")
    where = "the bundle's archive" if archive is not None else "the installed tunefile"
    accelerate = shutil.which("accelerate")
    if bundle is not None and accelerate is None:
        return Check("tunefile.runtime", MISSING, f"imports from {where} ({probe.stdout}), but launch.sh's "
                     "`accelerate` is not on PATH", "activate the training environment (or pip install "
                     "'tunefile[train]')")
    return Check("tunefile.runtime", OK, f"{python} imports it from {where} ({probe.stdout})")
