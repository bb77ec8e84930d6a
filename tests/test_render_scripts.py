"""launch.sh and job.sbatch: what they say, that they parse and pass shellcheck, that they run (with
stand-ins for accelerate, scontrol and srun), and that unsafe values never reach them."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jinja2
import pytest
from click.testing import CliRunner

from helpers import MINIMAL, require_tool, write
from plan_factory import AWKWARD, VARIANTS, make_plan, render, slurm_plan
from tunefile.compiler.bundle import write_bundle
from tunefile.compiler.cli import cli
from tunefile.compiler.render import render_bundle
from tunefile.compiler.render.scripts import _environment, render_template
from tunefile.compiler.shell import UnsafeValueError, shell_quote
from tunefile.compiler.targets import SlurmSettings

# --- launch.sh and job.sbatch -------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("script", ["launch.sh", "job.sbatch"])
def test_scripts_parse(variant: str, script: str, tmp_path: Path) -> None:
    path = write(tmp_path / script, render(variant)[script])
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("script", ["launch.sh", "job.sbatch"])
def test_scripts_pass_shellcheck(variant: str, script: str, tmp_path: Path) -> None:
    shellcheck = require_tool("shellcheck")  # a skip on a laptop without it; a failure under CI=true
    plan = make_plan(variant, spec={"offline": True})
    plan = replace(plan, target=replace(plan.target, env=(("ODD", AWKWARD), *plan.target.env),
                                        slurm=replace(plan.target.slurm,
                                                      container_image="nvcr.io/nvidia/pytorch:24.05-py3")))
    path = write(tmp_path / script, render_bundle(plan)[script])
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_launch_sh_header_and_command() -> None:
    text = render("deepspeed")["launch.sh"]
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    assert "# Full fine-tune of meta-llama/Llama-3.1-8B" in lines
    assert "# LoRA (r=8, alpha=16) on meta-llama/Llama-3.1-8B" in render("ddp")["launch.sh"].splitlines()
    assert any("1 node(s) × 2 GPU(s): a100-80gb, strategy DeepSpeed ZeRO-3" in line for line in lines)
    assert "# Batch: 2 micro batch × 4 accumulation × 2 GPUs = 16 sequences per optimizer step" in text
    assert 'BUNDLE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"' in lines
    assert 'NODE_RANK="${NODE_RANK:-0}"' in lines and 'MASTER_PORT="${MASTER_PORT:-29500}"' in lines
    assert "relative paths in config.yaml" in text.lower()
    assert "export TOKENIZERS_PARALLELISM=false" in lines and "TF32 matmuls: off" in text
    assert "HF_HUB_OFFLINE" not in text
    # In the background, in a session of its own, with SIGUSR2 ignored (launch.sh's traps ask the ranks to stop);
    # accelerate's launch through tunefile.runtime.launcher, in accelerate's own Python.
    assert '( trap \'\' USR2; exec setsid "$LAUNCH_PYTHON" -m tunefile.runtime.launcher \\' in lines
    launch_line = text[text.index('exec setsid "$LAUNCH_PYTHON"') + len("exec setsid "):text.index(" ) &")]
    command = shlex.split(launch_line.replace("\\\n", " "))
    assert command == ["$LAUNCH_PYTHON", "-m", "tunefile.runtime.launcher",
                       "--config_file", "$BUNDLE_DIR/accelerate.yaml",
                       "--num_machines", "1", "--num_processes", "2", "--machine_rank", "$NODE_RANK",
                       "--main_process_ip", "$MASTER_ADDR", "--main_process_port", "$MASTER_PORT",
                       "--deepspeed_config_file", "$BUNDLE_DIR/deepspeed.json",
                       "--deepspeed_multinode_launcher", "standard",
                       "-m", "tunefile.runtime", "train", "$BUNDLE_DIR/config.yaml"]
    assert "deepspeed" not in render("single")["launch.sh"].split("-m tunefile.runtime.launcher")[1]
    # accelerate reports a failed rank as 1: the runtime's own status (2, 3, 75) comes back through a file.
    assert 'exit "$status"' in lines
    assert 'trap \'rm -f "$TUNEFILE_EXIT_STATUS_FILE" "$TUNEFILE_STOP_FILE"\' EXIT' in lines
    assert "trap 'request_stop USR2' USR2" in lines and "trap 'request_stop INT' INT" in lines


def test_offline_exports_come_before_any_python() -> None:
    text = render("single", spec={"offline": True})["launch.sh"]
    assert text.index("HF_HUB_OFFLINE=1") < text.index("-m tunefile.runtime.launcher")
    assert "HF_DATASETS_OFFLINE=1" in text and "TRANSFORMERS_OFFLINE=1" in text


def test_env_values_are_quoted_as_one_word() -> None:
    plan = make_plan("single")
    plan = replace(plan, target=replace(plan.target, env=(("ODD", AWKWARD), ("PLAIN", "x"))))
    text = render_bundle(plan)["launch.sh"]
    export = next(line for line in text.splitlines() if line.startswith("export ODD="))
    assert shlex.split(export) == ["export", f"ODD={AWKWARD}"]
    assert "export PLAIN=x" in text


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\0b"])
def test_multi_line_values_are_rejected(value: str) -> None:
    with pytest.raises(UnsafeValueError):
        shell_quote(value)
    plan = make_plan("single")
    with pytest.raises(ValueError):
        render_bundle(replace(plan, target=replace(plan.target, env=(("X", value),))))


def test_bad_env_names_are_rejected() -> None:
    plan = make_plan("single")
    with pytest.raises(ValueError, match="environment variable name"):
        render_bundle(replace(plan, target=replace(plan.target, env=(("A=B; rm", "x"),))))


def sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_sbatch_lines_hold_no_shell_variables(variant: str) -> None:
    lines = sbatch_lines(render(variant)["job.sbatch"])
    assert lines and not any("$" in line for line in lines)
    assert "#SBATCH --ntasks-per-node=1" in lines


def test_sbatch_lines_of_a_cluster_target() -> None:
    assert sbatch_lines(render("slurm")["job.sbatch"]) == [
        "#SBATCH --job-name=llama8b-full", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=96", "#SBATCH --partition=gpu",
        "#SBATCH --account=ml-research", "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --mem=0",
        "#SBATCH --time=2-00:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR2@300",
        "#SBATCH --open-mode=append", "#SBATCH --output=logs/%x-%j.out", "#SBATCH --error=logs/%x-%j.err",
    ]
    assert "SLURM does not create logs/" in render("slurm")["job.sbatch"]


def test_sbatch_defaults_without_cluster_settings() -> None:
    gpu, cpu = render("ddp")["job.sbatch"], render("cpu")["job.sbatch"]
    assert sbatch_lines(gpu) == [
        "#SBATCH --job-name=tunefile-ddp", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32", "#SBATCH --time=24:00:00",
        "#SBATCH --requeue", "#SBATCH --signal=B:USR2@300", "#SBATCH --open-mode=append",
        "#SBATCH --output=%x-%j.out", "#SBATCH --error=%x-%j.err",
    ]
    assert "8 CPUs per GPU" in gpu
    assert "--gpus-per-node" not in cpu and "#SBATCH --cpus-per-task=16" in cpu and "8 CPUs per process" in cpu


def test_job_name_is_a_slug_of_the_config_name() -> None:
    text = render("single", config_name="my run (v2).yaml")["job.sbatch"]
    assert "#SBATCH --job-name=tunefile-my-run-v2" in text


@pytest.mark.parametrize("setting", [{"partition": "gpu; rm -rf /"}, {"job_name": "my job"}, {"account": "$USER"},
                                     {"qos": "a\nb"}, {"mem": "8 G"}, {"time": "1 day"}, {"log_dir": "my logs"}])
def test_unsafe_sbatch_values_are_rejected(setting: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="#SBATCH"):
        render_bundle(slurm_plan(**setting))


def test_job_sbatch_body() -> None:
    text = render_bundle(slurm_plan(container_image="nvcr.io/nvidia/pytorch:24.05 py3"))["job.sbatch"]
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    assert "module load cuda/12.4" in lines and 'source "$HOME/venvs/tunefile/bin/activate"' in lines
    assert "TUNEFILE_BUNDLE_DIR" in text and "scontrol show job" in text
    assert 'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"' in lines
    assert 'MASTER_ADDR="${TUNEFILE_MASTER_ADDR:-${head_addr:-$head_node}}"' in lines
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in lines and "export MASTER_ADDR MASTER_PORT" in lines
    srun = text[text.index("\nsrun ") + 1:text.index(" &\nstep_pid=$!")].replace("\\\n", " ")
    assert shlex.split(srun) == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        "--container-image=nvcr.io/nvidia/pytorch:24.05 py3", "--container-mounts=$CONTAINER_MOUNTS",
        "--container-workdir=$PWD",
        "bash", "-c", 'NODE_RANK="$SLURM_NODEID" exec bash "$1"', "bash", "$BUNDLE_DIR/launch.sh"]
    assert "# shellcheck disable=SC2016" in text and "pdsh" not in text


def test_deepspeed_job_says_it_uses_the_standard_launcher() -> None:
    text = render("deepspeed")["job.sbatch"]
    assert "never pdsh" in text and "pdsh" not in text.replace("never pdsh", "")


def test_strict_undefined_catches_a_missing_or_misspelt_value() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render_template("launch.sh.j2", version="0")
    with pytest.raises(jinja2.UndefinedError):
        _environment().from_string("exec {{ world_sise }}\n").render(world_size=2)


# --- the scripts, run with stand-ins for accelerate, scontrol and srun ---------------------------

def stub(bin_dir: Path, name: str, text: str) -> None:
    write(bin_dir / name, text).chmod(0o755)


# A stand-in for the Python that `accelerate` runs in: launch.sh finds it on the #! line of the `accelerate` stub and
# starts tunefile.runtime.launcher in it; it prints its arguments and environment instead.
RECORD_PYTHON = (f"#!{sys.executable}\nimport json, os, sys\n"
                 "json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, sys.stdout)\n")


def run_script(command: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> dict:
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "python", RECORD_PYTHON)
    stub(bin_dir, "accelerate", f"#!{bin_dir / 'python'}\n")
    clean = {key: value for key, value in os.environ.items()
             if key not in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TUNEFILE_BUNDLE_DIR", "TUNEFILE_PYTHON")}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                            env={**clean, **(env or {}), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])  # job.sbatch marks the attempt on stdout first


def test_launch_sh_runs_accelerate_with_the_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "my bundle's $dir"  # spaces, a quote and a dollar must not split or expand
    plan = make_plan("deepspeed", spec={"offline": True})
    write_bundle(render_bundle(replace(plan, target=replace(plan.target, env=(("ODD", AWKWARD),)))), bundle,
                 force=False)
    record = run_script(["bash", str(bundle / "launch.sh")], tmp_path)
    argv, env = record["argv"], record["env"]
    assert argv[:4] == ["-m", "tunefile.runtime.launcher", "--config_file", f"{bundle}/accelerate.yaml"]
    assert argv[argv.index("--num_processes") + 1] == "2" and argv[argv.index("--machine_rank") + 1] == "0"
    assert argv[argv.index("--main_process_ip") + 1] == "127.0.0.1"
    assert argv[argv.index("--deepspeed_config_file") + 1] == f"{bundle}/deepspeed.json"
    assert argv[-4:] == ["-m", "tunefile.runtime", "train", f"{bundle}/config.yaml"]
    assert env["ODD"] == AWKWARD and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"


def test_launch_sh_takes_rank_and_rendezvous_from_the_environment(tmp_path: Path) -> None:
    write_bundle(render("slurm"), tmp_path / "b", force=False)
    record = run_script(["bash", str(tmp_path / "b" / "launch.sh")], tmp_path,
                        {"NODE_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "23456"})
    argv = record["argv"]
    assert argv[argv.index("--machine_rank") + 1] == "1"
    assert argv[argv.index("--main_process_ip") + 1] == "node7"
    assert argv[argv.index("--main_process_port") + 1] == "23456"
    assert argv[argv.index("--num_machines") + 1] == "2" and argv[argv.index("--num_processes") + 1] == "16"
    assert record["env"]["NCCL_DEBUG"] == "WARN" and record["env"]["HF_HOME"] == "/scratch/hf-cache"


def test_job_sbatch_runs_launch_sh_with_the_node_rank(tmp_path: Path) -> None:
    """scontrol and srun stand-ins: srun runs the task as node 1 of the job."""
    bundle = tmp_path / "the bundle"
    plan = slurm_plan(modules=(), setup=())
    write_bundle(render_bundle(plan), bundle, force=False)
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "scontrol", "#!/usr/bin/env bash\n"
         f'if [ "$2" = job ]; then echo "   Command={bundle}/job.sbatch"; else printf "node1\\nnode2\\n"; fi\n')
    # Drop srun's own options, then run the task the way one node would.
    stub(bin_dir, "srun", '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
         'SLURM_NODEID=1 exec "$@"\n')
    record = run_script(["bash", str(bundle / "job.sbatch")], tmp_path,
                        {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "node[1-2]"})
    argv = record["argv"]
    assert argv[argv.index("--machine_rank") + 1] == "1"
    assert argv[argv.index("--main_process_ip") + 1] == "node1"
    assert argv[argv.index("--main_process_port") + 1] == str(20000 + 123456 % 20000)
    assert argv[-1] == f"{bundle}/config.yaml"


# --- end to end through the CLI: unsafe input stops before anything is written -------------------

@pytest.mark.parametrize("setting, place, fragment", [
    ("partition: gpu; rm -rf /\n", "2:12", "partition: 'gpu; rm -rf /' cannot go on an #SBATCH line"),
    ("job_name: my job\n", "2:11", "job_name: 'my job' cannot go on an #SBATCH line"),
    ("env:\n  X: \"a\\nb\"\n", "3:6", "env.X: environment values must be one line"),
    ("time: soon\n", "2:7", "time: not a SLURM time limit"),
])
def test_unsafe_target_values_are_rejected_with_their_line(tmp_path: Path, setting: str, place: str,
                                                            fragment: str) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "target: t.yml\n")
    write(tmp_path / "t.yml", "gpu: a100-80gb\n" + setting)
    result = CliRunner().invoke(cli, ["compile", str(config), "--output", str(tmp_path / "b")])
    assert result.exit_code == 2 and f"{tmp_path / 't.yml'}:{place}: error: {fragment}" in result.stderr
    assert not (tmp_path / "b").exists()


def test_unsafe_settings_built_in_code_cannot_reach_a_script() -> None:
    """Targets built without a target file (tests, future callers) still meet the renderer's checks."""
    plan = make_plan("single")
    with pytest.raises(ValueError):
        render_bundle(replace(plan, target=replace(plan.target, slurm=SlurmSettings(setup=("a\nb",)))))


def test_line_breaks_in_config_strings_are_rejected(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL.replace("base_model: meta-llama/Llama-3.1-8B",
                                                       'base_model: "x\\nrm -rf /"'))
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2 and "base_model: must be a single line" in result.stderr
