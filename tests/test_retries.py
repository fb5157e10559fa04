"""Failures: retries with backoff, Retry and Fail, timeouts, dead letters."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import running

from aioqueue import Backoff, Context, Fail, JobFailed, JobStatus, Queue, Retry

FAST = Backoff(base=0.05, jitter=False)


async def test_job_failing_twice_succeeds_on_its_third_attempt(queue: Queue) -> None:
    attempts: list[int] = []

    @queue.task(retries=3, backoff=FAST)
    async def shaky(ctx: Context) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("upstream hiccup")
        return "ok"

    job = await shaky.enqueue()
    async with running(queue.worker()):
        assert await job.result(timeout=10) == "ok"
    assert attempts == [1, 2, 3]
    info = await job.info()
    assert info.status is JobStatus.COMPLETE
    assert info.attempt == 3


async def test_backoff_waits_between_attempts(queue: Queue) -> None:
    started: list[float] = []

    @queue.task(retries=2, backoff=Backoff(base=0.3, factor=2, jitter=False))
    async def slow_to_recover(ctx: Context) -> None:
        started.append(time.time())
        if ctx.attempt < 3:
            raise RuntimeError("not yet")

    job = await slow_to_recover.enqueue()
    async with running(queue.worker()):
        await job.result(timeout=10)
    assert len(started) == 3
    assert started[1] - started[0] >= 0.3
    assert started[2] - started[1] >= 0.6


async def test_job_is_dead_lettered_with_its_traceback_after_the_last_attempt(
    queue: Queue,
) -> None:
    attempts: list[int] = []

    @queue.task(retries=2, backoff=FAST)
    async def doomed(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ValueError(f"bad input on attempt {ctx.attempt}")

    job = await doomed.enqueue()
    async with running(queue.worker()):
        with pytest.raises(JobFailed) as failure:
            await job.result(timeout=10)
    assert attempts == [1, 2, 3]
    assert failure.value.status == "dead"
    assert failure.value.error_type == "ValueError"
    assert "bad input on attempt 3" in failure.value.remote_message
    assert 'raise ValueError(f"bad input on attempt {ctx.attempt}")' in failure.value.traceback
    assert (await queue.counts()).dead == 1
    info = await job.info()
    assert info.status is JobStatus.DEAD
    assert info.reason == "retries exhausted after 3 attempts"


async def test_timeout_counts_as_a_failed_attempt(queue: Queue) -> None:
    attempts: list[int] = []

    @queue.task(retries=1, timeout=0.2, backoff=FAST)
    async def hangs(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await asyncio.Event().wait()  # until cancelled

    job = await hangs.enqueue()
    async with running(queue.worker()):
        with pytest.raises(JobFailed) as failure:
            await job.result(timeout=10)
    assert attempts == [1, 2]
    assert failure.value.error_type == "aioqueue.errors.JobTimeout"
    assert "timeout of 0.2s" in failure.value.remote_message


async def test_per_job_timeout_overrides_the_task_timeout(queue: Queue) -> None:
    @queue.task(retries=0, timeout=30)
    async def hangs(ctx: Context) -> None:
        await asyncio.Event().wait()  # until cancelled

    job = await hangs.options(timeout=0.1).enqueue()
    async with running(queue.worker()):
        with pytest.raises(JobFailed, match="JobTimeout"):
            await job.result(timeout=10)


async def test_retry_with_delay_runs_again_after_that_delay(queue: Queue) -> None:
    started: list[float] = []

    @queue.task(retries=1)
    async def later(ctx: Context) -> int:
        started.append(time.time())
        if ctx.attempt == 1:
            raise Retry(delay=0.5, reason="rate limited")
        return ctx.attempt

    job = await later.enqueue()
    async with running(queue.worker()):
        assert await job.result(timeout=10) == 2
    assert started[1] - started[0] >= 0.5


async def test_retry_status_and_reason_are_visible_while_waiting(queue: Queue) -> None:
    @queue.task(retries=1)
    async def later(ctx: Context) -> None:
        if ctx.attempt == 1:
            raise Retry(delay=60, reason="rate limited")

    job = await later.enqueue()
    async with running(queue.worker()):
        from helpers import eventually

        await eventually(lambda: _status_is(job, JobStatus.RETRYING))
    info = await job.info()
    assert info.reason == "rate limited"
    assert info.attempt == 2
    assert info.run_at is not None
    assert info.run_at.timestamp() > time.time() + 50
    assert (await queue.counts()).delayed == 1


async def _status_is(job: object, status: JobStatus) -> bool:
    from aioqueue import Job

    assert isinstance(job, Job)
    return await job.status() is status


async def test_fail_ends_the_job_without_retrying(queue: Queue) -> None:
    attempts: list[int] = []

    @queue.task(retries=5)
    async def refuses(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise Fail("account closed")

    job = await refuses.enqueue()
    async with running(queue.worker()):
        with pytest.raises(JobFailed) as failure:
            await job.result(timeout=10)
    assert attempts == [1]
    assert failure.value.status == "failed"
    assert (await queue.counts()).dead == 0


async def test_non_retryable_exceptions_are_not_retried(queue: Queue) -> None:
    attempts: list[int] = []

    @queue.task(retries=5, non_retryable=[KeyError])
    async def lookup(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise KeyError("missing")

    job = await lookup.enqueue()
    async with running(queue.worker()):
        with pytest.raises(JobFailed, match="KeyError"):
            await job.result(timeout=10)
    assert attempts == [1]


async def test_per_job_retries_override_the_task_retries(queue: Queue) -> None:
    attempts: list[int] = []

    @queue.task(retries=5, backoff=FAST)
    async def doomed(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("no")

    job = await doomed.options(retries=0).enqueue()
    async with running(queue.worker()):
        with pytest.raises(JobFailed):
            await job.result(timeout=10)
    assert attempts == [1]
