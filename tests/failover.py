"""A producer and a worker running through a failover, and what it cost: shared by the
Sentinel and Cluster tests.

The producer enqueues numbered jobs with fixed ids and retries every call that failed until
it is acknowledged (repeating an enqueue never writes a job twice); the fault strikes a
third of the way in. Afterwards every acknowledged job must complete: one that cannot be
found, or never ends, was lost by the failover.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from helpers import running

from aioqueue import Context, Job, JobNotFound, Queue, RedisUnavailable, ResultTimeout


@dataclass
class FailoverOutcome:
    acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    runs: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: int = 0
    """Enqueue calls that failed during the failover and were sent again."""

    @property
    def ran_twice(self) -> int:
        return sum(1 for count in self.runs.values() if count > 1)


async def run_through_failover(
    url: str,
    name: str,
    fault: Callable[[], Awaitable[None]],
    *,
    jobs: int = 300,
    wait_replicas: int = 0,
    deadline: float = 60.0,
    settle_within: float = 30.0,
    partitions: int = 1,
) -> FailoverOutcome:
    """Enqueue ``jobs`` jobs while a worker runs them; ``fault()`` runs a third of the way
    in. Returns what was acknowledged, lost (not complete ``settle_within`` seconds after
    the last was acknowledged) and run more than once."""
    outcome = FailoverOutcome()
    queue = Queue(url, name=name, wait_replicas=wait_replicas, partitions=partitions)

    @queue.task(retries=10)
    async def record(ctx: Context, n: int) -> int:
        outcome.runs[ctx.job_id] += 1
        await asyncio.sleep(0.005)
        return n

    stop_at = time.monotonic() + deadline
    worker = queue.worker(concurrency=20, lease=3.0, block=1.0, wait_replicas=wait_replicas)
    async with running(worker, stop_timeout=30):
        handles: list[Job[int]] = []
        faulted: asyncio.Task[None] | None = None
        for n in range(jobs):
            if n == jobs // 3:
                faulted = asyncio.create_task(fault())
            while True:
                try:
                    handles.append(await record.options(job_id=f"job-{n}").enqueue(n))
                    break
                except RedisUnavailable:
                    outcome.refused += 1
                    if time.monotonic() > stop_at:
                        raise
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.002)
        assert faulted is not None
        await asyncio.wait_for(faulted, max(stop_at - time.monotonic(), 1))
        outcome.acknowledged = len(handles)
        stop_at = min(stop_at, time.monotonic() + settle_within)

        async def settled(job: Job[int]) -> str | None:
            while True:
                try:
                    await job.result(timeout=max(stop_at - time.monotonic(), 0.1))
                    return None
                except (JobNotFound, ResultTimeout):
                    return job.id
                except RedisUnavailable:
                    if time.monotonic() > stop_at:
                        return job.id
                    await asyncio.sleep(0.1)

        missing = await asyncio.gather(*(settled(h) for h in handles))
        outcome.lost = [job_id for job_id in missing if job_id is not None]
    await queue.close()
    return outcome
