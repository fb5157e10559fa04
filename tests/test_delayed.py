"""Delayed jobs wait in Redis and run no earlier than asked."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from helpers import eventually, running

from aioqueue import ConfigurationError, Context, JobStatus, Queue
from aioqueue.brokers.redis import RedisBroker


async def test_delayed_job_runs_not_before_its_time(queue: Queue) -> None:
    started: list[float] = []

    @queue.task()
    async def ping(ctx: Context) -> None:
        started.append(time.time())

    enqueued = time.time()
    job = await ping.options(delay=1.0).enqueue()
    assert await job.status() is JobStatus.SCHEDULED
    assert (await queue.counts()).delayed == 1
    async with running(queue.worker()):
        await job.result(timeout=10)
    assert started[0] >= enqueued + 1.0


async def test_job_scheduled_at_a_datetime_runs_after_it(queue: Queue) -> None:
    started: list[float] = []

    @queue.task()
    async def ping(ctx: Context) -> None:
        started.append(time.time())

    at = datetime.now(timezone.utc) + timedelta(seconds=0.7)
    job = await ping.options(at=at).enqueue()
    async with running(queue.worker()):
        await job.result(timeout=10)
    assert started[0] >= at.timestamp()


async def test_delay_by_name_goes_through_queue_options(queue: Queue) -> None:
    @queue.task()
    async def ping(ctx: Context) -> str:
        return "pong"

    job = await queue.options(delay=timedelta(milliseconds=300)).enqueue("ping")
    assert await job.status() is JobStatus.SCHEDULED
    async with running(queue.worker()):
        assert await job.result(timeout=10) == "pong"


def test_delay_and_at_together_are_refused(queue: Queue) -> None:
    with pytest.raises(ConfigurationError):
        queue.options(delay=1, at=datetime.now(timezone.utc))
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        queue.options(at=datetime.now())


async def test_delayed_jobs_are_promoted_after_this_machines_clock_steps_back(
    queue: Queue,
) -> None:
    @queue.task()
    async def noop(ctx: Context) -> None:
        return None

    job = await noop.options(delay=0.2).enqueue()
    broker = await queue.connected_broker()
    assert isinstance(broker, RedisBroker)
    # This machine's clock steps back an hour (NTP) after the broker measured Redis's clock.
    broker._clock_offset_ms -= 3_600_000

    async def promoted() -> bool:
        await broker.promote_due(10)
        return (await job.status()) is JobStatus.QUEUED

    await eventually(promoted, timeout=5)
