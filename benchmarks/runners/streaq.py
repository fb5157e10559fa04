"""streaq runner: Redis Streams + Lua, anyio worker. Bulk enqueue via ``Worker.enqueue_many``.

streaq's default serializer is pickle; the benchmark passes JSON instead (the project does not
use pickle anywhere). Task payloads here are JSON-safe.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from streaq import Worker

from runners import _base

QUEUE = "bench"


async def noop() -> None:
    _base.hit()


async def sleep() -> None:
    _base.started()
    await asyncio.sleep(0.01)
    _base.hit()


async def lat(t0: float) -> None:
    _base.hit_latency(t0)


TASKS: dict[str, Any] = {}


def _app(url: str, concurrency: int = 100, result_ttl: int = 60) -> Worker[Any]:
    """Build the Worker and register the tasks on it (``@worker.task(...)`` in streaq's docs)."""
    app: Worker[Any] = Worker(
        redis_url=url,
        concurrency=concurrency,
        queue_name=QUEUE,
        serializer=json.dumps,
        deserializer=json.loads,
        handle_signals=False,
    )
    for name, fn in (("noop", noop), ("sleep", sleep), ("lat", lat)):
        TASKS[name] = app.task(name=name, ttl=result_ttl)(fn)
    return app


class _Producer:
    def __init__(self, app: Worker[Any]) -> None:
        self.app = app

    async def one(self, kind: str, *args: Any) -> None:
        await TASKS[kind].enqueue(*args)

    async def many(self, kind: str, n: int) -> None:
        task = TASKS[kind]
        await self.app.enqueue_many([task.enqueue() for _ in range(n)])


@asynccontextmanager
async def producer(url: str) -> AsyncIterator[_Producer]:
    app = _app(url)
    async with app:
        yield _Producer(app)


async def worker(url: str, concurrency: int, result_ttl: int) -> None:
    await _app(url, concurrency, result_ttl).run_async()


if __name__ == "__main__":
    _base.main(sys.modules[__name__])
