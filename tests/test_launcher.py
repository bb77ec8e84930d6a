"""tunefile.runtime.launcher: accelerate's launch, whose own failure is one line (the launches are in
test_offline_preflight.py; these are the lines themselves)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tunefile.runtime import launcher
from tunefile.runtime.preemption import exit_status_written


def child_failed(*failures: tuple[int, int, int]) -> Exception:
    """A ChildFailedError as torch elastic raises it: (rank, exit code, timestamp) per failed rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    recorded = {}
    for rank, exitcode, timestamp in failures:
        failure = ProcessFailure(local_rank=rank % 2, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")
        failure.timestamp = timestamp
        recorded[rank] = failure
    return ChildFailedError("tunefile.runtime", recorded)


def test_the_first_failed_rank_is_named_with_its_host_and_code() -> None:
    line = launcher.describe_child_failure(child_failed((1, 17, 200), (0, 1, 100), (3, 1, 300)))
    assert line == (f"tunefile launcher: rank 0 (local rank 0) on {socket.gethostname()} exited with code 1 "
                    f"(and 2 more ranks); its own output above says why")


def test_a_rank_killed_by_a_signal_is_named_by_the_signal() -> None:
    line = launcher.describe_child_failure(child_failed((1, -int(signal.SIGKILL), 5)))
    assert "rank 1 (local rank 1)" in line and "was killed by SIGKILL;" in line and "more rank" not in line


def test_a_written_status_is_what_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status = tmp_path / "status"
    monkeypatch.setenv("TUNEFILE_EXIT_STATUS_FILE", str(status))
    assert not exit_status_written()  # no file yet
    status.write_text("")
    assert not exit_status_written()  # launch.sh's mktemp: empty until a rank writes
    status.write_text("2\n")
    assert exit_status_written()
    monkeypatch.delenv("TUNEFILE_EXIT_STATUS_FILE")
    assert not exit_status_written()


# --- which Python launch.sh starts the launcher in ------------------------------------------------------------


def recording_python(path: Path, record: Path) -> Path:
    """A stand-in interpreter that writes its own name and arguments to RECORD and exits 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/bash\necho "$0 $*" >> {record}\n', encoding="utf-8")
    path.chmod(0o755)
    return path


def accelerate_script(bin_dir: Path, first_line: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "accelerate"
    script.write_text(f"{first_line}\nimport sys\n", encoding="utf-8")
    script.chmod(0o755)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime_bundles import build_tiny_model, compile_bundle, workspace, write_config

    tmp = tmp_path_factory.mktemp("launcher")
    work = workspace(tmp / "work", build_tiny_model(tmp / "tiny-model-src"))
    return compile_bundle(write_config(work, "cfg.yml"))


def run_launch(bundle: Path, path_dirs: list[Path], env: dict[str, str] | None = None) -> str:
    import os
    import subprocess

    environment = {key: value for key, value in os.environ.items() if key != "TUNEFILE_PYTHON"}
    environment["PATH"] = os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"])
    environment.update(env or {})
    result = subprocess.run(["bash", str(bundle / "launch.sh")], cwd=bundle.parent, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_the_launcher_runs_in_the_python_on_accelerates_first_line(bundle: Path, tmp_path: Path) -> None:
    record = tmp_path / "record"
    env_python = recording_python(tmp_path / "env" / "bin" / "python3.11", record)
    other_python3 = recording_python(tmp_path / "other" / "python3", record)
    accelerate_script(tmp_path / "env" / "bin", f"#!{env_python}")
    run_launch(bundle, [tmp_path / "env" / "bin", other_python3.parent])
    (line,) = record.read_text().splitlines()
    assert line.startswith(f"{env_python} -m tunefile.runtime.launcher --config_file {bundle}/accelerate.yaml")
    assert line.endswith(f"-m tunefile.runtime train {bundle}/config.yaml")


@pytest.mark.parametrize("first_line", ["#!/usr/bin/env python3", "#!/bin/sh", "#!/nowhere/bin/python3"])
def test_other_first_lines_fall_back_to_python3(bundle: Path, tmp_path: Path, first_line: str) -> None:
    """`env python3`, pip's `/bin/sh` trampoline for long paths, an interpreter that is gone: python3 on PATH."""
    record = tmp_path / "record"
    python3 = recording_python(tmp_path / "path" / "python3", record)
    accelerate_script(tmp_path / "acc", first_line)
    run_launch(bundle, [tmp_path / "acc", python3.parent])
    assert record.read_text().startswith(f"{python3} -m tunefile.runtime.launcher ")


def test_tunefile_python_overrides(bundle: Path, tmp_path: Path) -> None:
    record = tmp_path / "record"
    chosen = recording_python(tmp_path / "site" / "python", record)
    env_python = recording_python(tmp_path / "env" / "bin" / "python3", tmp_path / "not-this")
    accelerate_script(tmp_path / "env" / "bin", f"#!{env_python}")
    run_launch(bundle, [tmp_path / "env" / "bin"], env={"TUNEFILE_PYTHON": str(chosen)})
    assert record.read_text().startswith(f"{chosen} -m tunefile.runtime.launcher ")
    assert not (tmp_path / "not-this").exists()
