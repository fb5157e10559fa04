"""Waiting for results: typed timeouts, many waiters, jobs that do not exist."""

from __future__ import annotations

import asyncio

import pytest
from helpers import running

from aioqueue import Context, JobNotFound, Queue, ResultTimeout


async def test_result_times_out_with_a_typed_error_when_no_worker_runs(queue: Queue) -> None:
    @queue.task()
    async def never(ctx: Context) -> None:
        return None

    job = await never.enqueue()
    with pytest.raises(ResultTimeout, match=r"did not finish within 0\.2s"):
        await job.result(timeout=0.2)


async def test_result_of_an_unknown_job_is_job_not_found(queue: Queue) -> None:
    with pytest.raises(JobNotFound):
        await queue.job("no-such-job").result(timeout=1)


async def test_a_thousand_concurrent_waiters_all_get_their_results(queue: Queue) -> None:
    @queue.task()
    async def square(ctx: Context, n: int) -> int:
        await asyncio.sleep(0.01)
        return n * n

    jobs = await square.map([(n,) for n in range(1000)])
    async with running(queue.worker(concurrency=100)):
        results = await asyncio.gather(*(job.result(timeout=30) for job in jobs))
    assert results == [n * n for n in range(1000)]
