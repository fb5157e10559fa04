"""A worker never runs more jobs at once than its concurrency."""

from __future__ import annotations

import asyncio

from helpers import eventually, running

from aioqueue import Context, Queue


async def test_concurrency_limit_is_never_exceeded(queue: Queue) -> None:
    active = 0
    peak = 0
    finished = 0

    @queue.task()
    async def busy(ctx: Context) -> None:
        nonlocal active, peak, finished
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        finished += 1

    await queue.enqueue_many([busy.prepare() for _ in range(60)])
    worker = queue.worker(concurrency=4)
    async with running(worker):
        await eventually(lambda: finished == 60, timeout=30)
    assert peak == 4


async def test_worker_fetches_no_more_jobs_than_it_has_slots(queue: Queue) -> None:
    gate = asyncio.Event()
    started = 0

    @queue.task()
    async def wait(ctx: Context) -> None:
        nonlocal started
        started += 1
        await gate.wait()

    await queue.enqueue_many([wait.prepare() for _ in range(10)])
    worker = queue.worker(concurrency=3)
    async with running(worker):
        await eventually(lambda: started == 3)
        counts = await queue.counts()
        # Only the three running jobs were delivered; the other seven are still ready for
        # any other worker.
        assert counts.pending == 3
        assert counts.ready == 7
        gate.set()
        await eventually(lambda: started == 10)
