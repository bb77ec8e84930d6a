"""The generated job.sbatch under a real two-node SLURM.

`.ci/slurm-up.sh` starts a SLURM cluster of two nodes (two slurmd) on one host, partition `debug`.
This test compiles tests/golden_configs/multinode-slurm.yml for 2 CPU nodes, puts a stand-in for
accelerate's Python first on PATH (tests/slurm_fixtures/python, named on the #! line of an `accelerate`
beside it, as pip writes it: it records its argv and environment, then exits 0), submits the bundle's
job.sbatch with sbatch and checks what each node launched.

Without SLURM the test skips; in CI (CI=true) it fails instead, so it is never silently skipped there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_helpers import NODES, PARTITION, TERMINAL_STATES, clean_env, require_cluster

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests" / "golden_configs" / "multinode-slurm.yml"
STUB = REPO / "tests" / "slurm_fixtures" / "python"
JOB_TIMEOUT_S = 120  # generous: the job itself takes a couple of seconds

TARGET = f"""\
# A CPU target for the two-node SLURM cluster that .ci/slurm-up.sh starts.
gpu: cpu
nodes: {NODES}
gpus_per_node: 1
partition: {PARTITION}
time: "00:05:00"
cpus_per_task: 1
"""


@pytest.fixture(scope="module")
def slurm() -> None:
    require_cluster()


def _tunefile() -> list[str]:
    script = Path(sys.executable).with_name("tunefile")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from tunefile.compiler.cli import main; main()"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """multinode-slurm.yml compiled for two CPU nodes of the `debug` partition."""
    root = tmp_path_factory.mktemp("slurm-compile")
    # The golden config names its own (H100) target; drop that line so --target decides.
    text = "".join(line for line in CONFIG.read_text(encoding="utf-8").splitlines(keepends=True)
                   if not line.startswith("target:"))
    config = root / "multinode-slurm.yml"
    config.write_text(text, encoding="utf-8")
    target = root / "slurm-ci.yml"
    target.write_text(TARGET, encoding="utf-8")
    out = root / "bundle"
    command = [*_tunefile(), "compile", str(config), "--output", str(out), "--target", str(target),
               "--nodes", str(NODES), "--gpus-per-node", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    assert (out / "job.sbatch").is_file(), f"no job.sbatch in the bundle: {sorted(p.name for p in out.iterdir())}"
    return out


def _job_fields(job_id: int) -> dict[str, str]:
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                            timeout=30, env=clean_env())
    if result.returncode != 0:
        return {}
    # One line of Key=Value pairs; values have no spaces except in a few fields we do not read.
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def _wait_for(job_id: int) -> dict[str, str]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        fields = _job_fields(job_id)
        if fields.get("JobState") in TERMINAL_STATES:
            return fields
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
            pytest.fail(f"job {job_id} did not finish within {JOB_TIMEOUT_S}s: {fields}")
        time.sleep(0.5)


def _option(argv: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in argv (the last one wins, as in argparse)."""
    value = None
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


