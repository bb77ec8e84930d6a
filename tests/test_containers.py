"""Containers in job.sbatch: pyxis/enroot and Apptainer/Singularity.

The target file's container settings are checked with their line; job.sbatch runs under bash with the SLURM
variables set by hand and recording stand-ins for scontrol, srun and apptainer first on PATH (no SLURM, no
container runtime needed), and the tests assert the exact argv each one received.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import MINIMAL, require_tool, run_cli, write
from plan_factory import AWKWARD, make_plan
from tunefile.compiler.render import render_bundle
from tunefile.compiler.targets import SlurmSettings

DATASET = "/data/shared/alpaca.jsonl"  # the config's dataset, at an absolute path
LAUNCH = ["bash", "-c", 'NODE_RANK="$SLURM_NODEID" exec bash "$1"', "bash"]

# Records its argv (and the variables a container runtime reads) as one JSON file per call; with
# STUB_EXEC_AFTER_OPTIONS=1 it then runs what follows its own --options, as srun runs its task.
RECORDER = f"""#!{sys.executable}
import json, os, sys
name = os.path.basename(sys.argv[0])
records = os.environ["STUB_RECORDS"]
count = len(os.listdir(records))
env = {{key: value for key, value in os.environ.items() if key.startswith(("APPTAINERENV_", "SINGULARITYENV_"))}}
with open(os.path.join(records, f"{{count:03d}}-{{name}}.json"), "w") as handle:
    json.dump({{"name": name, "argv": sys.argv[1:], "env": env, "cwd": os.getcwd()}}, handle)
if name == "srun" and os.environ.get("STUB_EXEC_AFTER_OPTIONS") == "1":
    args = sys.argv[1:]
    while args and args[0].startswith("--"):
        args.pop(0)
    os.execvp(args[0], args)
"""


def scontrol_stub(bundle: Path) -> str:
    return ("#!/usr/bin/env bash\n"
            'case "$2" in\n'
            f'    job) echo "   Command={bundle}/job.sbatch" ;;\n'
            '    hostnames) printf "node1\\nnode2\\n" ;;\n'
            '    node) echo "   NodeAddr=10.0.0.1 NodeHostName=node1" ;;\n'
            "esac\n")


def compile_bundle(tmp_path: Path, target: str, *, config_extra: str = "") -> tuple[Path, Path, Path]:
    """(submit directory, bundle, output_dir): the bundle compiled through the CLI from a config and target."""
    submit = tmp_path / "submit"
    output_dir = tmp_path / "out"
    config = write(submit / "run.yml", MINIMAL.replace("path: data/alpaca.jsonl", "path: /data/shared/alpaca.jsonl")
                   + f"output_dir: {output_dir}\ntarget: cluster.yml\n" + config_extra)
    write(submit / "cluster.yml", target)
    bundle = submit / "bundle"
    code, _, err = run_cli("compile", str(config), "--output", str(bundle))
    assert code == 0, err
    return submit, bundle, output_dir


def run_job(submit: Path, bundle: Path, tmp_path: Path, *, exec_task: bool = False) -> list[dict]:
    """Run job.sbatch as SLURM would on the head node of job 4242; return the stand-ins' records in order."""
    bin_dir, records = tmp_path / "bin", tmp_path / "records"
    records.mkdir()
    for name in ("srun", "apptainer", "singularity"):
        write(bin_dir / name, RECORDER).chmod(0o755)
    write(bin_dir / "scontrol", scontrol_stub(bundle)).chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM", "TUNEFILE_", "APPTAINERENV_", "SINGULARITYENV_"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_RECORDS=str(records), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="8",
               STUB_EXEC_AFTER_OPTIONS="1" if exec_task else "0", HOST_ONLY="from the host")
    result = subprocess.run(["bash", str(bundle / "job.sbatch")], cwd=submit, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(path.read_text()) for path in sorted(records.iterdir())]


def the_step(records: list[dict]) -> dict:
    """The srun call that starts the training step (the one that runs launch.sh)."""
    steps = [record for record in records if record["name"] == "srun" and any("launch.sh" in a for a in record["argv"])]
    assert len(steps) == 1, records
    return steps[0]


