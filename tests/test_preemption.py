"""Stopping early on a signal (runtime/preemption.py): finish the step, save, exit 75, continue on the next launch.

Unit tests of the signal handling and the resume rule, then `bash launch.sh` as a user runs it: Ctrl-C (SIGINT
to the terminal's process group) on one process, SIGTERM to launch.sh alone on two (the ranks learn of it
through launch.sh's stop file), a second signal while saving. The SLURM side is tests/test_slurm_preemption.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import kill_process_tree
from runtime_bundles import (
    build_tiny_model,
    compile_bundle,
    free_port,
    launch,
    metrics,
    safetensors,
    subprocess_env,
    workspace,
    write_config,
)
from tunefile.runtime import checkpoint
from tunefile.runtime.preemption import EXIT_STOPPED_EARLY, StopRequest

STEPS = 120  # long enough to signal mid-run on a loaded 2-core box, short enough to finish in seconds


def test_a_signal_sets_the_flag_and_a_second_one_is_only_reported(capfd: pytest.CaptureFixture[str]) -> None:
    request = StopRequest(stop_file="")
    before = signal.getsignal(signal.SIGUSR2)
    request.install()
    try:
        assert not request.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        assert request.requested and request.signal_name == "SIGUSR2"
        os.kill(os.getpid(), signal.SIGTERM)  # while "saving": reported, nothing raised, the first reason kept
        assert request.signal_name == "SIGUSR2"
        assert "SIGTERM again: already stopping" in capfd.readouterr().err
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_the_stop_file_of_launch_sh_is_a_request(tmp_path: Path) -> None:
    request = StopRequest(stop_file=str(tmp_path / "stop"))
    assert not request.requested
    (tmp_path / "stop").touch()
    assert request.requested and request.signal_name == "a signal to launch.sh"


def _checkpoint(output_dir: Path, step: int, *, stopped: bool) -> Path:
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / checkpoint.COMPLETE).write_text(f"{step}\n")
    if stopped:
        checkpoint.mark_stopped_early(path, "test")
    return path


def test_a_checkpoint_saved_on_a_signal_is_resumed_without_auto_resume(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 10, stopped=False)
    stopped = _checkpoint(tmp_path, 15, stopped=True)
    assert checkpoint.find_resume_checkpoint(tmp_path, resume_from=None, auto_resume=False) == stopped
    # A newer ordinary checkpoint: the run went on after the stop; auto-resume off means start over again.
    _checkpoint(tmp_path, 20, stopped=False)
    assert checkpoint.find_resume_checkpoint(tmp_path, resume_from=None, auto_resume=False) is None
    # A finished run clears the marks: nothing is left to continue.
    checkpoint.clear_stopped_early(tmp_path)
    assert not (stopped / checkpoint.STOPPED_EARLY).exists()


# --- launch.sh, end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _bundle(tmp: Path, tiny: Path, *, processes: int = 1) -> Path:
    # auto_resume off, no cadence checkpoint: only the checkpoint a signal saves can continue the run.
    config = write_config(workspace(tmp, tiny), max_steps=STEPS, save_steps=10_000,
                          auto_resume_from_checkpoints=False)
    return compile_bundle(config, gpus_per_node=processes if processes > 1 else None)


def _start(bundle: Path) -> subprocess.Popen[bytes]:
    """launch.sh in a session of its own (a terminal's foreground job), output to files in the workspace."""
    out = (bundle.parent / "launch.out").open("ab")
    return subprocess.Popen(["bash", str(bundle / "launch.sh")], cwd=bundle.parent, env=subprocess_env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_step(process: subprocess.Popen[bytes], output_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = output_dir / "metrics.jsonl"
        if path.is_file() and sum('"loss"' in line for line in path.read_text().splitlines()) >= step:
            return
        if process.poll() is not None:
            pytest.fail(f"launch.sh ended ({process.returncode}) before step {step}: {_log(output_dir.parent)}")
        time.sleep(0.05)
    kill_process_tree(process.pid)
    pytest.fail(f"no step {step} within {timeout} s: {_log(output_dir.parent)}")


def _finish(process: subprocess.Popen[bytes], timeout: float = 240) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(process.pid)
        pytest.fail(f"launch.sh did not end within {timeout} s after the signal")


def _log(workdir: Path) -> str:
    path = workdir / "launch.out"
    return path.read_text(errors="replace")[-6000:] if path.is_file() else "(no output)"


def _trained_steps(output_dir: Path) -> list[int]:
    return [record["step"] for record in metrics(output_dir) if "loss" in record]


def _assert_stopped_and_saved(workdir: Path, status: int) -> int:
    output_dir = workdir / "out"
    log = _log(workdir)
    assert status == EXIT_STOPPED_EARLY, f"launch.sh exited {status}, not {EXIT_STOPPED_EARLY}:\n{log}"
    found = checkpoint.complete_checkpoints(output_dir)
    assert found, f"no complete checkpoint after the stop:\n{log}"
    step, path = found[-1]
    assert (path / checkpoint.STOPPED_EARLY).is_file()
    assert step == max(_trained_steps(output_dir)), "the checkpoint is not the last step trained"
    assert 0 < step < STEPS
    assert sum("stopped by" in line and "run again to continue" in line for line in log.splitlines()) == 1, log
    assert "Traceback" not in log, log
    return step


def test_ctrl_c_saves_and_the_next_launch_continues_to_the_same_weights(tmp_path: Path, tiny: Path) -> None:
    reference = _bundle(tmp_path / "reference", tiny)
    launch(reference)
    bundle = _bundle(tmp_path / "stopped", tiny)
    process = _start(bundle)
    _wait_for_step(process, bundle.parent / "out", 10)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground process group
    step = _assert_stopped_and_saved(bundle.parent, _finish(process))

    launch(bundle)  # run again: auto_resume_from_checkpoints is off, the stop's checkpoint is resumed anyway
    steps = _trained_steps(bundle.parent / "out")
    assert steps == list(range(1, STEPS + 1)), f"steps trained across the two launches (stop at {step}): {steps}"
    assert not (bundle.parent / "out" / f"checkpoint-{step}" / checkpoint.STOPPED_EARLY).exists()
    expected = safetensors(reference.parent / "out" / "model.safetensors")
    got = safetensors(bundle.parent / "out" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_sigterm_to_launch_sh_stops_both_ranks_at_one_step_and_a_second_signal_changes_nothing(
        tmp_path: Path, tiny: Path) -> None:
    bundle = _bundle(tmp_path, tiny, processes=2)
    process = _start(bundle)
    _wait_for_step(process, bundle.parent / "out", 10)
    process.send_signal(signal.SIGTERM)  # launch.sh alone: torch elastic's ranks sit in sessions of their own
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # again, while the ranks finish the step and save
    step = _assert_stopped_and_saved(bundle.parent, _finish(process))
    assert (bundle.parent / "out" / f"checkpoint-{step}" / checkpoint.STATE_FILE).is_file()

    launch(bundle)
    assert _trained_steps(bundle.parent / "out")[-1] == STEPS


# --- the compiler's side: job.sbatch's settings ----------------------------------------------------------------

def test_the_signal_lead_is_sized_for_the_checkpoint_and_the_target_can_set_it() -> None:
    from tunefile.compiler.plan import ModelInfo
    from tunefile.compiler.render.scripts import signal_lead
    from tunefile.compiler.targets import SlurmSettings

    def model(parameters: int, trainable: int) -> ModelInfo:
        return ModelInfo("LlamaForCausalLM", parameters, "test", 4096, 32, trainable)

    # LoRA: a few MB of adapter; the floor of two minutes.
    assert signal_lead(slurm=SlurmSettings(), model=model(8_000_000_000, 20_000_000), strategy="ddp",
                       world_size=8)[0] == 120
    # Full 8B under DDP: 96 GB written by rank 0 alone at 1 GiB/s, twice, plus a minute: 240 s.
    lead, comment = signal_lead(slurm=SlurmSettings(), model=model(8_000_000_000, 8_000_000_000), strategy="ddp",
                                world_size=8)
    assert lead == 240 and "1 writer(s)" in comment[0]
    # The same model sharded over 8 writers: back to the floor.
    assert signal_lead(slurm=SlurmSettings(), model=model(8_000_000_000, 8_000_000_000), strategy="fsdp",
                       world_size=8)[0] == 120
    assert signal_lead(slurm=SlurmSettings(), model=None, strategy="ddp", world_size=1)[0] == 300
    assert signal_lead(slurm=SlurmSettings(signal_lead_s=45), model=None, strategy="ddp", world_size=1)[0] == 45


@pytest.mark.parametrize(("setting", "message"), [("max_restarts: -1", "≥ 0"), ("signal_lead_s: 0", "≥ 1"),
                                                  ("signal_lead_s: 70000", "65535")])
def test_bad_preemption_settings_are_refused(setting: str, message: str) -> None:
    import yaml

    from tunefile.compiler.targets import target_from_file_data

    _, problems = target_from_file_data(yaml.safe_load(f"gpu: cpu\n{setting}\n"), "t", "t.yml")
    assert len(problems) == 1 and message in problems[0].message


def test_job_sbatch_declares_requeue_signal_and_append(tmp_path: Path) -> None:
    import yaml

    from tunefile.compiler.render.scripts import render_job_sbatch
    from tunefile.compiler.targets import target_from_file_data

    target, problems = target_from_file_data(yaml.safe_load("gpu: cpu\nnodes: 2\nmax_restarts: 5\n"), "t", "t.yml")
    assert not problems
    text = render_job_sbatch(version="0", config_name="c.yml", summary=[], target=target, deepspeed=False,
                             output_dir="runs/out dir")
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR2@300", "#SBATCH --open-mode=append",
                 "OUTPUT_DIR='runs/out dir'", 'if [ "$same_start" -gt $((5 + 1)) ]; then',
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in text, line
    script = tmp_path / "job.sbatch"
    script.write_text(text, encoding="utf-8")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_a_node_that_cannot_reach_the_head_gives_up_in_one_line(tmp_path: Path, tiny: Path) -> None:
    """launch.sh of node 1 of a two-node bundle, with nobody serving the rendezvous: the real launcher starts and
    retries, the watch kills it after TUNEFILE_RDZV_TIMEOUT_S and names the address."""
    config = write_config(workspace(tmp_path, tiny), max_steps=STEPS)
    (tmp_path / "two-nodes.yml").write_text("gpu: cpu\nnodes: 2\ngpus_per_node: 1\n", encoding="utf-8")
    bundle = compile_bundle(config, target="two-nodes.yml")
    port = free_port()  # closed: nobody listens there
    started = time.monotonic()
    result = launch(bundle, check=False, timeout=120,
                    env={"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                         "TUNEFILE_RDZV_TIMEOUT_S": "5"})
    lines = [line for line in result.stderr.splitlines() if line.startswith("launch.sh: rendezvous:")]
    assert result.returncode == 69, result.stderr[-4000:]
    assert len(lines) == 1 and f"127.0.0.1:{port} within 5s" in lines[0], result.stderr[-4000:]
    assert "Traceback" not in result.stderr and "Killed" not in result.stderr, result.stderr[-4000:]
    assert time.monotonic() - started < 60
