"""Tasks with rate and concurrency limits, run in worker subprocesses.

``AIOQUEUE_REDIS_URL``, ``AIOQUEUE_QUEUE`` and ``AIOQUEUE_LEASE`` configure it. Each run
records when it ran in Redis (``spans:<queue>``: '<start> <end> <job id>') so a test can
check, across processes, how many ran at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from aioqueue import Context, Queue

queue = Queue()


async def open_redis(state: dict[str, Any]) -> None:
    state["redis"] = aioredis.Redis.from_url(queue.settings.redis_url)


async def close_redis(state: dict[str, Any]) -> None:
    await state.pop("redis").aclose()


@queue.task(retries=0, rate_limit="20/s")
async def paced(ctx: Context, n: int) -> int:
    """At most 20 starts a second across every worker."""
    return n


@queue.task(retries=0, concurrency_limit=5)
async def capped(ctx: Context, seconds: float) -> None:
    """At most 5 running at once across every worker; records its span."""
    start = time.time()
    await asyncio.sleep(seconds)
    await ctx.state["redis"].rpush(f"spans:{queue.name}", f"{start} {time.time()} {ctx.job_id}")


worker = queue.worker(concurrency=20, on_startup=[open_redis], on_shutdown=[close_redis])
