"""Quickstart: a worker and a producer against Redis at localhost:6379.

    python examples/quickstart.py

runs both in one process (the worker embedded in the event loop) and prints what happens.
Point it elsewhere with ``AIOQUEUE_REDIS_URL=redis://host:6379/0``. In production the worker
runs on its own, e.g. from this directory: ``aioqueue run quickstart:worker``.
"""

from __future__ import annotations

import asyncio
import time

from aioqueue import Backoff, Context, JobFailed, Queue, group

queue = Queue("redis://localhost:6379/0", name="quickstart")


@queue.task(retries=3, timeout=10)
async def add(ctx: Context, a: int, b: int) -> int:
    """The smallest useful task."""
    return a + b


@queue.task(retries=3, backoff=Backoff(base=0.2))
async def flaky(ctx: Context, n: int) -> str:
    """Fails on its first attempt; the retry (after a short backoff) succeeds."""
    if ctx.attempt == 1:
        raise RuntimeError("transient failure")
    return f"{n} ok on attempt {ctx.attempt}"


@queue.task(retries=0)
async def broken(ctx: Context) -> None:
    """Always fails; with no retries it goes straight to the dead-letter store."""
    raise ValueError("this job cannot succeed")


@queue.task()
async def total(ctx: Context, sums: list[int]) -> int:
    """A group's fan-in callback: runs once, after every member, with their results in order.

    No job waits in a worker slot for the others meanwhile (see docs/workflows.md).
    """
    return sum(sums)


worker = queue.worker(concurrency=50)


async def main() -> None:
    async with queue:
        running = asyncio.create_task(worker.run(handle_signals=False))

        job = await add.enqueue(1, 2)
        print(f"add(1, 2) = {await job.result(timeout=10)}  (status: {(await job.status()).value})")

        job = await flaky.enqueue(7)
        print(f"flaky(7) = {await job.result(timeout=10)!r}")

        # Fan out one add job per number, then fan in: total gets the list of their results.
        job = await group(add.prepare(n, n) for n in range(1, 11)).then(total).enqueue()
        print(f"total(1..10 doubled via 10 sub-jobs) = {await job.result(timeout=30)}")

        job = await broken.enqueue()
        try:
            await job.result(timeout=10)
        except JobFailed as exc:
            print(f"broken() -> {exc.status}: {exc.error_type}: {exc.remote_message}")

        worker.stop()
        await running

        # Bulk: enqueue 10,000 jobs in pipelined round trips, then let a burst worker drain
        # the queue and exit.
        started = time.perf_counter()
        jobs = await queue.enqueue_many([add.prepare(i, i) for i in range(10_000)])
        enqueued = time.perf_counter()
        await queue.worker(concurrency=100, burst=True).run(handle_signals=False)
        drained = time.perf_counter()
        print(
            f"{len(jobs):,} jobs: enqueued in {enqueued - started:.2f}s, "
            f"run by a burst worker in {drained - enqueued:.2f}s"
        )
        print(f"last job's result: {await jobs[-1].result(timeout=5)}")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
