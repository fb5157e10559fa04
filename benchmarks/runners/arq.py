"""arq runner: sorted-set queue, polling worker. No bulk enqueue API.

arq's default job serializer is pickle; the benchmark passes a JSON serializer instead (the
project does not use pickle anywhere). Job payloads here are JSON-safe.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func

from runners import _base

QUEUE = "bench"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


async def noop(ctx: dict[str, Any]) -> None:
    _base.hit()


async def sleep(ctx: dict[str, Any]) -> None:
    _base.started()
    await asyncio.sleep(0.01)
    _base.hit()


async def lat(ctx: dict[str, Any], t0: float) -> None:
    _base.hit_latency(t0)


class _Producer:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def one(self, kind: str, *args: Any) -> None:
        await self.pool.enqueue_job(kind, *args)


@asynccontextmanager
async def producer(url: str) -> AsyncIterator[_Producer]:
    pool = await create_pool(
        RedisSettings.from_dsn(url),
        job_serializer=_dumps,
        job_deserializer=json.loads,
        default_queue_name=QUEUE,
    )
    try:
        yield _Producer(pool)
    finally:
        await pool.aclose()


async def worker(url: str, concurrency: int, result_ttl: int) -> None:
    w = Worker(
        functions=[func(noop, name="noop"), func(sleep, name="sleep"), func(lat, name="lat")],
        queue_name=QUEUE,
        redis_settings=RedisSettings.from_dsn(url),
        max_jobs=concurrency,
        keep_result=result_ttl,
        handle_signals=False,
        job_serializer=_dumps,
        job_deserializer=json.loads,
    )
    await w.async_run()


if __name__ == "__main__":
    _base.main(sys.modules[__name__])
