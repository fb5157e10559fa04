"""A worker with a one-second cron job that counts its runs per tick in Redis."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis

from aioqueue import Context, Queue

queue = Queue()


async def open_redis(state: dict[str, Any]) -> None:
    state["redis"] = aioredis.Redis.from_url(queue.settings.redis_url)


async def close_redis(state: dict[str, Any]) -> None:
    await state.pop("redis").aclose()


@queue.cron(timedelta(seconds=1))
async def tick(ctx: Context) -> None:
    """Counts runs per fire time (ms) in the hash ``ticks:<queue>``."""
    assert ctx.fire_time is not None
    fire_ms = int(ctx.fire_time.timestamp() * 1000)
    await ctx.state["redis"].hincrby(f"ticks:{queue.name}", str(fire_ms), 1)
    await asyncio.sleep(0.05)


worker = queue.worker(concurrency=5, on_startup=[open_redis], on_shutdown=[close_redis])