@pytest.mark.parametrize("submit_from", ["bundle-dir", "elsewhere"])
def test_job_sbatch_launches_one_rank_per_node(slurm: None, bundle: Path, tmp_path: Path, submit_from: str) -> None:
    bin_dir = tmp_path / "bin"
    records = tmp_path / "records"
    work = tmp_path / "work"
    for directory in (bin_dir, records, work):
        directory.mkdir()
    # slurmd (root here) runs the job as the submitting user; keep everything it touches readable.
    for directory in (tmp_path, bin_dir, records, work):
        directory.chmod(0o777)
    stub = bin_dir / "python"
    stub_text = STUB.read_text(encoding="utf-8").replace("@RECORDS@", str(records))
    stub.write_text(f"#!{sys.executable}\n" + stub_text.split("\n", 1)[1], encoding="utf-8")
    stub.chmod(0o755)
    (bin_dir / "accelerate").write_text(f"#!{stub}\n", encoding="utf-8")
    (bin_dir / "accelerate").chmod(0o755)

    env = clean_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["TUNEFILE_TEST_RECORDS"] = str(records)
    if submit_from == "bundle-dir":
        # The README's way: cd into the bundle and submit.
        cwd, script = bundle, "job.sbatch"
    else:
        # From another directory, naming the script by a relative path: SLURM spools a copy of the script,
        # so the job must find its bundle some other way than the script's own location.
        cwd, script = work, os.path.relpath(bundle / "job.sbatch", work)

    submit = subprocess.run(["sbatch", "--parsable", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=60)
    assert submit.returncode == 0, f"sbatch {script} (in {cwd}) failed:\n{submit.stdout}\n{submit.stderr}"
    job_id = int(submit.stdout.strip().split(";")[0])
    fields = _wait_for(job_id)

    launches = []
    for path in sorted(records.glob("launch-*.json")):
        launches.append(json.loads(path.read_text(encoding="utf-8")))
    context = f"\n--- job {job_id}: JobState={fields.get('JobState')} ExitCode={fields.get('ExitCode')} " \
              f"Reason={fields.get('Reason')}"
    for stream in ("StdOut", "StdErr"):
        log = fields.get(stream, "")
        text = Path(log).read_text(encoding="utf-8", errors="replace") if log and Path(log).is_file() \
            else "(missing)"
        context += f"\n--- job {stream} ({log}):\n{text}"
    context += (f"\n--- launch records:\n{json.dumps(launches, indent=2)}"
                f"\n--- job.sbatch:\n{(bundle / 'job.sbatch').read_text(encoding='utf-8')}")

    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", "the job failed" + context
    assert len(launches) == NODES, f"expected {NODES} launches of accelerate, got {len(launches)}" + context

    ranks = sorted(launch["env"]["NODE_RANK"] or "" for launch in launches)
    assert ranks == [str(rank) for rank in range(NODES)], f"NODE_RANK per launch: {ranks}" + context
    nodes = {launch["env"]["SLURMD_NODENAME"] for launch in launches}
    assert len(nodes) == NODES, f"the launches did not run on {NODES} different nodes: {nodes}" + context

    addresses = {launch["env"]["MASTER_ADDR"] for launch in launches}
    ports = {launch["env"]["MASTER_PORT"] for launch in launches}
    assert len(addresses) == 1 and None not in addresses and "" not in addresses, \
        f"the nodes disagree on MASTER_ADDR: {addresses}" + context
    assert len(ports) == 1, f"the nodes disagree on MASTER_PORT: {ports}" + context
    head = next(launch["env"]["SLURMD_NODENAME"] for launch in launches if launch["env"]["NODE_RANK"] == "0")
    # The head's address as SLURM knows it (NodeAddr), which the other nodes reach even where names do not resolve.
    node = subprocess.run(["scontrol", "show", "node", head], capture_output=True, text=True, timeout=30,
                          env=clean_env()).stdout
    head_addr = re.search(r"NodeAddr=(\S+)", node)
    assert head_addr and addresses == {head_addr.group(1)}, \
        f"MASTER_ADDR {addresses} is not the NodeAddr of rank 0's node ({head}): {node}" + context
    port = ports.pop()
    assert port == str(20000 + job_id % 20000), \
        f"MASTER_PORT {port!r} is not 20000 + job id ({job_id}) % 20000 = {20000 + job_id % 20000}" + context

    bundle_dir = _real(bundle)
    for launch in launches:
        argv, rank = launch["argv"], launch["env"]["NODE_RANK"]
        where = f" (rank {rank} on {launch['env']['SLURMD_NODENAME']}: {argv})" + context
        assert argv[:2] == ["-m", "tunefile.runtime.launcher"], \
            "accelerate's launch was not started as `python -m tunefile.runtime.launcher`" + where
        assert launch["env"]["SLURM_NODEID"] == rank, "NODE_RANK is not the task's SLURM_NODEID" + where
        assert _option(argv, "--num_machines") == str(NODES), f"not --num_machines {NODES}" + where
        assert _option(argv, "--machine_rank") == rank, f"not --machine_rank {rank}" + where
        config_file = _option(argv, "--config_file")
        assert config_file is not None and os.path.isabs(config_file), \
            "--config_file is missing or not an absolute path" + where
        assert _real(config_file) == os.path.join(bundle_dir, "accelerate.yaml"), \
            "--config_file is not the bundle's accelerate.yaml" + where
        for name, expected in (("--main_process_ip", launch["env"]["MASTER_ADDR"]),
                               ("--main_process_port", port)):
            if _option(argv, name) is not None:
                assert _option(argv, name) == expected, f"{name} disagrees with the environment" + where
        starts = [index for index in range(len(argv) - 3)
                  if argv[index:index + 3] == ["-m", "tunefile.runtime", "train"]]
        assert starts, "argv lacks `-m tunefile.runtime train <bundle>/config.yaml`" + where
        config = argv[starts[-1] + 3]
        assert os.path.isabs(config) and _real(config) == os.path.join(bundle_dir, "config.yaml"), \
            f"the training config {config!r} is not <bundle>/config.yaml as an absolute path" + where
