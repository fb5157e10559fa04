"""A snapshot of a queue and its workers, for ``aioqueue info``, health checks and dashboards."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import msgspec

from aioqueue.brokers.base import ArrivalSample, Broker

__all__ = [
    "QueueStats",
    "WorkerInfo",
    "arrival_rate",
    "collect_stats",
    "lag_growing",
    "workers_needed",
]

WINDOW_MS = 60_000
"""Rates and the mean job time are taken over the last minute."""
MIN_ARRIVAL_SPAN_MS = 1_000
"""Arrival samples closer together than this give no rate (two workers beating at once)."""
GROWING_MARGIN = 1.05
"""The lag counts as growing when jobs arrive this much faster than they are settled: the
two rates are measured over slightly different minutes, and a balanced queue must not
flicker between growing and not."""


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
    busy_last_minute: float = 0.0
    """Seconds the attempts it settled in the last minute ran, fetch to recorded outcome."""


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
    arrived_per_second: float | None = None
    """Jobs that arrived at the ready stream per second over the last minute, counted by
    the broker: new jobs, delayed jobs and retries that came due, requeued dead jobs. None
    until live workers' heartbeats have sampled the count for a second or more."""
    settled_per_second: float = 0.0
    """Attempts settled (completed or failed) per second over the last minute, summed over
    live workers."""
    mean_job_seconds: float | None = None
    """Mean time an attempt settled in the last minute ran, fetch to recorded outcome (None
    when none was settled)."""
    utilisation: float | None = None
    """Jobs in flight on live workers over their summed concurrency (None: no workers)."""
    workers_needed: int | None = None
    """Workers that keep the lag flat at the current arrival rate: arrival rate x mean job
    time busy slots (Little's law), over the live workers' mean concurrency, rounded up.
    None when unknown (no arrival rate yet, or jobs arrive and none was settled)."""
    lag_growing: bool = False
    """Jobs wait, and arrive faster than they are settled and than the live workers can
    settle them (see :func:`lag_growing`)."""
    paused_at: float | None = None
    """When the queue was paused (Unix seconds), None while it runs
    (docs/flow-control.md#pause-and-resume)."""
    partitions: list[str] = msgspec.field(default_factory=list)
    """The hash tags of a partitioned queue's partitions (docs/deploying.md#partitioned-queues):
    partition ``p``'s keys are ``aioqueue:{<tag>}:...``; empty for a queue of one."""


def _number(row: dict[str, str], name: str) -> float:
    """A heartbeat figure; 0 for anything that is not a finite number (garbage written by
    someone else must not break ``queue.stats()``)."""
    try:
        value = float(row.get(name, 0))
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def arrival_rate(
    samples: Sequence[ArrivalSample], now_ms: int, window_ms: int = WINDOW_MS
) -> float | None:
    """Jobs per second added to the ready stream over ``window_ms`` up to the newest sample:
    from the newest sample at or before the window's start (or the oldest one, while the
    samples span less), to the newest one.

    None when the samples do not tell: fewer than two since the counter last started again
    (the stream was deleted), closer together than ``MIN_ARRIVAL_SPAN_MS``, or the newest
    older than the window (no live worker samples any more)."""
    ordered = sorted(samples, key=lambda sample: (sample.at_ms, sample.added))
    restart = 0
    for i in range(1, len(ordered)):
        if ordered[i].added < ordered[i - 1].added:
            restart = i
    ordered = ordered[restart:]
    if not ordered or ordered[-1].at_ms < now_ms - window_ms:
        return None
    newest, base = ordered[-1], ordered[0]
    for sample in ordered:
        if sample.at_ms > newest.at_ms - window_ms:
            break
        base = sample
    span_ms = newest.at_ms - base.at_ms
    if span_ms < MIN_ARRIVAL_SPAN_MS:
        return None
    return (newest.added - base.added) * 1000 / span_ms


def workers_needed(
    arrived_per_second: float | None, mean_job_seconds: float | None, slots_per_worker: float
) -> int | None:
    """Workers that keep the lag flat (Little's law): ``arrived_per_second`` x
    ``mean_job_seconds`` slots are busy on average; that many slots over
    ``slots_per_worker``, rounded up. None when it cannot be known."""
    if arrived_per_second is None:
        return None
    if arrived_per_second == 0:
        return 0
    if mean_job_seconds is None or slots_per_worker <= 0:
        return None
    # A hair below a whole number is that number: the rates are estimates anyway.
    return math.ceil(arrived_per_second * mean_job_seconds / slots_per_worker - 1e-9)


def lag_growing(
    ready: int, arrived_per_second: float | None, settled_per_second: float, capacity: float | None
) -> bool:
    """True when jobs wait, and arrive faster than they are settled and faster than the live
    workers can settle them (``capacity``: their slots over the mean job time, per second;
    None when unknown).

    The capacity test keeps a young worker from crying wolf: its settlements trail the
    arrivals by one job time, which over its first seconds looks like falling behind."""
    if arrived_per_second is None or ready == 0:
        return False
    if arrived_per_second <= settled_per_second * GROWING_MARGIN:
        return False
    return capacity is None or arrived_per_second > capacity


def _window(worker: WorkerInfo) -> float:
    """Seconds a worker's last-minute counters cover at its last heartbeat: its uptime
    while that is shorter than the minute. The counters keep whole seconds, the current
    one included, so a full window is 59 s and the part of the current second gone by."""
    full = WINDOW_MS / 1000 - 1 + worker.last_heartbeat % 1
    return max(min(worker.last_heartbeat - worker.started_at, full), 1.0)


async def collect_stats(queue: str, broker: Broker, partitions: Sequence[str] = ()) -> QueueStats:
    """Read one snapshot of a queue from its broker (``partitions``: its partitions' hash
    tags, if it has more than one)."""
    counts = await broker.counts()
    lag = await broker.lag_ms()
    facts = await broker.server_facts()
    arrived = arrival_rate(await broker.arrivals(), await broker.now_ms())
    paused_ms = await broker.paused_since()
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
            busy_last_minute=_number(row, "busy_1m"),
        )
        for row in await broker.workers()
    ]
    completed = sum(w.completed_last_minute / _window(w) for w in workers)
    failed = sum(w.failed_last_minute / _window(w) for w in workers)
    settled = sum(w.completed_last_minute + w.failed_last_minute for w in workers)
    mean = sum(w.busy_last_minute for w in workers) / settled if settled else None
    slots = sum(w.concurrency for w in workers)
    return QueueStats(
        queue=queue,
        ready=counts.ready,
        in_flight=counts.pending,
        delayed=counts.delayed,
        dead=counts.dead,
        lag_seconds=None if lag is None else lag / 1000,
        completed_per_second=completed,
        failed_per_second=failed,
        workers=sorted(workers, key=lambda w: w.id),
        eviction_problem=facts.eviction_problem(),
        arrived_per_second=arrived,
        settled_per_second=completed + failed,
        mean_job_seconds=mean,
        utilisation=sum(w.in_flight for w in workers) / slots if slots > 0 else None,
        workers_needed=workers_needed(arrived, mean, slots / len(workers) if workers else 0),
        # A paused queue's lag grows by design: no call to add workers.
        lag_growing=paused_ms is None
        and lag_growing(counts.ready, arrived, completed + failed, slots / mean if mean else None),
        paused_at=None if paused_ms is None else paused_ms / 1000,
        partitions=list(partitions),
    )


def uptime(worker: WorkerInfo, now: float | None = None) -> float:
    """Seconds since the worker started."""
    return (time.time() if now is None else now) - worker.started_at
