"""SwanLab and the OpenTelemetry metrics endpoint (runtime/trackers.py) with the real packages: SwanLab's offline and
local runs are read back from output_dir/swanlog with no attempt at the network, and the Prometheus endpoint is
scraped over HTTP on 127.0.0.1 while the run logs, then found closed. A missing package is simulated by making its
import fail; the real ones are required (a failure under CI=true)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import test_runtime_trackers as other_trackers
import yaml
from test_runtime_trackers import DECISIONS, RECORDS, RUN_CONFIG, expected_series, hide_package, log_all

from helpers import require_module
from runtime_bundles import compile_bundle, free_port, launch, metrics, workspace, write_config
from tunefile.runtime.errors import RuntimeUserError
from tunefile.runtime.trackers import open_trackers, scalars, unopened_trackers
from tunefile.schemas.run_plan import OtelPlan, SwanlabPlan, TrackersPlan

# The other tracker tests' fixtures: each test gets its environment back (the libraries set variables), and
# network_attempts records (and refuses) every attempt to reach a host other than this machine.
environment_restored = other_trackers.environment_restored
network_attempts = other_trackers.network_attempts

SWANLAB = "pip install 'tunefile[swanlab]'"
OTEL = "pip install 'tunefile[otel]'"


def swanlab_plan(mode: str = "offline") -> TrackersPlan:
    return TrackersPlan(tensorboard=False, swanlab=SwanlabPlan(project="t", experiment_name="unit",
                                                               description="a test", workspace=None, mode=mode))


def otel_plan(port: int) -> TrackersPlan:
    return TrackersPlan(tensorboard=False, otel=OtelPlan(host="127.0.0.1", port=port))


# --- reading back what SwanLab wrote ------------------------------------------------------------------------

def swanlab_run(output_dir: Path) -> tuple[list[Any], dict[str, Any]]:
    """The records of the one run under OUTPUT_DIR/swanlog (SwanLab's own reader and protobuf messages) and the
    configuration it saved beside them."""
    from swanlab.proto.swanlab.record.v1 import record_pb2
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (run_dir,) = (output_dir / "swanlog").glob("run-*")
    (path,) = run_dir.glob("run-*.swanlab")
    reader = DataStoreReader()
    reader.open(path)
    records = []
    for raw in reader:
        record = record_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    reader.close()
    saved = yaml.safe_load((run_dir / "files" / "config.yaml").read_text(encoding="utf-8"))
    return records, {key: entry["value"] for key, entry in saved.items()}


def of_type(records: list[Any], kind: str) -> list[Any]:
    return [getattr(record, kind) for record in records if record.WhichOneof("record_type") == kind]


def swanlab_series(records: list[Any]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for scalar in of_type(records, "scalar"):
        series.setdefault(scalar.key, []).append((scalar.step, scalar.value.number))
    return series


def swanlab_state(records: list[Any]) -> str:
    from swanlab.proto.swanlab.run.v1 import run_pb2

    (finish,) = of_type(records, "finish")
    return run_pb2.RunState.Name(finish.state)


# --- SwanLab ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["offline", "local"])
def test_swanlab_offline_and_local_keep_the_config_and_every_value_under_output_dir_without_the_network(
        tmp_path: Path, network_attempts: list[Any], mode: str) -> None:
    require_module("swanlab", SWANLAB)
    trackers = open_trackers(swanlab_plan(mode), output_dir=tmp_path, start_step=0, offline=True,
                             run_config=RUN_CONFIG)
    assert trackers.decisions == {"swanlab": "on"}
    log_all(trackers)
    trackers.finish(None, failed=False)

    records, config = swanlab_run(tmp_path)
    (start,) = of_type(records, "start")
    assert (start.project, start.name, start.description) == ("t", "unit", "a test")
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in RECORDS:
        for key, value in scalars(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    assert swanlab_series(records) == expected  # exact: doubles; grad_norm absent at step 2
    assert config["optimizer.learning_rate"] == 0.003 and config["data.datasets"] == [{"path": "a.jsonl"}]
    assert config["runtime_decisions.device"] == DECISIONS["device"]
    assert swanlab_state(records) == "RUN_STATE_FINISHED"
    assert network_attempts == []


def test_swanlab_records_a_failed_run_as_crashed(tmp_path: Path) -> None:
    require_module("swanlab", SWANLAB)
    trackers = open_trackers(swanlab_plan(), output_dir=tmp_path, start_step=0, offline=True, run_config=RUN_CONFIG)
    trackers.log(1, RECORDS[0])
    trackers.finish(None, failed=True)
    assert swanlab_state(swanlab_run(tmp_path)[0]) == "RUN_STATE_CRASHED"


def test_swanlab_mode_disabled_opens_nothing_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hide_package(monkeypatch, "swanlab")  # not even imported: no warning about a package the run does not need
    trackers = open_trackers(swanlab_plan("disabled"), output_dir=tmp_path, start_step=0, offline=True,
                             run_config=RUN_CONFIG)
    assert trackers.trackers == []
    assert trackers.decisions == {"swanlab": "off: swanlab_mode is disabled"}
    assert not (tmp_path / "swanlog").exists()


# --- the OpenTelemetry endpoint -----------------------------------------------------------------------------

def scrape(port: int) -> dict[str, float]:
    """http://127.0.0.1:PORT/metrics as {sample name: value}, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("axolotl_")}


def port_is_free(port: int) -> bool:
    """Whether a server could listen on PORT now. SO_REUSEADDR as servers set it (prometheus_client's too): the
    connections the scrapes left in TIME_WAIT do not hold the port, a socket still listening on it does."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_otel_serves_axolotls_metrics_while_the_run_logs_and_frees_the_port_when_it_finishes(
        tmp_path: Path, network_attempts: list[Any]) -> None:
    require_module("opentelemetry.exporter.prometheus", OTEL)
    port = free_port()
    trackers = open_trackers(otel_plan(port), output_dir=tmp_path, start_step=0, offline=True, run_config=RUN_CONFIG)
    assert trackers.decisions == {"otel": "on"}

    trackers.log(1, RECORDS[0])
    assert scrape(port) == {"axolotl_train_loss": 2.5, "axolotl_learning_rate": 0.001, "axolotl_epoch": 0.1,
                            "axolotl_gradient_norm": 1.25, "axolotl_global_steps_total": 1.0}
    log_all(trackers)  # steps 1 (again: counted once), 2, 2 (evaluation) and 3
    assert scrape(port) == {"axolotl_train_loss": 1.75, "axolotl_learning_rate": 0.003, "axolotl_epoch": 0.3,
                            "axolotl_gradient_norm": 0.5, "axolotl_eval_loss": 2.25,
                            "axolotl_global_steps_total": 3.0}

    trackers.finish(None, failed=False)
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    assert port_is_free(port)
    assert network_attempts == []


def test_otel_counts_the_steps_a_resumed_run_trains(tmp_path: Path) -> None:
    require_module("opentelemetry.exporter.prometheus", OTEL)
    port = free_port()
    trackers = open_trackers(otel_plan(port), output_dir=tmp_path, start_step=2, offline=True, run_config=RUN_CONFIG)
    trackers.log(3, RECORDS[3])
    assert scrape(port)["axolotl_global_steps_total"] == 1.0
    trackers.finish(None, failed=True)
    assert port_is_free(port)


def test_a_taken_otel_port_stops_the_run_with_one_line(tmp_path: Path) -> None:
    require_module("opentelemetry.exporter.prometheus", OTEL)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RuntimeUserError) as error:
            open_trackers(otel_plan(port), output_dir=tmp_path, start_step=0, offline=True, run_config=RUN_CONFIG)
    message = str(error.value)
    assert message.startswith("otel could not start: ") and "otel_metrics_port" in message
    assert "\n" not in message


# --- both ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("tracker", "package", "extra"), [("swanlab", "swanlab", "swanlab"),
                                                           ("otel", "opentelemetry", "otel"),
                                                           ("otel", "prometheus_client", "otel")])
def test_a_missing_package_leaves_its_tracker_out_with_a_decision_and_one_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tracker: str,
        package: str, extra: str) -> None:
    require_module("swanlab", SWANLAB)
    require_module("opentelemetry.exporter.prometheus", OTEL)
    hide_package(monkeypatch, package)
    plan = TrackersPlan(tensorboard=False, swanlab=swanlab_plan().swanlab,
                        otel=OtelPlan(host="127.0.0.1", port=free_port()))
    with caplog.at_level("WARNING", logger="tunefile.runtime.trackers"):
        trackers = open_trackers(plan, output_dir=tmp_path, start_step=0, offline=True, run_config=RUN_CONFIG)
    log_all(trackers)
    trackers.finish(None, failed=False)
    install = f"pip install 'tunefile[{extra}]'"
    assert trackers.decisions[tracker] == f"off: not installed ({install})"
    assert {name: state for name, state in trackers.decisions.items() if name != tracker} == \
        {({"swanlab", "otel"} - {tracker}).pop(): "on"}  # the other one still ran
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and tracker in warnings[0] and install in warnings[0]


def test_a_finished_run_launched_again_opens_neither_and_says_why() -> None:
    plan = TrackersPlan(tensorboard=False, swanlab=swanlab_plan().swanlab, otel=OtelPlan(host="localhost", port=8000))
    trackers = unopened_trackers(plan, "the run had already finished")
    assert trackers.decisions == {"swanlab": "off: the run had already finished",
                                  "otel": "off: the run had already finished"}


# --- end to end ---------------------------------------------------------------------------------------------

def test_a_compiled_offline_run_feeds_swanlab_the_losses_of_metrics_jsonl_and_opens_the_otel_endpoint(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    require_module("swanlab", SWANLAB)
    require_module("opentelemetry.exporter.prometheus", OTEL)
    root = workspace(tmp_path, tiny_model_dir)
    port = free_port()
    config = write_config(root, adapter="lora", lora_target_linear=True, max_steps=6, val_set_size=0.1, eval_steps=3,
                          offline=True, use_swanlab=True, swanlab_project="t", swanlab_experiment_name="e2e",
                          use_otel_metrics=True, otel_metrics_host="127.0.0.1", otel_metrics_port=port)
    run = launch(compile_bundle(config))
    assert f"OpenTelemetry metrics at http://127.0.0.1:{port}/metrics" in run.stdout + run.stderr
    assert port_is_free(port)  # closed with the run
    out = root / "out"
    records = metrics(out)
    decisions = {"swanlab": "on", "otel": "on"}
    assert records[0]["runtime_decisions"]["trackers"] == decisions

    swanlab_records, swanlab_config = swanlab_run(out)
    series = swanlab_series(swanlab_records)
    assert series["train/loss"] == expected_series(records, "loss")
    assert series["eval/loss"] == expected_series(records, "eval_loss")
    assert [step for step, _ in series["eval/loss"]] == [3, 6]
    assert swanlab_config["schedule.max_steps"] == 6 and swanlab_config["runtime_decisions.device"] == "cpu"
    assert swanlab_state(swanlab_records) == "RUN_STATE_FINISHED"
