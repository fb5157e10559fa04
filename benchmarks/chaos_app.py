"""The worker app ``chaos.py`` runs and kills: every run of job ``n`` is counted in Redis."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import redis.asyncio as aioredis

from aioqueue import Context, Queue

queue = Queue(name="chaos")


async def open_redis(state: dict[str, Any]) -> None:
    state["redis"] = aioredis.Redis.from_url(queue.settings.redis_url)


async def close_redis(state: dict[str, Any]) -> None:
    await state.pop("redis").aclose()


@queue.task(retries=3)
async def work(ctx: Context, n: int) -> int:
    """Up to 20 ms of pretend I/O; counts each run under ``chaos:runs``."""
    await ctx.state["redis"].hincrby("chaos:runs", str(n), 1)
    await asyncio.sleep(random.uniform(0, 0.02))
    return n


worker = queue.worker(concurrency=50, on_startup=[open_redis], on_shutdown=[close_redis])