PYXIS_TARGET = """\
gpu: a100-80gb
nodes: 2
gpus_per_node: 4
container_image: nvcr.io#nvidia/pytorch:24.05-py3
container_mounts:
  - /lustre/data:/data:ro
  - /lustre/scratch:/scratch:rw+x-create=dir
container_env: [HOST_ONLY, PATH]
container_mount_home: false
env:
  HF_HOME: /hf-cache
"""


def test_pyxis_argv(tmp_path: Path) -> None:
    submit, bundle, out = compile_bundle(tmp_path, PYXIS_TARGET)
    step = the_step(run_job(submit, bundle, tmp_path))
    # The bundle and the submit directory (always), HF_HOME, output_dir (absolute in the config), the user's
    # mounts. The dataset at /data/shared/… is not mounted again: the user's /lustre/data:/data holds it.
    mounts = ",".join([f"{bundle}:{bundle}", f"{submit}:{submit}", "/hf-cache:/hf-cache", f"{out}:{out}",
                       "/lustre/data:/data:ro", "/lustre/scratch:/scratch:rw+x-create=dir"])
    assert step["argv"] == [
        "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        "--container-image=nvcr.io#nvidia/pytorch:24.05-py3", f"--container-mounts={mounts}",
        f"--container-workdir={submit}", "--no-container-mount-home", "--container-env=HOST_ONLY,PATH",
        *LAUNCH, f"{bundle}/launch.sh"]
    assert out.is_dir()  # a mount's source must exist: job.sbatch made output_dir


def test_pyxis_defaults_and_the_old_spelling(tmp_path: Path) -> None:
    """`container:` is container_image's old spelling; home stays mounted, no env list, workdir is $PWD."""
    submit, bundle, out = compile_bundle(tmp_path, "gpu: h100-80gb\ncontainer: /images/pytorch.sqsh\n")
    step = the_step(run_job(submit, bundle, tmp_path))
    assert step["argv"] == [
        "--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--container-image=/images/pytorch.sqsh",
        f"--container-mounts={bundle}:{bundle},{submit}:{submit},{DATASET}:{DATASET},{out}:{out}",
        f"--container-workdir={submit}",
        *LAUNCH, f"{bundle}/launch.sh"]


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
def test_apptainer_argv_inside_srun(runtime: str, tmp_path: Path) -> None:
    target = (f"gpu: h100-80gb\nnodes: 2\ngpus_per_node: 8\ncontainer_runtime: {runtime}\n"
              "container_image: /images/pytorch 24.05.sif\ncontainer_mounts: [/lustre/data:/data:ro]\n"
              "container_workdir: /workspace\ncontainer_env: [HOST_ONLY, NOT_SET_ON_HOST]\n"
              "container_mount_home: false\n")
    submit, bundle, out = compile_bundle(tmp_path, target)
    records = run_job(submit, bundle, tmp_path, exec_task=True)
    mounts = f"{bundle}:{bundle},{submit}:{submit},{out}:{out},/lustre/data:/data:ro"
    container = [runtime, "exec", "--nv", "--bind", mounts, "--pwd", "/workspace", "--no-home",
                 "/images/pytorch 24.05.sif", *LAUNCH, f"{bundle}/launch.sh"]
    assert the_step(records)["argv"] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *container]
    inside = [record for record in records if record["name"] == runtime]
    assert [record["argv"] for record in inside] == [container[1:]]
    # container_env: the host's value wins over the image's, through the runtime's own variables; a variable the
    # host does not set is left to the image.
    prefix = "APPTAINERENV_" if runtime == "apptainer" else "SINGULARITYENV_"
    assert inside[0]["env"] == {f"{prefix}HOST_ONLY": "from the host"}


def test_apptainer_on_a_cpu_target_has_no_nv(tmp_path: Path) -> None:
    target = "gpu: cpu\ngpus_per_node: 2\ncontainer_runtime: apptainer\ncontainer_image: docker://python:3.11\n"
    submit, bundle, out = compile_bundle(tmp_path, target)
    step = the_step(run_job(submit, bundle, tmp_path))
    mounts = f"{bundle}:{bundle},{submit}:{submit},{DATASET}:{DATASET},{out}:{out}"
    assert step["argv"][3:] == ["apptainer", "exec", "--bind", mounts,
                                "--pwd", str(submit), "docker://python:3.11", *LAUNCH, f"{bundle}/launch.sh"]


