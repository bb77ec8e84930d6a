"""Experiment trackers (Weights & Biases, MLflow, TensorBoard, SwanLab) and a Prometheus endpoint (OpenTelemetry
metrics), fed the same records as metrics.jsonl.

The plan's ``trackers`` section says which ones the run wants; only the main process opens them. Each is a
small class behind one interface: ``load`` (import its package), ``start`` (the run's configuration as one
flat dict), ``log_config`` (values learnt later: what this machine decided), ``log`` (one step's record) and
``finish`` (the final model folder, and whether the run failed).

When things are not as planned:
- the package is not installed: the run goes on without that tracker; one warning line and the runtime
  decisions (metrics.jsonl, train_summary.json) name the extra that installs it;
- offline (wandb mode offline, an MLflow ``file:`` URI, SwanLab mode offline or local): nothing is sent anywhere.
  wandb keeps its run under output_dir/wandb (``wandb sync`` uploads it later), SwanLab under output_dir/swanlog
  (``swanlab sync``), MLflow writes its file store, and the libraries' crash reports and telemetry are switched
  off, since they would reach for the network. The OpenTelemetry endpoint only answers on this machine's
  host:port; it sends nothing;
- the tracker cannot start (online: no API key, the server unreachable; the metrics port taken): the run
  stops before its first step with one line. The user asked for that record; hours of training without it are
  worse than an error now, and Axolotl (through transformers' callbacks) fails at the same point (its
  OpenTelemetry callback only logs a taken port, and the run then has no endpoint);
- a tracker that fails after it started is dropped with one warning line and the failure is recorded in the
  runtime decisions; training and metrics.jsonl go on (wandb itself retries a lost connection in its own
  process without holding up the loop).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..schemas.run_plan import MlflowPlan, SwanlabPlan, TrackersPlan, WandbPlan
from .errors import RuntimeUserError
from .otel_metrics import OtelTracker

log = logging.getLogger(__name__)

# Files beside the final model that are the run's logs, not the model (metrics.py and train.py write them).
NOT_MODEL_FILES = frozenset({"metrics.jsonl", "train_summary.json"})


class TrackerStartError(RuntimeUserError):
    """A tracker the plan asks for is installed but could not start."""


class Tracker(Protocol):
    name: str  # as the runtime decisions name it
    extra: str  # the tunefile extra that installs its package
    advice: str  # what to check when it cannot start

    def load(self) -> None: ...
    def start(self, run_config: dict[str, Any]) -> None: ...
    def log_config(self, values: dict[str, Any]) -> None: ...
    def log(self, step: int, record: dict[str, Any]) -> None: ...
    def finish(self, model_dir: Path | None, *, failed: bool) -> None: ...


# --- what every tracker is given ----------------------------------------------------------------------------

def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"lora": {"r": 8}}} → {"model.lora.r": 8}: trackers show a configuration as one table."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers under the names every tracker shows: train/loss, train/lr, …,
    eval/loss. The step is the x axis, not a series; a value that is absent (grad_norm None) is skipped."""
    named = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        named[f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return named


def model_files(model_dir: Path) -> list[Path]:
    """The final model as save_pretrained left it: the folder's top-level files (checkpoints, runs/ and
    wandb/ are sub-folders), without the run's own logs."""
    return sorted(path for path in model_dir.iterdir() if path.is_file() and path.name not in NOT_MODEL_FILES)


def as_text(value: Any) -> str:
    """A parameter as MLflow and TensorBoard show it: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


# --- the trackers -------------------------------------------------------------------------------------------

class WandbTracker:
    name, extra = "wandb", "wandb"
    advice = "log in (`wandb login` or WANDB_API_KEY) and check the network, or set wandb_mode: offline"

    def __init__(self, plan: WandbPlan, *, output_dir: Path) -> None:
        self.plan = plan
        self.output_dir = output_dir
        self.run: Any = None

    def load(self) -> None:
        if self.plan.mode == "offline":
            # Set before the import: wandb's helper process reads them too, and its crash reporter would
            # otherwise try to send.
            os.environ["WANDB_MODE"] = "offline"
            os.environ["WANDB_ERROR_REPORTING"] = "false"
        import wandb

        self.wandb = wandb

    def start(self, run_config: dict[str, Any]) -> None:
        plan = self.plan
        self.run = self.wandb.init(project=plan.project, entity=plan.entity, name=plan.name, id=plan.run_id,
                                   resume="allow" if plan.run_id else None, mode=plan.mode,
                                   dir=str(self.output_dir), config=run_config)

    def log_config(self, values: dict[str, Any]) -> None:
        # A resumed run records this launch's decisions over the last one's.
        self.run.config.update(flatten(values), allow_val_change=True)

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=step)

    def finish(self, model_dir: Path | None, *, failed: bool) -> None:
        if model_dir is not None and not failed and self.plan.log_model and self.plan.mode == "online":
            artifact = self.wandb.Artifact(name=f"model-{self.run.id}", type="model")
            for path in model_files(model_dir):
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        exit_code = 1 if failed else 0
        self.run.finish(exit_code=exit_code)
        # finish() only tells wandb's helper process; the run file is complete (and an upload done) when that
        # process has shut down. wandb waits for it in an atexit hook, and a training process leaves with
        # os._exit, which runs none: wait here.
        try:
            self.wandb.teardown(exit_code=exit_code)
        except SystemExit as exc:  # wandb's way of saying its helper process failed
            raise RuntimeError(f"wandb's helper process exited with {exc.code}") from None


class MlflowTracker:
    """Through MlflowClient and an explicit run id rather than mlflow's module-level active run: no global
    state, and a finish that records FAILED as well as FINISHED."""

    name, extra = "mlflow", "mlflow"
    advice = "check mlflow_tracking_uri (the server must be reachable, a file: folder writable)"

    def __init__(self, plan: MlflowPlan, *, offline: bool) -> None:
        self.plan = plan
        self.offline = offline
        self.run_id = ""

    def load(self) -> None:
        if self.offline:
            os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # read when mlflow is imported
        if self.plan.tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told the choice is deliberate; a folder is exactly what an
            # offline run needs (no server, no database package).
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self.client_class, self.metric, self.param = MlflowClient, Metric, Param
        self.max_value_length = MAX_PARAM_VAL_LENGTH

    def start(self, run_config: dict[str, Any]) -> None:
        self.client = self.client_class(tracking_uri=self.plan.tracking_uri)
        experiment = self.client.get_experiment_by_name(self.plan.experiment_name)
        experiment_id = experiment.experiment_id if experiment is not None \
            else self.client.create_experiment(self.plan.experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=self.plan.run_name).info.run_id
        self.log_config(run_config)

    def log_config(self, values: dict[str, Any]) -> None:
        # MLflow caps a parameter's length (its server rejects the whole batch otherwise): long values, such as
        # an inline chat template, are cut.
        params = [self.param(key, as_text(value)[:self.max_value_length]) for key, value in flatten(values).items()]
        self.client.log_batch(self.run_id, params=params)

    def log(self, step: int, record: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.metric(key, value, now, step) for key, value in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, model_dir: Path | None, *, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TensorBoardTracker:
    name = "tensorboard"
    extra = "train"  # tensorboard ships in the train extra
    advice = "check that output_dir is writable"

    def __init__(self, *, log_dir: Path, start_step: int) -> None:
        self.log_dir = log_dir
        self.start_step = start_step

    def load(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.writer_class = SummaryWriter

    def start(self, run_config: dict[str, Any]) -> None:
        # Events already there from an interrupted run are kept up to the step this one resumes from; later
        # ones are about to be trained again (metrics.jsonl is cut the same way).
        self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=self.start_step + 1)
        self.writer.add_text("run_plan", markdown_table(run_config), self.start_step)

    def log_config(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.writer.add_text(key, markdown_table(flatten(value) if isinstance(value, dict) else {key: value}),
                                 self.start_step)

    def log(self, step: int, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, model_dir: Path | None, *, failed: bool) -> None:
        self.writer.close()


class SwanlabTracker:
    """Axolotl's SwanLab plugin (use_swanlab / swanlab_*): the run's configuration and every metric, in SwanLab's
    cloud or, with mode offline or local, only in output_dir/swanlog."""

    name, extra = "swanlab", "swanlab"
    advice = "log in (`swanlab login` or SWANLAB_API_KEY) and check the network, or set swanlab_mode: offline"

    def __init__(self, plan: SwanlabPlan, *, output_dir: Path) -> None:
        self.plan = plan
        self.log_dir = output_dir / "swanlog"
        self.run: Any = None

    def load(self) -> None:
        import swanlab

        self.swanlab = swanlab

    def start(self, run_config: dict[str, Any]) -> None:
        plan = self.plan
        # SwanLab takes Axolotl's mode names (cloud is its online); offline and local write only under log_dir.
        self.run = self.swanlab.init(project=plan.project, name=plan.experiment_name, description=plan.description,
                                     workspace=plan.workspace, mode=plan.mode, log_dir=str(self.log_dir),
                                     config=run_config)

    def log_config(self, values: dict[str, Any]) -> None:
        self.run.config.update(flatten(values))

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=step)

    def finish(self, model_dir: Path | None, *, failed: bool) -> None:
        # Explicitly: SwanLab would finish in an atexit hook, which a training process leaving with os._exit skips.
        self.run.finish(state="crashed" if failed else "success")


def markdown_table(flat: dict[str, Any]) -> str:
    """TensorBoard's text tab renders Markdown: a two-column table reads better than a JSON blob."""
    rows = "".join(f"| {key} | {as_text(value).replace('|', '&#124;')} |\n" for key, value in flat.items())
    return "| key | value |\n| --- | --- |\n" + rows


# --- the set a run opens ------------------------------------------------------------------------------------

class TrackerSet:
    """The trackers a run started, fed together. ``decisions`` says, for each one the plan asked for, whether
    it runs ("on") or why not: it goes into the runtime decisions."""

    def __init__(self, trackers: list[Tracker], decisions: dict[str, str]) -> None:
        self.trackers = trackers
        self.decisions = decisions

    def log_config(self, values: dict[str, Any]) -> None:
        self._each("recording the configuration", lambda tracker: tracker.log_config(values))

    def log(self, step: int, record: dict[str, Any]) -> None:
        self._each(f"logging step {step}", lambda tracker: tracker.log(step, record))

    def finish(self, model_dir: Path | None, *, failed: bool) -> None:
        self._each("finishing", lambda tracker: tracker.finish(model_dir, failed=failed))
        self.trackers = []

    def _each(self, doing: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # a tracker is a record of the run, never a reason to stop it
                reason = f"failed {doing} ({first_line(exc)})"
                log.warning("%s: %s; training goes on without it, metrics.jsonl keeps every record",
                            tracker.name, reason)
                self.decisions[tracker.name] = f"off: {reason}"
                self.trackers.remove(tracker)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def planned_trackers(plan: TrackersPlan, *, output_dir: Path, start_step: int, offline: bool) -> list[Tracker]:
    trackers: list[Tracker] = []
    if plan.tensorboard:
        trackers.append(TensorBoardTracker(log_dir=output_dir / "runs", start_step=start_step))
    if plan.wandb is not None:
        trackers.append(WandbTracker(plan.wandb, output_dir=output_dir))
    if plan.mlflow is not None:
        trackers.append(MlflowTracker(plan.mlflow, offline=offline))
    if plan.swanlab is not None and plan.swanlab.mode != "disabled":
        trackers.append(SwanlabTracker(plan.swanlab, output_dir=output_dir))
    if plan.otel is not None:
        trackers.append(OtelTracker(plan.otel, start_step=start_step))
    return trackers


def open_trackers(plan: TrackersPlan, *, output_dir: Path, start_step: int, offline: bool,
                  run_config: dict[str, Any]) -> TrackerSet:
    """Start every tracker the plan asks for. One whose package is missing is left out (recorded, warned);
    one that is installed but cannot start stops the run (TrackerStartError), after the others are closed."""
    started: list[Tracker] = []
    decisions: dict[str, str] = {}
    if plan.swanlab is not None and plan.swanlab.mode == "disabled":
        decisions["swanlab"] = "off: swanlab_mode is disabled"
    config = flatten(run_config)
    for tracker in planned_trackers(plan, output_dir=output_dir, start_step=start_step, offline=offline):
        try:
            tracker.load()
        except ImportError as exc:
            install = f"pip install 'tunefile[{tracker.extra}]'"
            decisions[tracker.name] = f"off: not installed ({install})"
            log.warning("%s: not installed (%s); training goes on without it: %s", tracker.name, first_line(exc),
                        install)
            continue
        try:
            tracker.start(config)
        except Exception as exc:
            TrackerSet(started, {}).finish(None, failed=True)
            raise TrackerStartError(f"{tracker.name} could not start: {first_line(exc)}; {tracker.advice}") \
                from exc
        started.append(tracker)
        decisions[tracker.name] = "on"
    if started:
        log.info("experiment trackers: %s", ", ".join(tracker.name for tracker in started))
    return TrackerSet(started, decisions)


def unopened_trackers(plan: TrackersPlan, reason: str) -> TrackerSet:
    """No tracker started (a finished run launched again has nothing to record); the decisions say why."""
    names = [name for name, wanted in (("tensorboard", plan.tensorboard), ("wandb", plan.wandb is not None),
                                       ("mlflow", plan.mlflow is not None), ("swanlab", plan.swanlab is not None),
                                       ("otel", plan.otel is not None)) if wanted]
    return TrackerSet([], {name: f"off: {reason}" for name in names})
