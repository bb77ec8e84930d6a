"""Axolotl's use_otel_metrics as one of the trackers (trackers.py): training values served for Prometheus."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..schemas.run_plan import OtelPlan

log = logging.getLogger(__name__)


class OtelTracker:
    """Axolotl's use_otel_metrics: the latest training values as OpenTelemetry instruments, read through
    OpenTelemetry's Prometheus exporter and served at http://host:port/metrics for a Prometheus server to scrape.
    The names are Axolotl's, so dashboards built for it work: gauges for the loss, learning rate, epoch, gradient
    norm and each evaluation value, and a counter of the optimizer steps this process completed. Nothing is pushed
    anywhere; the server stops when the run finishes."""

    name, extra = "otel", "otel"
    advice = "choose a free otel_metrics_port (another process on this machine holds this one) on a host this " \
             "machine has"
    GAUGES = {"loss": ("axolotl_train_loss", "Current training loss"),
              "lr": ("axolotl_learning_rate", "Current learning rate"),
              "epoch": ("axolotl_epoch", "Current training epoch"),
              "grad_norm": ("axolotl_gradient_norm", "Gradient norm")}
    STEPS = ("axolotl_global_steps", "Total training steps completed")

    def __init__(self, plan: OtelPlan, *, start_step: int) -> None:
        self.plan = plan
        self.counted_step = start_step  # the counter counts this process's steps, from where it resumed
        self.gauges: dict[str, Any] = {}

    def load(self) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import CollectorRegistry, start_http_server

        self.reader_class, self.provider_class, self.resource_class = PrometheusMetricReader, MeterProvider, Resource
        self.registry_class, self.start_http_server = CollectorRegistry, start_http_server

    def start(self, run_config: dict[str, Any]) -> None:
        # A registry of our own rather than prometheus_client's global one, and a provider that is not
        # OpenTelemetry's global: nothing else in the process sees or changes these metrics.
        registry = self.registry_class()
        self.provider = self.provider_class(metric_readers=[self.reader_class(registry=registry)],
                                           resource=self.resource_class.create({"service.name": "tunefile"}),
                                           shutdown_on_exit=False)
        self.meter = self.provider.get_meter("tunefile.training")
        self.steps = self.meter.create_counter(self.STEPS[0], description=self.STEPS[1], unit="1")
        try:
            self.server, self.thread = self.start_http_server(self.plan.port, addr=self.plan.host, registry=registry)
        except Exception:
            self.provider.shutdown()
            raise
        log.info("OpenTelemetry metrics at http://%s:%d/metrics", self.plan.host, self.plan.port)

    def log_config(self, values: dict[str, Any]) -> None:
        """Prometheus holds numbers over time, not a configuration: the bundle's config.yaml is the record."""

    def log(self, step: int, record: dict[str, Any]) -> None:
        if step > self.counted_step:
            self.steps.add(step - self.counted_step)
            self.counted_step = step
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key in self.GAUGES:
                self.gauge(*self.GAUGES[key]).set(float(value))
            elif key.startswith("eval_"):  # eval_loss → axolotl_eval_loss, as Axolotl names every evaluation value
                self.gauge(f"axolotl_{key}", f"Evaluation metric: {key}").set(float(value))

    def gauge(self, name: str, description: str) -> Any:
        if name not in self.gauges:
            self.gauges[name] = self.meter.create_gauge(name, description=description, unit="1")
        return self.gauges[name]

    def finish(self, model_dir: Path | None, *, failed: bool) -> None:
        self.server.shutdown()  # stops serve_forever; server_close frees the port
        self.server.server_close()
        self.thread.join(timeout=10)
        self.provider.shutdown()
