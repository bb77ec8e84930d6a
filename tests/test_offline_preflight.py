"""The air-gapped preflight (compiler/preflight.py): with offline: true or `compile --offline`, every model,
tokenizer, adapter and dataset must be a local path or in the Hugging Face cache the bundle will use; each missing
one is a located error, exit 2, nothing written. And at run time, an uncached model or dataset is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_cli, write
from tunefile.compiler.errors import Problem
from tunefile.compiler.preflight import (
    CacheDirs,
    CachedRepo,
    OfflineAsset,
    OfflineFacts,
    cache_dirs,
    check_offline_assets,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_FILES = ("config.json", "tokenizer_config.json", "model.safetensors")


def fake_model(hub: Path, repo: str, files: tuple[str, ...] = MODEL_FILES, ref: str = "main",
               kind: str = "models") -> None:
    """A repository laid out as huggingface_hub caches it: refs/<ref> names a commit, snapshots/<commit>/ holds
    links to blobs."""
    folder = hub / f"{kind}--{repo.replace('/', '--')}"
    write(folder / "refs" / ref, COMMIT)
    for name in files:
        write(folder / "blobs" / name, "{}")
        (folder / "snapshots" / COMMIT).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / COMMIT / name).symlink_to(folder / "blobs" / name)


def config(tmp_path: Path, text: str, name: str = "cfg.yml") -> Path:
    write(tmp_path / "data" / "alpaca.jsonl", '{"instruction": "a", "output": "b"}\n')
    return write(tmp_path / name, text)


OFFLINE = """\
base_model: meta-llama/Llama-3.2-1B
offline: true
datasets:
  - path: data/alpaca.jsonl
    type: alpaca
