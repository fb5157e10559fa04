"""A snapshot of a queue and its workers, for ``aioqueue info``, health checks and dashboards."""

from __future__ import annotations

import math
import time

import msgspec

from aioqueue.brokers.base import Broker

__all__ = ["QueueStats", "WorkerInfo", "collect_stats"]


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One live worker, as its last heartbeat described it."""

    id: str
    host: str
    pid: int
    concurrency: int
    in_flight: int
    started_at: float
    """Unix time the worker started consuming."""
    last_heartbeat: float
    """Unix time of its last heartbeat."""
    completed: int
    failed: int
    completed_last_minute: int
    failed_last_minute: int


class QueueStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counts, lag, throughput and live workers of one queue at one instant."""

    queue: str
    ready: int
    """Jobs waiting to be fetched."""
    in_flight: int
    """Jobs fetched by a worker and not settled yet."""
    delayed: int
    """Jobs waiting for their delay or retry backoff."""
    dead: int
    """Dead-lettered jobs."""
    lag_seconds: float | None
    """Age of the oldest job no worker has fetched yet (None when nothing waits)."""
    completed_per_second: float
    """Jobs completed per second over the last minute, summed over live workers."""
    failed_per_second: float
    """Attempts that failed per second over the last minute, summed over live workers."""
    workers: list[WorkerInfo]
    eviction_problem: str | None = None
    """Why Redis would lose jobs (an evicting ``maxmemory-policy``), or None."""


def _number(row: dict[str, str], name: str) -> float:
    """A heartbeat figure; 0 for anything that is not a finite number (garbage written by
    someone else must not break ``queue.stats()``)."""
    try:
        value = float(row.get(name, 0))
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


async def collect_stats(queue: str, broker: Broker) -> QueueStats:
    """Read one snapshot of a queue from its broker."""
    counts = await broker.counts()
    lag = await broker.lag_ms()
    facts = await broker.server_facts()
    workers = [
        WorkerInfo(
            id=row["id"],
            host=row.get("host", "?"),
            pid=int(_number(row, "pid")),
            concurrency=int(_number(row, "concurrency")),
            in_flight=int(_number(row, "in_flight")),
            started_at=_number(row, "started"),
            last_heartbeat=_number(row, "beat"),
            completed=int(_number(row, "completed")),
            failed=int(_number(row, "failed")),
            completed_last_minute=int(_number(row, "completed_1m")),
            failed_last_minute=int(_number(row, "failed_1m")),
        )
        for row in await broker.workers()
    ]
    return QueueStats(
        queue=queue,
        ready=counts.ready,
        in_flight=counts.pending,
        delayed=counts.delayed,
        dead=counts.dead,
        lag_seconds=None if lag is None else lag / 1000,
        completed_per_second=sum(w.completed_last_minute for w in workers) / 60,
        failed_per_second=sum(w.failed_last_minute for w in workers) / 60,
        workers=sorted(workers, key=lambda w: w.id),
        eviction_problem=facts.eviction_problem(),
    )


def uptime(worker: WorkerInfo, now: float | None = None) -> float:
    """Seconds since the worker started."""
    return (time.time() if now is None else now) - worker.started_at
