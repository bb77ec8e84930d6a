"""Experiment trackers (runtime/trackers.py) with the real packages, offline: wandb's offline run file, MLflow's
file store and TensorBoard's event files are read back and compared with what was logged. A package that is
missing is simulated by making its import fail; the real ones are required (a failure under CI=true)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import require_module
from runtime_bundles import compile_bundle, launch, metrics, summary, workspace, write_config
from tunefile.runtime.errors import RuntimeUserError
from tunefile.runtime.trackers import (
    TrackerSet,
    flatten,
    model_files,
    open_trackers,
    scalars,
    unopened_trackers,
)
from tunefile.schemas.run_plan import MlflowPlan, TrackersPlan, WandbPlan

RUN_CONFIG = {"seed": 7, "optimizer": {"name": "adamw_torch", "learning_rate": 0.003},
              "data": {"chat_template_jinja": "x" * 7000, "datasets": [{"path": "a.jsonl"}]}}
RECORDS = [
    {"step": 1, "epoch": 0.1, "loss": 2.5, "lr": 0.001, "tokens_per_s": 900.0, "grad_norm": 1.25},
    {"step": 2, "epoch": 0.2, "loss": 2.0625, "lr": 0.002, "tokens_per_s": 950.0, "grad_norm": None},
    {"step": 2, "eval_loss": 2.25},
    {"step": 3, "epoch": 0.3, "loss": 1.75, "lr": 0.003, "tokens_per_s": 1000.0, "grad_norm": 0.5},
]
DECISIONS = {"device": "cpu", "attention_fallback": None}


@pytest.fixture(autouse=True)
def environment_restored() -> Any:
    """The trackers set library variables (WANDB_MODE, MLFLOW_ALLOW_FILE_STORE, …) in os.environ, as a training
    process should; each test gets its environment back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every attempt this process makes to reach a host other than this machine (refused and recorded).
    wandb's own helper process talks to this one over loopback, which stays allowed."""
    attempts: list[Any] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def remote(host: Any) -> bool:
        if not isinstance(host, str) or host in ("localhost", ""):
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True  # a host name other than localhost

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6) and remote(address[0]):
            attempts.append(address)
            raise OSError(f"the test forbids the network ({address})")
        return real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if remote(host):
            attempts.append(host)
            raise socket.gaierror(f"the test forbids the network ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make `import NAME` (and its submodules, even those already imported) fail as if it were not installed."""
    for module in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, name, None)


def log_all(trackers: TrackerSet) -> None:
    trackers.log_config({"runtime_decisions": DECISIONS})
    for record in RECORDS:
        trackers.log(record["step"], record)


# --- reading back what each tracker wrote -------------------------------------------------------------------