"""

# --- the pure check, on a fake listing ------------------------------------------------------------------------


def facts(**repos: CachedRepo) -> OfflineFacts:
    return OfflineFacts(dirs=CacheDirs(hub="/cache/hub", datasets="/cache/datasets"),
                        repos={name.replace("__", "--"): repo for name, repo in repos.items()})


def test_a_cached_model_at_main_passes_and_a_missing_one_names_the_fix() -> None:
    model = OfflineAsset(("base_model",), "org/m", "model")
    cached = CachedRepo(refs={"main": COMMIT}, snapshots={COMMIT: frozenset({"config.json"})})
    assert check_offline_assets([model], facts(models__org__m=cached)) == []
    [problem] = check_offline_assets([model], facts())
    assert problem == Problem(("base_model",), "org/m is not in the Hugging Face cache at /cache/hub (offline: true); "
                              "run `hf download org/m` with the same HF_HOME where there is network, or point "
                              "base_model at a local model directory")


def test_a_revision_must_be_cached_too() -> None:
    cached = CachedRepo(refs={"main": COMMIT}, snapshots={COMMIT: frozenset({"config.json"})})
    at_v2 = OfflineAsset(("base_model",), "org/m", "model", revision="v2")
    [problem] = check_offline_assets([at_v2], facts(models__org__m=cached))
    assert "org/m at revision v2 is not in the Hugging Face cache" in problem.message
    assert "`hf download org/m --revision v2`" in problem.message
    by_commit = OfflineAsset(("base_model",), "org/m", "model", revision=COMMIT)
    assert check_offline_assets([by_commit], facts(models__org__m=cached)) == []


def test_a_model_cached_without_its_tokenizer_is_reported_once_per_key() -> None:
    weights_only = CachedRepo(refs={"main": COMMIT}, snapshots={COMMIT: frozenset({"config.json"})})
    assets = [OfflineAsset(("base_model",), "org/m", "model"), OfflineAsset(("base_model",), "org/m", "tokenizer")]
    [problem] = check_offline_assets(assets, facts(models__org__m=weights_only))
    assert "without its tokenizer files (tokenizer_config.json or tokenizer.json" in problem.message
    [missing] = check_offline_assets(assets, facts())  # the model is missing: not also its tokenizer
    assert "is not in the Hugging Face cache" in missing.message


def test_hub_datasets_count_when_prepared_and_streams_never() -> None:
    """Offline, datasets 5's load_dataset("org/d") raises before it reads the Hub cache, then falls back to its own
    prepared copy (CachedDatasetModuleFactory): a datasets--org--d snapshot alone does not load, and is named."""
    dataset = OfflineAsset(("datasets", 0, "path"), "org/d", "dataset")
    prepared = OfflineFacts(dirs=CacheDirs("/h", "/d"), prepared=frozenset({"org___d"}))
    assert check_offline_assets([dataset], prepared) == []
    [problem] = check_offline_assets([dataset], facts())
    assert problem.message == ("org/d is not among the prepared datasets at /cache/datasets (offline: true); run "
                               "`python -c \"import datasets; datasets.load_dataset('org/d')\"` with the same HF_HOME "
                               "where there is network, or point the path at local files")
    hub_copy = CachedRepo(refs={"main": COMMIT}, snapshots={COMMIT: frozenset({"train.parquet"})})
    [problem] = check_offline_assets([dataset], facts(datasets__org__d=hub_copy))
    assert "is in the Hub cache at /cache/hub, but offline the datasets library reads only its own" in problem.message
    stream = OfflineAsset(("pretraining_dataset", 0, "path"), "org/d", "stream")
    [problem] = check_offline_assets([stream], facts(datasets__org__d=hub_copy))
    assert "streamed from the Hugging Face Hub while training" in problem.message


def test_local_paths_pass_and_missing_local_paths_are_named() -> None:
    local = OfflineFacts(dirs=CacheDirs("/h", "/d"), local=frozenset({"./model"}))
    assert check_offline_assets([OfflineAsset(("base_model",), "./model", "model")], local) == []
    [problem] = check_offline_assets([OfflineAsset(("datasets", 1, "path"), "data/x.jsonl", "dataset")], local)
    assert problem.message.startswith("data/x.jsonl: no such file or folder")


def test_cache_dirs_follow_huggingface_hub_and_datasets() -> None:
    assert cache_dirs({"HOME": "/home/u"}) == CacheDirs("/home/u/.cache/huggingface/hub",
                                                         "/home/u/.cache/huggingface/datasets")
    assert cache_dirs({"HF_HOME": "/s/hf"}) == CacheDirs("/s/hf/hub", "/s/hf/datasets")
    assert cache_dirs({"HF_HOME": "/s/hf", "HF_HUB_CACHE": "/hub", "HF_DATASETS_CACHE": "/ds"}) == \
        CacheDirs("/hub", "/ds")
    assert cache_dirs({"XDG_CACHE_HOME": "/x", "HUGGINGFACE_HUB_CACHE": "/legacy"}).hub == "/legacy"


# --- the CLI: located errors, exit 2, nothing written ---------------------------------------------------------


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    return home


def test_compile_refuses_an_uncached_hub_model_and_dataset_with_their_lines(tmp_path: Path, hf_home: Path) -> None:
    cfg = config(tmp_path, OFFLINE + "  - path: tatsu-lab/alpaca\n    type: alpaca\n")
    code, out, err = run_cli("compile", str(cfg), "--target", "cpu", "-o", str(tmp_path / "b"))
    assert code == 2, err
    lines = err.splitlines()
    assert lines[0] == (f"{cfg}:1:13: error: base_model: meta-llama/Llama-3.2-1B is not in the Hugging Face cache at "
                        f"{hf_home}/hub (offline: true); run `hf download meta-llama/Llama-3.2-1B` with the same "
                        "HF_HOME where there is network, or point base_model at a local model directory")
    assert lines[1].startswith(f"{cfg}:6:11: error: datasets[1].path: tatsu-lab/alpaca is not among the prepared "
                               f"datasets at {hf_home}/datasets (offline: true)")
    assert lines[-1] == "2 errors; nothing was written." and "Traceback" not in err
    assert not (tmp_path / "b").exists()
    code, _, err = run_cli("validate", str(cfg), "--target", "cpu")
    assert code == 2 and "meta-llama/Llama-3.2-1B is not in the Hugging Face cache" in err


def test_compile_passes_once_the_model_and_dataset_are_cached(tmp_path: Path, hf_home: Path) -> None:
    cfg = config(tmp_path, OFFLINE + "  - path: tatsu-lab/alpaca\n    type: alpaca\n")
    fake_model(hf_home / "hub", "meta-llama/Llama-3.2-1B")
    fake_model(hf_home / "hub", "tatsu-lab/alpaca", ("README.md", "train.parquet"), kind="datasets")
    code, _, err = run_cli("validate", str(cfg), "--target", "cpu")
    assert code == 2 and "tatsu-lab/alpaca is in the Hub cache at" in err  # not enough offline: see above
    (hf_home / "datasets" / "tatsu-lab___alpaca" / "default" / "0.0.0" / "0123abcd").mkdir(parents=True)
    code, _, err = run_cli("compile", str(cfg), "--target", "cpu", "-o", str(tmp_path / "b"), "--no-vendor")
    assert code == 0, err
    assert "export HF_HUB_OFFLINE=1" in (tmp_path / "b" / "launch.sh").read_text(encoding="utf-8")


def test_the_targets_hf_home_is_the_cache_that_counts(tmp_path: Path, hf_home: Path) -> None:
    site_cache = tmp_path / "site-hf"
    fake_model(site_cache / "hub", "meta-llama/Llama-3.2-1B")
    target = write(tmp_path / "cluster.yml", f"gpu: cpu\nenv:\n  HF_HOME: {site_cache}\n")
    cfg = config(tmp_path, OFFLINE)
    code, _, err = run_cli("validate", str(cfg), "--target", str(target))
    assert code == 0, err  # the compiling environment's HF_HOME (empty) does not count: launch.sh exports the target's
    fake_model(hf_home / "hub", "meta-llama/Llama-3.2-1B")
    code, _, err = run_cli("validate", str(cfg), "--target", "cpu")
    assert code == 0, err


def test_offline_flag_sets_offline_and_checks(tmp_path: Path, hf_home: Path) -> None:
    cfg = config(tmp_path, OFFLINE.replace("offline: true\n", ""))
    code, _, err = run_cli("compile", str(cfg), "--target", "cpu", "-o", str(tmp_path / "b"))
    assert code == 0, err  # online: nothing is checked
    code, _, err = run_cli("compile", str(cfg), "--offline", "--target", "cpu", "-o", str(tmp_path / "c"))
    assert code == 2 and "(offline: true)" in err and not (tmp_path / "c").exists()
    fake_model(hf_home / "hub", "meta-llama/Llama-3.2-1B")
    code, _, err = run_cli("compile", str(cfg), "--offline", "--target", "cpu", "-o", str(tmp_path / "c"),
                           "--no-vendor")
    assert code == 0, err
    assert "export HF_HUB_OFFLINE=1" in (tmp_path / "c" / "launch.sh").read_text(encoding="utf-8")
    assert "offline: true" in (tmp_path / "c" / "config.yaml").read_text(encoding="utf-8")


def test_review_commands_do_not_read_the_cache(tmp_path: Path, hf_home: Path) -> None:
    """explain, diff and the golden check compile on a CI box without the cluster's cache."""
    cfg = config(tmp_path, OFFLINE)
    code, out, err = run_cli("explain", str(cfg), "--target", "cpu")
    assert code == 0, err
    assert "offline" in out


