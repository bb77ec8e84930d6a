"""The sbatch settings users expect (exclusive, reservation, exclude, dependency, mail, gres, extra_sbatch):
the #SBATCH lines they become, what is refused and where, and that SLURM itself accepts the lines.
Also the CPU target's wording and thread count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import MINIMAL, run_cli, write
from plan_factory import make_plan, render, slurm_plan
from tunefile.compiler.render import render_bundle
from tunefile.compiler.sbatch_options import MAIL_TYPES

ALL_SETTINGS = """\
gpu: h100-80gb
gpus_per_node: 8
partition: gpu
exclusive: true
reservation: llm-week
exclude:
  - gpu[01-03]
  - gpu07
dependency: afterok:1234:1235?afternotok:99
mail_type: [end, FAIL]
mail_user: ops@example.org
gres: [nvme:1, "shard:a100:2"]
extra_sbatch:
  - --comment=tunefile
  - --nice=10
  - --hint=nomultithread
"""


def compile_target(tmp_path: Path, target_text: str) -> tuple[int, str, Path]:
    target = write(tmp_path / "t.yml", target_text)
    config = write(tmp_path / "c.yml", MINIMAL + "target: t.yml\n")
    code, _, err = run_cli("compile", str(config), "--output", str(tmp_path / "b"))
    return code, err, target


def sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_every_setting_becomes_its_sbatch_line(tmp_path: Path) -> None:
    code, err, _ = compile_target(tmp_path, ALL_SETTINGS)
    assert code == 0, err
    lines = sbatch_lines((tmp_path / "b" / "job.sbatch").read_text())
    settings = lines[lines.index("#SBATCH --partition=gpu") + 1:lines.index(next(x for x in lines if "--time" in x))]
    assert settings == [
        "#SBATCH --reservation=llm-week", "#SBATCH --exclude=gpu[01-03],gpu07", "#SBATCH --gres=nvme:1,shard:a100:2",
        "#SBATCH --dependency=afterok:1234:1235?afternotok:99", "#SBATCH --mail-type=END,FAIL",
        "#SBATCH --mail-user=ops@example.org", "#SBATCH --exclusive"]
    # extra_sbatch lines come last of all, after the logs, as written.
    assert lines[-3:] == ["#SBATCH --comment=tunefile", "#SBATCH --nice=10", "#SBATCH --hint=nomultithread"]


def test_exclusive_user_and_strings_for_lists(tmp_path: Path) -> None:
    code, err, _ = compile_target(tmp_path, "gpu: cpu\nexclusive: user\nexclude: node2\nmail_type: ALL\n"
                                            "gres: nvme:1\n")
    assert code == 0, err
    lines = sbatch_lines((tmp_path / "b" / "job.sbatch").read_text())
    assert {"#SBATCH --exclusive=user", "#SBATCH --exclude=node2", "#SBATCH --mail-type=ALL",
            "#SBATCH --gres=nvme:1"} <= set(lines)
    assert "#SBATCH --exclusive" not in lines


def test_no_settings_no_lines() -> None:
    lines = sbatch_lines(render("ddp")["job.sbatch"])
    assert not any(flag in line for line in lines for flag in ("exclusive", "mail", "gres", "exclude", "dependency",
                                                                "reservation", "comment"))


@pytest.mark.parametrize("setting, place, fragment", [
    ("exclusive: yes-please\n", "3:12", "exclusive: must be true, false, user or mcs, got 'yes-please'"),
    ("reservation: my week\n", "3:14", "reservation: 'my week' is not a reservation name"),
    ("exclude: node1;reboot\n", "3:10", "exclude: 'node1;reboot' is not a SLURM node list"),
    ("dependency: afterok\n", "3:13", "dependency: 'afterok' is not a SLURM dependency"),
    ("dependency: aftrok:12\n", "3:13", "dependency: 'aftrok:12' is not a SLURM dependency"),
    ("dependency: afterok:1,afterany:2?afterok:3\n", "3:13", "dependency: 'afterok:1,afterany:2?afterok:3' mixes"),
    ("mail_type: [END, FAILED]\n", "3:12", "mail_type: 'FAILED' is not a SLURM mail type; did you mean FAIL?"),
    ("mail_type: END\nmail_user: a b@x\n", "4:12", "mail_user: 'a b@x' is not a user name or mail address"),
    ("mail_user: ops@example.org\n", "3:12", "mail_user: SLURM sends no mail without mail_type"),
    ("gres: gpu:a100:8\n", "3:7", "gres: 'gpu:a100:8': tunefile requests GPUs with --gpus-per-node"),
    ("gres: nvme 1\n", "3:7", "gres: 'nvme 1' is not a generic resource"),
    ("extra_sbatch: [--nodes=4]\n", "3:16", "extra_sbatch[0]: job.sbatch sets --nodes itself"),
    ("extra_sbatch: [--output=x.log]\n", "3:16", "extra_sbatch[0]: job.sbatch sets --output itself"),
    ("extra_sbatch: [--out=x.log]\n", "3:16", "extra_sbatch[0]: --out abbreviates --output, which job.sbatch sets"),
    ("extra_sbatch: [--signal=USR1@60]\n", "3:16", "extra_sbatch[0]: job.sbatch sets --signal itself"),
    ("extra_sbatch: [-N 2]\n", "3:16", "extra_sbatch[0]: '-N 2' is not one --flag or --flag=value"),
    ("extra_sbatch: ['--comment=a b']\n", "3:16", "extra_sbatch[0]: 'a b' cannot go on an #SBATCH line"),
    ("extra_sbatch: ['--comment=$(reboot)']\n", "3:16", "extra_sbatch[0]: '$(reboot)' cannot go on an #SBATCH"),
    ("extra_sbatch: ['--comment=x; rm -rf /']\n", "3:16", "extra_sbatch[0]: 'x; rm -rf /' cannot go on"),
    ("extra_sbatch: [\"--comment=a\\n#SBATCH --nodes=9\"]\n", "3:16", "extra_sbatch[0]: must be one line"),
    ("extra_sbatch: ['#SBATCH --nice=1']\n", "3:16", "extra_sbatch[0]: write the option only, without #SBATCH"),
    ("extra_sbatch: [--exclusive --nice]\n", "3:16", "extra_sbatch[0]: '--exclusive --nice' is not one --flag"),
    ("mem: 64G\nextra_sbatch: [--mem-per-cpu=4G]\n", "4:16", "extra_sbatch[0]: SLURM takes one of --mem,"),
    ("extra_sbatch: --nice=1\n", "3:15", "extra_sbatch: must be a list, got str"),
    ("extra_sbatch: [--gres=nvme:1]\n", "3:16", "extra_sbatch[0]: job.sbatch sets --gres itself"),
])
def test_bad_settings_are_located(tmp_path: Path, setting: str, place: str, fragment: str) -> None:
    code, err, target = compile_target(tmp_path, "gpu: h100-80gb\npartition: gpu\n" + setting)
    assert code == 2 and f"{target}:{place}: error: {fragment}" in err, err
    assert "Traceback" not in err and not (tmp_path / "b").exists()


def test_a_refused_flag_says_which_setting_to_use(tmp_path: Path) -> None:
    _, err, _ = compile_target(tmp_path, "gpu: cpu\nextra_sbatch: [--time=10]\n")
    assert "hint: set time in the target file" in err
    _, err, _ = compile_target(tmp_path, "gpu: cpu\nextra_sbatch: [--mail-type=END]\n")
    assert "hint: set mail_type in the target file" in err


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    code, err, _ = compile_target(tmp_path, "gpu: cpu\nmail_type: [NEVER]\nexclusive: always\n"
                                            "extra_sbatch: [--nodes=2, -x]\n")
    assert code == 2 and err.count("error:") == 4, err


def test_mail_types_are_slurms() -> None:
    """The list man sbatch (22.05) gives; a lower-case spelling is accepted and written in upper case."""
    assert set(MAIL_TYPES) == {"NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT",
                               "TIME_LIMIT", "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS"}


def test_settings_built_in_code_still_meet_the_renderer_checks() -> None:
    for settings in ({"extra_sbatch": ("--nodes=3",)}, {"extra_sbatch": ("--comment=a\n#SBATCH --x",)},
                     {"reservation": "a b"}, {"mail_user": "$USER"}, {"exclude": "n1;x"}, {"exclusive": "all;x"}):
        with pytest.raises(ValueError):
            render_bundle(slurm_plan(**settings))


def test_slurm_accepts_the_lines(tmp_path: Path) -> None:
    """The real sbatch parses the generated job.sbatch (--test-only: nothing is queued)."""
    if shutil.which("sbatch") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("SLURM's sbatch is not on PATH (.ci/slurm-up.sh)")
        pytest.skip("SLURM's sbatch is not on PATH")
    code, err, _ = compile_target(tmp_path, "gpu: cpu\nnodes: 1\ngpus_per_node: 1\ncpus_per_task: 1\n"
                                            "partition: debug\ntime: '00:05:00'\nexclusive: true\n"
                                            "exclude: node2\ndependency: singleton\nmail_type: [END, FAIL]\n"
                                            "mail_user: ops@example.org\nextra_sbatch: [--comment=tunefile]\n")
    assert code == 0, err
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SBATCH_"))}
    result = subprocess.run(["sbatch", "--test-only", str(tmp_path / "b" / "job.sbatch")], capture_output=True,
                            text=True, timeout=60, env=env, cwd=tmp_path)
    if result.returncode != 0 and "Unable to contact slurm controller" in result.stderr \
            and os.environ.get("CI") != "true":
        pytest.skip("no SLURM controller (run .ci/slurm-up.sh)")
    assert result.returncode == 0 and "to start at" in result.stderr, result.stderr


# --- CPU targets: processes, not GPUs; the thread count reaches accelerate -------------------------

def test_cpu_batch_says_processes() -> None:
    files = render("cpu")
    line = "2 micro batch × 4 accumulation × 2 processes = 16 sequences per optimizer step"
    for name in ("launch.sh", "job.sbatch", "accelerate.yaml", "README.md"):
        assert line in files[name] and "GPUs" not in files[name].split("Batch")[1].splitlines()[0], name
    one = make_plan("cpu")
    one = replace(one, batch=replace(one.batch, world_size=1))
    assert "× 1 process =" in one.batch.explanation()
    assert "× 4 GPUs =" in render("ddp")["launch.sh"]


RECORD = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["STUB_RECORD"], "w") as handle:
    json.dump({{"argv": sys.argv[1:]}}, handle)
"""


