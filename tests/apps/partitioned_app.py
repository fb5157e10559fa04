"""A queue of three partitions, for CLI tests; AIOQUEUE_REDIS_URL and AIOQUEUE_QUEUE pick
Redis and the queue's name."""

from __future__ import annotations

from aioqueue import Context, Queue

queue = Queue(partitions=3)


@queue.task(retries=0)
async def fail(ctx: Context, n: int) -> None:
    raise ValueError(f"boom {n}")


worker = queue.worker(concurrency=10)