# --- run time: one line, no launcher traceback ----------------------------------------------------------------


def test_runtime_reports_an_uncached_model_and_dataset_in_one_line(tmp_path: Path) -> None:
    """What a bundle does when the cache is not there at run time (compiled where it was): one line, exit 2."""
    from runtime_bundles import build_tiny_model, compile_bundle, launch, workspace, write_config

    model = build_tiny_model(tmp_path / "tiny-model-src")
    work = workspace(tmp_path / "work", model)
    cases = {"model.yml": {"base_model": "meta-llama/Llama-3.2-1B"},
             "data.yml": {"datasets": [{"path": "tatsu-lab/alpaca", "type": "alpaca"}]}}
    expected = {"model.yml": "tunefile runtime: tokenizer meta-llama/Llama-3.2-1B: offline and not in the Hugging "
                             "Face cache",
                "data.yml": "tunefile runtime: dataset tatsu-lab/alpaca: not in the local Hugging Face cache"}
    for name, overrides in cases.items():
        bundle = compile_bundle(write_config(work, name, **overrides), f"bundle-{name}")
        result = launch(bundle, env={"HF_HOME": str(tmp_path / "empty-hf")}, check=False)
        assert result.returncode == 2, result.stderr[-3000:]
        assert expected[name] in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_runtime_error_with_two_processes_has_no_launcher_traceback(tmp_path: Path) -> None:
    from runtime_bundles import build_tiny_model, compile_bundle, launch, workspace, write_config

    work = workspace(tmp_path / "work", build_tiny_model(tmp_path / "tiny-model-src"))
    bundle = compile_bundle(write_config(work, "model.yml", base_model="meta-llama/Llama-3.2-1B"), gpus_per_node=2)
    result = launch(bundle, env={"HF_HOME": str(tmp_path / "empty-hf")}, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "offline and not in the Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_crashed_rank_with_two_processes_gets_one_launcher_line(tmp_path: Path) -> None:
    """A crash that is no user error: the rank's own output stands, the launcher adds one line, not a traceback."""
    from runtime_bundles import build_tiny_model, compile_bundle, launch, workspace, write_config

    work = workspace(tmp_path / "work", build_tiny_model(tmp_path / "tiny-model-src"))
    bundle = compile_bundle(write_config(work, "crash.yml", max_steps=4, save_steps=1), gpus_per_node=2)
    result = launch(bundle, env={"TUNEFILE_FAULT_AFTER_STEP": "2"}, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    launcher_lines = [line for line in result.stderr.splitlines() if line.startswith("tunefile launcher:")]
    assert len(launcher_lines) == 1, result.stderr[-3000:]
    assert "exited with code 17" in launcher_lines[0] and "local rank" in launcher_lines[0]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
