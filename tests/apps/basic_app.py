"""A worker app for subprocess tests; AIOQUEUE_REDIS_URL and AIOQUEUE_QUEUE pick Redis and queue."""

from __future__ import annotations

import asyncio

from aioqueue import Context, Queue

queue = Queue()


@queue.task(retries=0)
async def sleep_then_return(ctx: Context, seconds: float, value: int) -> int:
    await asyncio.sleep(seconds)
    return value


worker = queue.worker(concurrency=10, shutdown_grace=20)


class WorkerSettings:
    queue = queue
    concurrency = 3


def make_worker() -> object:
    return queue.worker(concurrency=4)


not_a_worker = 42
