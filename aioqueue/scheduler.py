"""The cron scheduler coroutine every worker runs.

There is no leader and no separate beat process: every worker computes the same ticks from
the cron definitions and the clock, sleeps until the next one, and tries to claim it. The
claim (``cron_claim.lua``) is atomic in Redis, so exactly one worker enqueues each tick's run,
under the deterministic job id ``cron:<name>:<fire ms>``. Workers joining, leaving or dying
do not matter: any live worker claims the next tick.

Missed ticks are skipped: a worker starting up schedules only ticks after its start, and one
that wakes late claims the latest due tick, never a backlog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aioqueue.brokers.base import Broker, CronClaim, NewJob
from aioqueue.cron import CronJob, due_tick
from aioqueue.errors import ConfigurationError, RedisUnavailable
from aioqueue.serialization import Envelope, encode

if TYPE_CHECKING:
    from aioqueue.queue import Queue
    from aioqueue.task import Task

__all__ = ["CronScheduler"]

logger = logging.getLogger(__name__)

# Never sleep less than this between checks, so clock jitter cannot spin the loop.
MIN_SLEEP = 0.001


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class CronScheduler:
    """Claims and enqueues the ticks of a worker's cron jobs."""

    def __init__(
        self,
        queue: Queue,
        jobs: Sequence[CronJob],
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.queue = queue
        self.jobs = list(jobs)
        self.clock = clock
        self.tasks: dict[str, Task[Any, Any]] = {job.name: task_for(queue, job) for job in jobs}

    async def run(self, broker: Broker) -> None:
        """Claim every tick from now on, sleeping until the next one is due. Runs until
        cancelled."""
        if not self.jobs:
            return
        started = self.clock()
        last: dict[str, datetime] = {job.name: started for job in self.jobs}
        while True:
            now = self.clock()
            for job in self.jobs:
                tick = due_tick(job, last[job.name], now)
                if tick is not None:
                    last[job.name] = tick
                    await self._claim(broker, job, tick)
            now = self.clock()
            upcoming = min(job.next_fire(max(last[job.name], now)) for job in self.jobs)
            await asyncio.sleep(max((upcoming - now).total_seconds(), MIN_SLEEP))

    async def _claim(self, broker: Broker, job: CronJob, fire: datetime) -> None:
        fire_ms = int(fire.timestamp() * 1000)
        task = self.tasks[job.name]
        envelope = Envelope(
            task.name,
            tuple(job.args),
            dict(job.kwargs),
            enqueued_ms=int(self.clock().timestamp() * 1000),
            retries=job.retries,
            timeout=job.timeout,
            fire_ms=fire_ms,
        )
        new_job = NewJob(job.tick_id(fire), encode(envelope))
        try:
            claim = await broker.claim_tick(job.name, fire_ms, new_job, job.unique)
        except RedisUnavailable as exc:
            logger.warning("cron %s: could not claim the tick at %s: %s", job.name, fire, exc)
            return
        if claim is CronClaim.CLAIMED:
            logger.info("cron %s: enqueued the run for %s", job.name, fire.isoformat())
        elif claim is CronClaim.OVERLAP:
            logger.warning(
                "cron %s: skipped the tick at %s, the previous run is still unfinished",
                job.name,
                fire.isoformat(),
            )


def task_for(queue: Queue, job: CronJob) -> Task[Any, Any]:
    """The task a cron job runs: the Task it was given, the task already registered for its
    function, or a task registered now under the cron job's name."""
    from aioqueue.task import Task

    if isinstance(job.func, Task):
        return job.func
    for task in queue.tasks.values():
        if task.func is job.func:
            return task
    if job.name in queue.tasks:
        raise ConfigurationError(
            f"cron job {job.name!r}: a different task named {job.name!r} is already registered"
        )
    registered: Task[Any, Any] = queue.task(name=job.name, retries=job.retries)(job.func)
    return registered
