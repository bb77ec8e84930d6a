"""The air-gapped preflight: with ``offline: true`` (or ``compile --offline``), every model, tokenizer, adapter and
dataset the run will read must be a local path or sit in the Hugging Face cache the bundle will use.

Three steps, so that only one of them touches the machine:

- ``offline_assets(spec)`` (pure): what the run will read, each with the key that names it in the config;
- ``read_offline_facts(assets, env, folders)`` (I/O, called by the pipeline): which of those names exist as local
  paths, and what the cache holds for the rest: the Hugging Face Hub cache (``models--org--name/refs`` and
  ``snapshots/<commit>/``) for models, and for Hub datasets the datasets library's own cache of prepared
  datasets (``org___name/<config>/<version>/<hash>/``): offline, ``load_dataset("org/name")`` (datasets 5)
  raises before it looks at the Hub cache and falls back to that prepared copy only. A ``datasets--org--name``
  snapshot alone is read too, to say why it is not enough;
- ``check_offline_assets(assets, facts)`` (pure): one Problem per missing asset, with the command that fixes it.

The cache folders follow huggingface_hub's and datasets' own rules (HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else
$HF_HOME/hub; HF_DATASETS_CACHE, else $HF_HOME/datasets; HF_HOME, else $XDG_CACHE_HOME/huggingface, else
~/.cache/huggingface), read from the target's ``env:`` over the compiling environment: what launch.sh exports
wins over what the job inherits. Nothing here imports torch, huggingface_hub or datasets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import KeyPath, Problem
from .spec import Spec

AssetKind = Literal["model", "tokenizer", "adapter", "dataset", "stream"]
# The runtime's rule (runtime/data/sources.py): these are local paths even when missing, never Hub ids.
LOCAL_PREFIXES = (".", "/", "~")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
# A snapshot holds a model when it has its config; a tokenizer, an adapter likewise by their own files.
NEEDED_FILES: dict[str, tuple[str, ...]] = {
    "model": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json"),
    "adapter": ("adapter_config.json",),
}


@dataclass(frozen=True)
class OfflineAsset:
    """One thing the run reads: ``name`` as written, at ``key`` in the config."""

    key: KeyPath
    name: str
    kind: AssetKind
    revision: str | None = None

    @property
    def repo_folder(self) -> str:
        """Its folder in the Hub cache: ``models--org--name`` or ``datasets--org--name``."""
        kind = "datasets" if self.kind in ("dataset", "stream") else "models"
        return f"{kind}--{self.name.replace('/', '--')}"

    @property
    def prepared_folder(self) -> str:
        """A Hub dataset's folder in the datasets library's cache: ``org___name``."""
        return self.name.replace("/", "___")


@dataclass(frozen=True)
class CacheDirs:
    hub: str
    datasets: str


@dataclass(frozen=True)
class CachedRepo:
    """A repository in the Hub cache: its refs (``main`` → commit) and each snapshot's top-level file names."""

    refs: Mapping[str, str] = field(default_factory=dict)
    snapshots: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def files_at(self, revision: str | None) -> frozenset[str] | None:
        """The files of ``revision`` (a branch, tag or commit; None: main), None when that snapshot is absent."""
        wanted = revision or "main"
        return self.snapshots.get(self.refs.get(wanted, wanted))


@dataclass(frozen=True)
class OfflineFacts:
    """What the machine holds for a list of assets; plain data, so tests can hand in a fake."""

    dirs: CacheDirs
    local: frozenset[str] = frozenset()  # names that exist as local paths
    repos: Mapping[str, CachedRepo] = field(default_factory=dict)  # by repo_folder; absent: not cached
    prepared: frozenset[str] = frozenset()  # prepared_folder names that hold a prepared dataset


def looks_local(name: str) -> bool:
    return name.startswith(LOCAL_PREFIXES) or name.lower().endswith(LOCAL_SUFFIXES)


def offline_assets(spec: Spec) -> list[OfflineAsset]:
    """Everything an offline run must find on its machine, in config order."""
    assets = [OfflineAsset(("base_model",), spec.base_model, "model", spec.revision_of_model)]
    if spec.tokenizer_config and spec.tokenizer_config != spec.base_model:
        assets.append(OfflineAsset(("tokenizer_config",), spec.tokenizer_config, "tokenizer", spec.revision_of_model))
    else:  # the tokenizer comes from base_model's folder: it must hold one
        assets.append(OfflineAsset(("base_model",), spec.base_model, "tokenizer", spec.revision_of_model))
    if spec.lora_model_dir:
        assets.append(OfflineAsset(("lora_model_dir",), spec.lora_model_dir, "adapter"))
    for index, entry in enumerate(spec.datasets):
        assets.append(OfflineAsset(("datasets", index, "path"), entry.path, "stream" if spec.streaming else "dataset"))
    for index, entry in enumerate(spec.pretraining_dataset or ()):
        assets.append(OfflineAsset(("pretraining_dataset", index, "path"), entry.path, "stream"))
    return assets