@pytest.mark.parametrize("env, threads", [({"SLURM_CPUS_PER_TASK": "16"}, "8"), ({"SLURM_CPUS_PER_TASK": "1"}, "1"),
                                          ({"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "16"}, "3"),
                                          ({}, str(max(1, len(os.sched_getaffinity(0)) // 2)))])
def test_cpu_launch_passes_the_thread_count(env: dict[str, str], threads: str, tmp_path: Path) -> None:
    """launch.sh of a CPU bundle (2 processes per node) hands accelerate the node's CPUs divided among them."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name, text in render("cpu").items():
        write(bundle / name, text)
    bin_dir = tmp_path / "bin"
    write(bin_dir / "python", RECORD).chmod(0o755)  # accelerate's Python, where launch.sh starts the launcher
    write(bin_dir / "accelerate", f"#!{bin_dir / 'python'}\n").chmod(0o755)
    write(bin_dir / "setsid", '#!/bin/sh\nexec "$@"\n').chmod(0o755)
    write(bin_dir / "python3", "#!/bin/sh\nexit 0\n").chmod(0o755)  # launch.sh's head-address check: not tested here
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith(("SLURM_", "TUNEFILE_", "OMP_", "NODE_RANK", "MASTER_"))}
    result = subprocess.run(["bash", str(bundle / "launch.sh")], capture_output=True, text=True, timeout=60,
                            env={**clean, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                 "STUB_RECORD": str(tmp_path / "record.json")})
    assert result.returncode == 0, result.stderr
    argv = json.loads((tmp_path / "record.json").read_text())["argv"]
    assert argv[argv.index("--num_cpu_threads_per_process") + 1] == threads


def test_gpu_launch_leaves_threads_to_accelerate() -> None:
    assert "--num_cpu_threads_per_process" not in render("ddp")["launch.sh"]
