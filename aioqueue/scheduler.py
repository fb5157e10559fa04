"""The cron scheduler coroutine every worker runs.

There is no leader and no separate beat process: every worker computes the same ticks from
the cron definitions and the clock, sleeps until the next one, and tries to claim it. The
claim (``cron_claim.lua``) is atomic in Redis, so exactly one worker enqueues each tick's run,
under the deterministic job id ``cron:<name>:<fire ms>``. Workers joining, leaving or dying
do not matter: any live worker claims the next tick.

Ticks are decided on one clock that every worker shares, the broker's (Redis ``TIME``), read
once per wake-up; a worker's own clock plays no part, so a worker whose clock runs ahead
neither claims ticks early nor blocks the others. A claim that fails because Redis is
unreachable is tried again, with backoff, until Redis answers: a tick is never dropped
because of an outage.

Missed ticks are skipped, counted on the broker's clock: a worker starting up schedules only
ticks after its start, and one that wakes late, or that Redis kept waiting past several
ticks, claims the latest due tick, never a backlog.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from aioqueue.brokers.base import Broker, CronClaim, NewJob
from aioqueue.cron import CronJob, due_tick
from aioqueue.errors import ConfigurationError, InvalidArguments, RedisUnavailable
from aioqueue.partitions import fitted
from aioqueue.serialization import Envelope, Signer, encode

if TYPE_CHECKING:
    from aioqueue.queue import Queue
    from aioqueue.task import Task

__all__ = ["CronScheduler", "next_wake", "retry_delay"]

logger = logging.getLogger(__name__)

# Never sleep less than this between checks, so clock jitter cannot spin the loop.
MIN_SLEEP = 0.001
# After an 'early' answer (the broker's clock was behind the reading the tick was decided
# on, e.g. after a failover to a server whose clock lags), look again this soon.
EARLY_PAUSE = 0.05
# Backoff between attempts while Redis is unreachable. Capped low: one attempt per second
# costs nothing, and a tick should be claimed soon after Redis returns.
RETRY_BASE = 0.1
RETRY_CAP = 1.0
# The default lease (Settings.lease) in ms; the worker passes its own.
DEFAULT_LEASE_MS = 30_000

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_ONE_MS = timedelta(milliseconds=1)

Sleep = Callable[[float], Awaitable[None]]


def retry_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failed attempts (>= 1): doubling from
    RETRY_BASE up to RETRY_CAP, the upper half of it jittered, so workers do not retry in
    lock-step and never spin."""
    ceiling = min(RETRY_CAP, RETRY_BASE * 2.0 ** max(failures - 1, 0))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def next_wake(jobs: Sequence[CronJob], last: Mapping[str, datetime], now: datetime) -> datetime:
    """The earliest tick still to claim: each job's first fire after both its last claimed
    (or skipped) tick and ``now``."""
    return min(job.next_fire(max(last[job.name], now)) for job in jobs)


def from_ms(epoch_ms: int) -> datetime:
    """Unix milliseconds as an aware UTC datetime."""
    return _EPOCH + epoch_ms * _ONE_MS


def to_ms(moment: datetime) -> int:
    """An aware datetime as Unix milliseconds."""
    return (moment - _EPOCH) // _ONE_MS


class CronScheduler:
    """Claims and enqueues the ticks of a worker's cron jobs.

    ``sleep`` waits a number of seconds (``asyncio.sleep``); tests pass one that advances a
    fake clock instead.
    """

    def __init__(
        self,
        queue: Queue,
        jobs: Sequence[CronJob],
        *,
        sleep: Sleep = asyncio.sleep,
        signer: Signer | None = None,
    ) -> None:
        self.queue = queue
        self.signer = signer or queue.signer
        self.jobs = list(jobs)
        self.sleep = sleep
        self.tasks: dict[str, Task[Any, Any]] = {job.name: task_for(queue, job) for job in jobs}
        for job in jobs:
            # Checked now, not at the first tick: wrong arguments would dead-letter every run.
            try:
                self.tasks[job.name].signature.bind(tuple(job.args), dict(job.kwargs))
            except InvalidArguments as exc:
                raise ConfigurationError(f"cron job {job.name!r}: {exc}") from None
        # The run of each job's tick being claimed, built once, so every attempt at a tick
        # (after a failure, or an 'early' answer) sends the same call.
        self._runs: dict[str, NewJob] = {}

    async def run(self, broker: Broker, lease_ms: int = DEFAULT_LEASE_MS) -> None:
        """Claim every tick from now on (the broker's clock), sleeping until the next one is
        due. ``lease_ms`` is the worker's lease: a unique job's previous run whose entry has
        been idle that long belongs to a worker that is gone. Runs until cancelled."""
        if not self.jobs:
            return
        last: dict[str, datetime] | None = None
        failures = 0
        while True:
            early = False
            try:
                now = from_ms(await broker.now_ms())
                if last is None:
                    # Only ticks after the start, on the shared clock.
                    last = {job.name: now for job in self.jobs}
                for job in self.jobs:
                    tick = due_tick(job, last[job.name], now)
                    if tick is None:
                        continue
                    claim = await self._claim(broker, job, tick, now, lease_ms)
                    if claim is CronClaim.EARLY:
                        early = True
                    else:
                        last[job.name] = tick
            except RedisUnavailable as exc:
                # Nothing advanced for the jobs not claimed yet: when Redis answers again,
                # each claims its latest due tick then.
                failures += 1
                if failures == 1:
                    logger.warning("cron: %s; retrying with backoff until Redis answers", exc)
                await self.sleep(retry_delay(failures))
                continue
            if failures:
                logger.info("cron: Redis answers again after %d failed attempts", failures)
                failures = 0
            delay = (next_wake(self.jobs, last, now) - now).total_seconds()
            if early:
                delay = min(delay, EARLY_PAUSE)  # that tick is still to claim: look again soon
            await self.sleep(max(delay, MIN_SLEEP))

    async def _claim(
        self, broker: Broker, job: CronJob, fire: datetime, now: datetime, lease_ms: int
    ) -> CronClaim:
        """Claim the tick of ``job`` at ``fire``; RedisUnavailable propagates."""
        # A partitioned queue claims ticks in its first partition: the job goes there too.
        tick_id = fitted(job.tick_id(fire), self.queue.settings.partitions)
        new_job = self._runs.get(job.name)
        if new_job is None or new_job.job_id != tick_id:
            task = self.tasks[job.name]
            envelope = Envelope(
                task.name,
                tuple(job.args),
                dict(job.kwargs),
                enqueued_ms=to_ms(now),
                retries=job.retries,
                timeout=job.timeout,
                fire_ms=to_ms(fire),
            )
            sealed = self.signer.seal(tick_id, encode(envelope))
            new_job = NewJob(tick_id, sealed, priority=task.priority)
            self._runs[job.name] = new_job
        claim = await broker.claim_tick(job.name, to_ms(fire), new_job, job.unique, lease_ms)
        if claim is CronClaim.EARLY:
            logger.debug("cron %s: the tick at %s is not due yet", job.name, fire.isoformat())
            return claim
        del self._runs[job.name]
        if claim is CronClaim.CLAIMED:
            logger.info("cron %s: enqueued the run for %s", job.name, fire.isoformat())
        elif claim is CronClaim.OVERLAP:
            logger.warning(
                "cron %s: skipped the tick at %s, the previous run is still unfinished",
                job.name,
                fire.isoformat(),
            )
        return claim


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
