"""Tasks for fault-injection tests, run in worker subprocesses.

``AIOQUEUE_REDIS_URL``, ``AIOQUEUE_QUEUE``, ``AIOQUEUE_LEASE`` and ``AIOQUEUE_MAX_DELIVERIES``
configure it. Tasks count their runs in Redis so a test can tell how often each ran.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import redis.asyncio as aioredis

from aioqueue import Context, Queue

queue = Queue()


async def open_redis(state: dict[str, Any]) -> None:
    state["redis"] = aioredis.Redis.from_url(queue.settings.redis_url)


async def close_redis(state: dict[str, Any]) -> None:
    await state.pop("redis").aclose()


@queue.task(retries=0)
async def counted_sleep(ctx: Context, seconds: float) -> str:
    """Counts its runs under ``runs:<job id>``, then sleeps."""
    await ctx.state["redis"].incr(f"runs:{ctx.job_id}")
    await asyncio.sleep(seconds)
    return "slept"


@queue.task(retries=0)
async def kill_own_worker(ctx: Context) -> None:
    """A poison job: SIGKILLs the process running it."""
    await ctx.state["redis"].incr(f"runs:{ctx.job_id}")
    os.kill(os.getpid(), signal.SIGKILL)


@queue.task(retries=0)
async def fails(ctx: Context, message: str) -> None:
    raise RuntimeError(message)


worker = queue.worker(concurrency=10, on_startup=[open_redis], on_shutdown=[close_redis])


@queue.task(retries=0)
async def member(ctx: Context, i: int) -> int:
    """A group member with a little work, so a SIGKILL lands while members run."""
    await asyncio.sleep(0.05)
    return i


@queue.task(retries=0)
async def gather(ctx: Context, results: list[int]) -> int:
    """A fan-in callback: counts its runs and checks it got every result in order."""
    client = ctx.state["redis"]
    await client.incr(f"gather-runs:{ctx.job_id}")
    await client.set(f"gather-in-order:{ctx.job_id}", int(results == list(range(len(results)))))
    return len(results)
