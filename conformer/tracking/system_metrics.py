"""MLflow's own system metrics (`system/cpu_utilization_percentage`, memory, disk, network; GPU memory where pynvml
finds a GPU) for a run, sent through the run's outbox like every other metric."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class _OutboxMetrics:
    """Stands in for the monitor's own metric logger: its samples take the run's outbox like every metric."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def record_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.tracker.active:
            self.tracker.log_metrics(metrics, step=step)

    def flush(self) -> None:
        return None


def start_system_metrics(tracker: Any, interval: float, resumed: bool = False) -> Any:
    """MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk, network; GPU memory where
    pynvml finds one) sampled every `interval` s while the run lasts, logged through the run's outbox: a store
    that goes down neither stops the sampling nor delays the end of the run. In a `resumed` run the samples'
    steps go on from the last one logged."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        def monitor(self) -> None:  # MLflow's loop asks the store for the run's status at every sample
            while not self._shutdown_event.wait(self.sampling_interval):
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())

    monitor = Monitor(tracker.run_id, sampling_interval=interval, tracking_uri=tracker.uri, resume_logging=resumed)
    monitor.mlflow_logger = _OutboxMetrics(tracker)
    monitor.start()
    return monitor