def test_config_paths_are_mounted_once(tmp_path: Path) -> None:
    """Absolute paths in the config are mounted where they are; one under another mount is not repeated."""
    extra = ("lora_model_dir: /adapters/run1\ntokenizer_config: /hf-cache/tok\n"
             "dataset_prepared_path: /lustre/scratch/prepared\nadapter: lora\n")
    target = PYXIS_TARGET.replace("/lustre/scratch:/scratch:rw+x-create=dir", "/lustre/scratch:/lustre/scratch")
    submit, bundle, out = compile_bundle(tmp_path, target, config_extra=extra)
    text = (bundle / "job.sbatch").read_text()
    assert [line for line in text.splitlines() if line.startswith("CONTAINER_MOUNTS+=,")] == [
        "CONTAINER_MOUNTS+=,/hf-cache:/hf-cache", "CONTAINER_MOUNTS+=,/adapters/run1:/adapters/run1",
        f"CONTAINER_MOUNTS+=,{out}:{out}", "CONTAINER_MOUNTS+=,/lustre/data:/data:ro",
        "CONTAINER_MOUNTS+=,/lustre/scratch:/lustre/scratch"]
    assert "# lora_model_dir from the config" in text and "# HF_HOME from the target's env" in text


def test_paths_a_mount_cannot_hold_stop_the_job_in_one_line(tmp_path: Path) -> None:
    submit, bundle, _ = compile_bundle(tmp_path, "gpu: h100-80gb\ncontainer: /images/pytorch.sqsh\n")
    odd = tmp_path / "a,b"
    odd.mkdir()
    env = {**os.environ, "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "node1", "TUNEFILE_BUNDLE_DIR": str(bundle),
           "TUNEFILE_MASTER_ADDR": "127.0.0.1"}
    bin_dir = tmp_path / "bin"
    write(bin_dir / "scontrol", scontrol_stub(bundle)).chmod(0o755)
    write(bin_dir / "srun", "#!/bin/sh\nexit 99\n").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    result = subprocess.run(["bash", str(bundle / "job.sbatch")], cwd=odd, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "which a container mount cannot" in result.stderr.strip().splitlines()[-1]


def test_verify_passes_for_a_bundle_with_mounts(tmp_path: Path) -> None:
    _, bundle, _ = compile_bundle(tmp_path, PYXIS_TARGET)
    assert run_cli("verify", str(bundle))[0] == 0
    assert "--container-mounts" in (bundle / "job.sbatch").read_text()


# --- what the target file may say, and where it is wrong -------------------------------------------

@pytest.mark.parametrize("setting, place, fragment", [
    ("container_mounts: [/data]\n", "3:20", "container_mounts[0]: '/data' is not src:dst or src:dst:flags"),
    ("container_mounts:\n  - data:/data\n", "4:5", "container_mounts[0]: 'data' is not an absolute path"),
    ("container_mounts:\n  - /a,b:/data\n", "4:5", "container_mounts[0]: '/a,b' contains ','"),
    ("container_mounts:\n  - $HOME/x:/x\n", "4:5", "'$HOME/x': variables are not expanded in mounts"),
    ("container_mounts: [/a:/b:ro;rm]\n", "3:20", "mount flags 'ro;rm': 'ro;rm' is not an enroot"),
    ("container_runtime: docker\n", "3:20", "container_runtime: unknown container runtime 'docker'"),
    ("container_workdir: work\n", "3:20", "container_workdir: must be an absolute path"),
    ("container_env: [A-B]\n", "3:17", "container_env[0]: not an environment variable name: 'A-B'"),
    ("container_mount_home: no-thanks\n", "3:23", "container_mount_home: must be a bool, got str"),
    ("container_image: /x.sqsh\n", "1:12", "container: container and container_image are the same setting"),
    ("env:\n  HF_HOME: ./cache\n", "4:12", "env.HF_HOME: the container mounts HF_HOME at the same path"),
])
def test_bad_container_settings_are_located(tmp_path: Path, setting: str, place: str, fragment: str) -> None:
    target = write(tmp_path / "t.yml", "container: nvcr.io#nvidia/pytorch:24.05-py3\ngpu: h100-80gb\n" + setting)
    config = write(tmp_path / "c.yml", MINIMAL + "target: t.yml\n")
    code, _, err = run_cli("compile", str(config), "--output", str(tmp_path / "b"))
    assert code == 2 and f"{target}:{place}: error: " in err and fragment in err, err
    assert "Traceback" not in err and not (tmp_path / "b").exists()


@pytest.mark.parametrize("setting, fragment", [
    ("container_runtime: apptainer\ncontainer_image: nvcr.io#nvidia/pytorch\n",
     "container_image: apptainer runs an image file or URI"),
    ("container_runtime: apptainer\ncontainer_image: /x.sif\ncontainer_mounts: [/a:/b:ro+nosuid]\n",
     "container_mounts[0]: apptainer mount flags are ro or rw"),
    ("container_image: --privileged\n", "container_image: '--privileged' would be read as an option"),
    ("container_mounts: [/a:/b]\n", "container_mounts: needs container_image"),
])
def test_runtime_specific_settings(tmp_path: Path, setting: str, fragment: str) -> None:
    target = write(tmp_path / "t.yml", "gpu: h100-80gb\n" + setting)
    config = write(tmp_path / "c.yml", MINIMAL + "target: t.yml\n")
    code, _, err = run_cli("compile", str(config), "--output", str(tmp_path / "b"))
    assert code == 2 and f"{target}:" in err and fragment in err, err


def test_a_config_path_a_container_cannot_mount_is_located_in_the_config(tmp_path: Path) -> None:
    write(tmp_path / "t.yml", "gpu: h100-80gb\ncontainer: /images/pytorch.sqsh\n")
    config = write(tmp_path / "c.yml", MINIMAL + "target: t.yml\noutput_dir: /scratch/run:1\n")
    code, _, err = run_cli("compile", str(config), "--output", str(tmp_path / "b"))
    assert code == 2 and f"{config}:6:13: error: output_dir: cannot be mounted into the target's container" in err
    # Without a container the same path is fine.
    write(tmp_path / "t.yml", "gpu: h100-80gb\n")
    assert run_cli("compile", str(config), "--output", str(tmp_path / "b"))[0] == 0


# --- every variant is quoted and passes shellcheck ------------------------------------------------

CONTAINERS = {
    "pyxis": SlurmSettings(container_image=AWKWARD, container_mounts=("/a b:/c:ro",), container_workdir="/w d",
                           container_env=("PATH",), container_mount_home=False),
    "apptainer": SlurmSettings(container_image="/images/it's.sif", container_runtime="apptainer",
                               container_mounts=("/a:/b:ro",), container_env=("PATH", "HOME")),
    "singularity": SlurmSettings(container_image="docker://x/y:1", container_runtime="singularity"),
}


@pytest.mark.parametrize("variant", ["slurm", "cpu"])
@pytest.mark.parametrize("runtime", sorted(CONTAINERS))
def test_container_job_sbatch_passes_shellcheck(runtime: str, variant: str, tmp_path: Path) -> None:
    shellcheck = require_tool("shellcheck")
    plan = make_plan(variant, spec={"output_dir": "/scratch/out put", "dataset_prepared_path": "/scratch/prep"})
    plan = replace(plan, target=replace(plan.target, slurm=CONTAINERS[runtime],
                                        env=(("HF_HOME", "/hf cache"), *plan.target.env)))
    path = write(tmp_path / "job.sbatch", render_bundle(plan)["job.sbatch"])
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.read_text()
    assert "mkdir -p /scratch/prep '/scratch/out put'" in text
    assert ("--nv" in text) == (variant == "slurm" and runtime != "pyxis")


def test_settings_built_in_code_still_meet_the_renderer_checks() -> None:
    plan = make_plan("slurm")
    for slurm in (SlurmSettings(container_image="x", container_mounts=("/a,b:/c",)),
                  SlurmSettings(container_image="x", container_runtime="docker"),
                  SlurmSettings(container_image="x", container_env=("A;B",)),
                  SlurmSettings(container_image="x\ny")):
        with pytest.raises(ValueError):
            render_bundle(replace(plan, target=replace(plan.target, slurm=slurm)))