def cache_dirs(env: Mapping[str, str]) -> CacheDirs:
    """The Hub and datasets cache folders that ``env`` gives huggingface_hub and datasets (pure: HOME from env)."""

    def expand(path: str) -> str:
        home = env.get("HOME", "~")
        return home + path[1:] if path == "~" or path.startswith("~/") else path

    hf_home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(hf_home, "hub")
    datasets = env.get("HF_DATASETS_CACHE") or os.path.join(hf_home, "datasets")
    return CacheDirs(hub=expand(hub), datasets=expand(datasets))


def check_offline_assets(assets: Iterable[OfflineAsset], facts: OfflineFacts) -> list[Problem]:
    """One Problem per asset the offline run would not find (one per key: a missing model is not also reported
    as a missing tokenizer)."""
    problems: dict[KeyPath, Problem] = {}
    for asset in assets:
        if asset.key in problems or asset.name in facts.local:
            continue
        message = _missing(asset, facts)
        if message:
            problems[asset.key] = Problem(asset.key, message)
    return list(problems.values())


def _missing(asset: OfflineAsset, facts: OfflineFacts) -> str | None:
    name, hub = asset.name, facts.dirs.hub
    if looks_local(name):
        what = "file or folder" if asset.kind in ("dataset", "stream") else "folder"
        return (f"{name}: no such {what} (looked relative to the config's folder and the current directory; "
                "offline: true)")
    if asset.kind == "stream":
        return (f"{name} would be streamed from the Hugging Face Hub while training, and offline: true keeps the "
                f"run off the network; run `hf download --repo-type dataset {name} --local-dir DIR` where there is "
                "network and point the path at DIR's files")
    if asset.kind == "dataset":
        if asset.prepared_folder in facts.prepared:
            return None
        load_once = (f"run `python -c \"import datasets; datasets.load_dataset('{name}')\"` with the same HF_HOME "
                     "where there is network")
        repo = facts.repos.get(asset.repo_folder)
        if repo is not None and repo.files_at(None):
            return (f"{name} is in the Hub cache at {hub}, but offline the datasets library reads only its own "
                    f"prepared copy, and {facts.dirs.datasets} has none (offline: true); {load_once}, or point the "
                    "path at the snapshot's data files")
        return (f"{name} is not among the prepared datasets at {facts.dirs.datasets} (offline: true); {load_once}, "
                "or point the path at local files")
    repo = facts.repos.get(asset.repo_folder)
    files = repo.files_at(asset.revision) if repo is not None else None
    at = f" at revision {asset.revision}" if asset.revision else ""
    revision_flag = f" --revision {asset.revision}" if asset.revision else ""
    download = f"`hf download {name}{revision_flag}` with the same HF_HOME where there is network"
    if files is None:
        local = {"model": "a local model directory", "tokenizer": "a local tokenizer folder",
                 "adapter": "a local adapter folder"}[asset.kind]
        return (f"{name}{at} is not in the Hugging Face cache at {hub} (offline: true); run {download}, or point "
                f"{asset.key[-1]} at {local}")
    needed = NEEDED_FILES[asset.kind]
    if not any(file in files for file in needed):
        return (f"{name}{at} is in the Hugging Face cache at {hub} without its {asset.kind} files "
                f"({' or '.join(needed)}; offline: true); run {download} to complete it")
    return None


def read_offline_facts(assets: Iterable[OfflineAsset], env: Mapping[str, str], folders: Iterable[Path]) -> OfflineFacts:
    """Read the machine for ``assets`` (I/O; the pipeline calls it, only for offline runs): which names exist as
    local paths relative to ``folders`` (or absolute), and what the caches ``env`` names hold for the others."""
    dirs = cache_dirs(env)
    home = env.get("HOME")
    local, repos, prepared = set(), {}, set()
    for asset in assets:
        path = Path(home + asset.name[1:]) if home and asset.name.startswith("~/") else Path(asset.name)
        if any((folder / path).exists() for folder in folders):
            local.add(asset.name)
            continue
        repo_dir = Path(dirs.hub) / asset.repo_folder
        if repo_dir.is_dir():
            repos[asset.repo_folder] = _read_repo(repo_dir)
        prepared_dir = Path(dirs.datasets) / asset.prepared_folder
        if prepared_dir.is_dir() and any(path.is_dir() for path in prepared_dir.glob("*/*/*")):
            prepared.add(asset.prepared_folder)
    return OfflineFacts(dirs=dirs, local=frozenset(local), repos=repos, prepared=frozenset(prepared))


def _read_repo(repo_dir: Path) -> CachedRepo:
    refs = {}
    for ref in (repo_dir / "refs").rglob("*") if (repo_dir / "refs").is_dir() else ():
        if ref.is_file():
            refs[ref.relative_to(repo_dir / "refs").as_posix()] = ref.read_text(encoding="utf-8").strip()
    snapshots = {}
    for snapshot in (repo_dir / "snapshots").iterdir() if (repo_dir / "snapshots").is_dir() else ():
        if snapshot.is_dir():  # a file whose blob is gone (a broken link) is not there
            snapshots[snapshot.name] = frozenset(entry.name for entry in snapshot.iterdir() if entry.exists())
    return CachedRepo(refs=refs, snapshots=snapshots)
