"""Worker metrics: a rolling one-minute rate for ``aioqueue info`` and optional Prometheus.

The rate window is always on and costs a dict update per settled batch; its totals travel in
the worker's heartbeat, so ``aioqueue info`` can show jobs/s without any per-job Redis work.
Prometheus export is optional (``pip install aioqueue[prometheus]``): with ``metrics_port``
set, the worker serves ``/metrics`` with job counters by task and outcome, a duration
histogram, and queue depth and lag gauges.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from aioqueue.errors import ConfigurationError

if TYPE_CHECKING:
    from aioqueue.brokers.base import QueueCounts

__all__ = ["PrometheusMetrics", "RateWindow"]


class RateWindow:
    """Counts per second over the last ``seconds`` seconds."""

    def __init__(self, seconds: int = 60) -> None:
        self.seconds = seconds
        self._buckets: dict[int, int] = defaultdict(int)

    def add(self, count: int = 1, now: float | None = None) -> None:
        """Record ``count`` events at ``now`` (default: the current time)."""
        second = int(time.time() if now is None else now)
        self._buckets[second] += count
        if len(self._buckets) > self.seconds * 2:
            self._trim(second)

    def total(self, now: float | None = None) -> int:
        """Events in the window ending at ``now``."""
        second = int(time.time() if now is None else now)
        self._trim(second)
        return sum(count for at, count in self._buckets.items() if at > second - self.seconds)

    def _trim(self, second: int) -> None:
        for at in [at for at in self._buckets if at <= second - self.seconds]:
            del self._buckets[at]


class PrometheusMetrics:
    """Prometheus collectors for one worker, served over HTTP by :meth:`serve`."""

    def __init__(self, queue: str, registry: Any = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ConfigurationError(
                "metrics_port needs prometheus-client: pip install 'aioqueue[prometheus]'"
            ) from exc
        self.queue = queue
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self._prom = prom
        self.jobs = prom.Counter(
            "aioqueue_jobs",
            "Jobs settled by this worker, by task and outcome",
            ["queue", "task", "outcome"],
            registry=self.registry,
        )
        self.duration = prom.Histogram(
            "aioqueue_job_duration_seconds",
            "Run time of one attempt, from start to settle",
            ["queue", "task"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )
        self.depth = prom.Gauge(
            "aioqueue_queue_jobs",
            "Jobs in the queue by state",
            ["queue", "state"],
            registry=self.registry,
        )
        self.lag = prom.Gauge(
            "aioqueue_queue_lag_seconds",
            "Age of the oldest job no worker has fetched yet",
            ["queue"],
            registry=self.registry,
        )
        self.in_flight = prom.Gauge(
            "aioqueue_worker_in_flight",
            "Jobs running on this worker",
            ["queue"],
            registry=self.registry,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``host:port`` from a background thread."""
        self._prom.start_http_server(port, addr=host, registry=self.registry)

    def observe(self, task: str, outcome: str, seconds: float) -> None:
        """Count one settled job."""
        self.jobs.labels(self.queue, task, outcome).inc()
        self.duration.labels(self.queue, task).observe(seconds)

    def set_queue(self, counts: QueueCounts, lag_ms: int | None, in_flight: int) -> None:
        """Update the gauges from a snapshot of the queue."""
        for state, value in (
            ("ready", counts.ready),
            ("pending", counts.pending),
            ("delayed", counts.delayed),
            ("dead", counts.dead),
        ):
            self.depth.labels(self.queue, state).set(value)
        self.lag.labels(self.queue).set((lag_ms or 0) / 1000)
        self.in_flight.labels(self.queue).set(in_flight)