def wandb_run_records(output_dir: Path) -> list[Any]:
    """The records of the one offline run under OUTPUT_DIR/wandb, as wandb's protobuf messages.

    A run-*.wandb file is a 7-byte header (":W&B", a 2-byte magic, a version byte) followed by LevelDB-style log
    blocks of 32 KiB: each chunk has a 7-byte header (crc32, little-endian length, type: 1 full, 2 first,
    3 middle, 4 last) and a block's tail shorter than a header is zero padding."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (output_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break  # zeros: the writer stopped here
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records: list[Any]) -> dict[int, dict[str, Any]]:
    """step → the values logged at that step (wandb's own _step, _runtime, _timestamp left out)."""
    rows: dict[int, dict[str, Any]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.setdefault(record.history.step.num, {}).update(
                {key: value for key, value in items.items() if not key.startswith("_")})
    return rows


def wandb_config(records: list[Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    return config


def wandb_exit_code(records: list[Any]) -> int:
    (exit_record,) = [record.exit for record in records if record.WhichOneof("record_type") == "exit"]
    return exit_record.exit_code


def mlflow_run(uri: str, experiment: str) -> tuple[Any, Any]:
    """(client, the experiment's one run) of the file store at URI."""
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # as the runtime sets it (environment_restored undoes it)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def mlflow_series(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(record["step"], record[key]) for record in records if record.get(key) is not None]


# --- units --------------------------------------------------------------------------------------------------

def test_records_become_train_and_eval_series_and_the_plan_one_flat_table() -> None:
    assert scalars(RECORDS[0]) == {"train/epoch": 0.1, "train/loss": 2.5, "train/lr": 0.001,
                                   "train/tokens_per_s": 900.0, "train/grad_norm": 1.25}
    assert "train/grad_norm" not in scalars(RECORDS[1])  # absent, not zero
    assert scalars(RECORDS[2]) == {"eval/loss": 2.25}
    assert flatten(RUN_CONFIG) == {"seed": 7, "optimizer.name": "adamw_torch", "optimizer.learning_rate": 0.003,
                                   "data.chat_template_jinja": "x" * 7000, "data.datasets": [{"path": "a.jsonl"}]}


def test_model_files_are_the_saved_model_without_logs_or_subfolders(tmp_path: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "metrics.jsonl",
                 "train_summary.json"):
        (tmp_path / name).write_text("{}")
    for folder in ("checkpoint-2", "runs", "wandb"):
        (tmp_path / folder).mkdir()
    assert [path.name for path in model_files(tmp_path)] == ["adapter_config.json", "adapter_model.safetensors",
                                                             "tokenizer.json"]


def test_tensorboard_writes_every_series_and_a_resumed_run_keeps_the_steps_before_it(tmp_path: Path) -> None:
    require_module("tensorboard", "pip install 'tunefile[train]'")
    plan = TrackersPlan(tensorboard=True)
    trackers = open_trackers(plan, output_dir=tmp_path, start_step=0, offline=True, run_config=RUN_CONFIG)
    assert trackers.decisions == {"tensorboard": "on"}
    log_all(trackers)
    trackers.finish(None, failed=False)
    written = tensorboard_scalars(tmp_path / "runs")
    assert written["train/loss"] == expected_series(RECORDS, "loss")  # 2.5, 2.0625, 1.75: exact in float32
    assert written["eval/loss"] == [(2, 2.25)]
    assert [step for step, _ in written["train/grad_norm"]] == [1, 3]

    # Resumed from a checkpoint at step 2: step 3 is trained again, and its new value replaces the old one.
    resumed = open_trackers(plan, output_dir=tmp_path, start_step=2, offline=True, run_config=RUN_CONFIG)
    resumed.log(3, {"step": 3, "loss": 1.5})
    resumed.finish(None, failed=False)
    assert tensorboard_scalars(tmp_path / "runs")["train/loss"] == [(1, 2.5), (2, 2.0625), (3, 1.5)]


def test_wandb_offline_records_the_config_decisions_and_every_value_without_the_network(
        tmp_path: Path, network_attempts: list[Any]) -> None:
    require_module("wandb", "pip install 'tunefile[wandb]'")
    # log_model asks for an upload, which an offline run never makes (the compiler turns it off too).
    plan = TrackersPlan(tensorboard=False, wandb=WandbPlan(project="t", entity=None, name="unit", run_id="unit1",
                                                           mode="offline", log_model=True))
    trackers = open_trackers(plan, output_dir=tmp_path, start_step=0, offline=True, run_config=RUN_CONFIG)
    assert trackers.decisions == {"wandb": "on"}
    assert os.environ["WANDB_MODE"] == "offline"
    log_all(trackers)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    trackers.finish(tmp_path, failed=False)

    records = wandb_run_records(tmp_path)
    run = next(record.run for record in records if record.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, run.run_id) == ("t", "unit", "unit1")
    history = wandb_history(records)
    assert sorted(history) == [1, 2, 3]
    for record in RECORDS:
        for key, value in scalars(record).items():
            assert history[record["step"]][key] == value  # exact: JSON floats
    assert "train/grad_norm" not in history[2]
    config = wandb_config(records)
    assert config["optimizer.learning_rate"] == 0.003 and config["data.datasets"] == [{"path": "a.jsonl"}]
    assert config["runtime_decisions.device"] == "cpu"
    assert wandb_exit_code(records) == 0
    assert not [record for record in records if record.WhichOneof("record_type") in ("artifact", "use_artifact")]
    assert network_attempts == []


def test_wandb_records_a_failed_run_as_failed(tmp_path: Path) -> None:
    require_module("wandb", "pip install 'tunefile[wandb]'")
    plan = TrackersPlan(tensorboard=False, wandb=WandbPlan(project="t", entity=None, name=None, run_id=None,
                                                           mode="offline", log_model=False))
    trackers = open_trackers(plan, output_dir=tmp_path, start_step=0, offline=True, run_config=RUN_CONFIG)
    trackers.log(1, RECORDS[0])
    trackers.finish(None, failed=True)
    assert wandb_exit_code(wandb_run_records(tmp_path)) == 1


def test_mlflow_file_store_holds_every_metric_and_the_plan_cut_to_mlflows_limit(
        tmp_path: Path, network_attempts: list[Any]) -> None:
    require_module("mlflow", "pip install 'tunefile[mlflow]'")
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    uri = f"file:{tmp_path}/mlruns"
    plan = TrackersPlan(tensorboard=False, mlflow=MlflowPlan(tracking_uri=uri, experiment_name="exp", run_name="r1"))
    trackers = open_trackers(plan, output_dir=tmp_path / "out", start_step=0, offline=True, run_config=RUN_CONFIG)
    assert trackers.decisions == {"mlflow": "on"}
    log_all(trackers)
    trackers.finish(None, failed=False)

    client, run = mlflow_run(uri, "exp")
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert mlflow_series(client, run.info.run_id, "train/loss") == expected_series(RECORDS, "loss")
    assert mlflow_series(client, run.info.run_id, "train/lr") == expected_series(RECORDS, "lr")
    assert mlflow_series(client, run.info.run_id, "eval/loss") == [(2, 2.25)]
    params = run.data.params
    assert params["seed"] == "7" and params["optimizer.name"] == "adamw_torch"
    assert params["data.datasets"] == '[{"path": "a.jsonl"}]'
    assert params["data.chat_template_jinja"] == "x" * MAX_PARAM_VAL_LENGTH  # 7000 characters, cut
    assert params["runtime_decisions.device"] == "cpu" and params["runtime_decisions.attention_fallback"] == "null"
    assert network_attempts == []


def test_mlflow_records_a_failed_run_as_failed(tmp_path: Path) -> None:
    require_module("mlflow", "pip install 'tunefile[mlflow]'")
    uri = f"file:{tmp_path}/mlruns"
    plan = TrackersPlan(tensorboard=False, mlflow=MlflowPlan(tracking_uri=uri, experiment_name="exp", run_name=None))
    trackers = open_trackers(plan, output_dir=tmp_path / "out", start_step=0, offline=True, run_config=RUN_CONFIG)
    trackers.finish(None, failed=True)
    assert mlflow_run(uri, "exp")[1].info.status == "FAILED"


@pytest.mark.parametrize(("tracker", "package", "extra"), [("wandb", "wandb", "wandb"), ("mlflow", "mlflow", "mlflow"),
                                                           ("tensorboard", "torch.utils.tensorboard", "train")])
def test_a_missing_package_leaves_its_tracker_out_with_a_decision_and_one_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tracker: str,
        package: str, extra: str) -> None:
    for name, install in (("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "train")):
        require_module(name, f"pip install 'tunefile[{install}]'")  # the others must run for real
    hide_package(monkeypatch, package)
    plan = TrackersPlan(tensorboard=True,
                        wandb=WandbPlan(project="t", entity=None, name=None, run_id=None, mode="offline",
                                        log_model=False),
                        mlflow=MlflowPlan(tracking_uri=f"file:{tmp_path}/mlruns", experiment_name="e", run_name=None))
    with caplog.at_level(logging.WARNING, logger="tunefile.runtime.trackers"):
        trackers = open_trackers(plan, output_dir=tmp_path, start_step=0, offline=True, run_config=RUN_CONFIG)
    log_all(trackers)
    trackers.finish(None, failed=False)
    install = f"pip install 'tunefile[{extra}]'"
    assert trackers.decisions[tracker] == f"off: not installed ({install})"
    # The others still ran (where their packages are here).
    others = {name: state for name, state in trackers.decisions.items() if name != tracker}
    assert set(others) == {"tensorboard", "wandb", "mlflow"} - {tracker} and set(others.values()) == {"on"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and tracker in warnings[0] and install in warnings[0]


def test_a_tracker_that_cannot_start_stops_the_run_with_one_line_and_closes_the_others(tmp_path: Path) -> None:
    require_module("mlflow", "pip install 'tunefile[mlflow]'")
    require_module("tensorboard", "pip install 'tunefile[train]'")
    (tmp_path / "a-file").write_text("")
    plan = TrackersPlan(tensorboard=True, mlflow=MlflowPlan(tracking_uri=f"file:{tmp_path}/a-file/mlruns",
                                                            experiment_name="e", run_name=None))
    with pytest.raises(RuntimeUserError) as error:
        open_trackers(plan, output_dir=tmp_path / "out", start_step=0, offline=True, run_config=RUN_CONFIG)
    message = str(error.value)
    assert message.startswith("mlflow could not start: ") and "mlflow_tracking_uri" in message
    assert "\n" not in message
    # TensorBoard, started first, was closed: its event file is complete and readable.
    assert (tmp_path / "out" / "runs").is_dir() and tensorboard_scalars(tmp_path / "out" / "runs") == {}


def test_a_tracker_failing_mid_run_is_dropped_and_the_others_go_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_module("mlflow", "pip install 'tunefile[mlflow]'")
    require_module("tensorboard", "pip install 'tunefile[train]'")
    import shutil

    plan = TrackersPlan(tensorboard=True, mlflow=MlflowPlan(tracking_uri=f"file:{tmp_path}/mlruns",
                                                            experiment_name="e", run_name=None))
    trackers = open_trackers(plan, output_dir=tmp_path / "out", start_step=0, offline=True, run_config=RUN_CONFIG)
    trackers.log(1, RECORDS[0])
    shutil.rmtree(tmp_path / "mlruns")  # the store vanishes under the run
    with caplog.at_level(logging.WARNING, logger="tunefile.runtime.trackers"):
        trackers.log(2, RECORDS[1])
        trackers.log(3, RECORDS[3])
    trackers.finish(None, failed=False)
    assert trackers.decisions["tensorboard"] == "on"
    assert trackers.decisions["mlflow"].startswith("off: failed logging step 2 (")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert tensorboard_scalars(tmp_path / "out" / "runs")["train/loss"] == [(1, 2.5), (2, 2.0625), (3, 1.75)]


def test_a_finished_run_launched_again_opens_no_tracker_and_says_why() -> None:
    plan = TrackersPlan(tensorboard=True, wandb=None,
                        mlflow=MlflowPlan(tracking_uri="file:./mlruns", experiment_name="e", run_name=None))
    trackers = unopened_trackers(plan, "the run had already finished")
    assert trackers.trackers == []
    assert trackers.decisions == {"tensorboard": "off: the run had already finished",
                                  "mlflow": "off: the run had already finished"}


# --- end to end ---------------------------------------------------------------------------------------------

def trackers_config(root: Path, **overrides: Any) -> Path:
    values = {"wandb_project": "t", "wandb_name": "e2e", "use_tensorboard": True,
              "mlflow_tracking_uri": f"file:{root}/mlruns", "mlflow_experiment_name": "e2e", "offline": True,
              "adapter": "lora", "lora_target_linear": True}
    return write_config(root, **(values | overrides))


def test_a_compiled_offline_run_feeds_wandb_mlflow_and_tensorboard_the_losses_of_metrics_jsonl(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    require_module("wandb", "pip install 'tunefile[wandb]'")
    require_module("mlflow", "pip install 'tunefile[mlflow]'")
    require_module("tensorboard", "pip install 'tunefile[train]'")
    root = workspace(tmp_path, tiny_model_dir)
    launch(compile_bundle(trackers_config(root, max_steps=6, val_set_size=0.1, eval_steps=3)))
    out = root / "out"
    records = metrics(out)
    losses = expected_series(records, "loss")
    eval_losses = expected_series(records, "eval_loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6] and [step for step, _ in eval_losses] == [3, 6]
    decisions = {"tensorboard": "on", "wandb": "on", "mlflow": "on"}
    assert records[0]["runtime_decisions"]["trackers"] == decisions
    assert summary(out)["runtime_decisions"]["trackers"] == decisions

    wandb_records = wandb_run_records(out)
    history = wandb_history(wandb_records)
    assert [(step, history[step]["train/loss"]) for step, _ in losses] == losses
    assert [(step, history[step]["eval/loss"]) for step, _ in eval_losses] == eval_losses
    assert wandb_config(wandb_records)["runtime_decisions.device"] == "cpu"
    assert wandb_exit_code(wandb_records) == 0

    client, run = mlflow_run(f"file:{root}/mlruns", "e2e")
    assert mlflow_series(client, run.info.run_id, "train/loss") == losses
    assert mlflow_series(client, run.info.run_id, "eval/loss") == eval_losses
    assert run.data.params["schedule.max_steps"] == "6" and run.info.status == "FINISHED"

    written = tensorboard_scalars(out / "runs")
    assert [step for step, _ in written["train/loss"]] == [step for step, _ in losses]
    assert [value for _, value in written["train/loss"]] == pytest.approx([value for _, value in losses], rel=1e-6)


def test_a_run_the_watchdog_stops_is_recorded_as_failed_by_the_trackers(tmp_path: Path, tiny_model_dir: Path) -> None:
    require_module("wandb", "pip install 'tunefile[wandb]'")
    require_module("mlflow", "pip install 'tunefile[mlflow]'")
    root = workspace(tmp_path, tiny_model_dir)
    # No loss of this model is below 0.001: the watchdog stops the run at step 2, before logging it.
    # (TensorBoard keeps no run status; leaving it out saves its slow import.)
    result = launch(compile_bundle(trackers_config(root, max_steps=6, loss_watchdog_threshold=0.001,
                                                   loss_watchdog_patience=2, use_tensorboard=False)), check=False)
    assert result.returncode != 0 and "loss_watchdog_threshold" in result.stderr
    assert [step for step, _ in expected_series(metrics(root / "out"), "loss")] == [1]  # step 2 never applied
    assert wandb_exit_code(wandb_run_records(root / "out")) == 1
    assert mlflow_run(f"file:{root}/mlruns", "e2e")[1].info.status == "FAILED"
