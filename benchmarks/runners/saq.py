"""SAQ runner: Redis list queue (BLMOVE) with a Lua enqueue script. No bulk enqueue API."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from saq import Queue, Worker

from runners import _base

QUEUE = "bench"


async def noop(ctx: dict[str, Any]) -> None:
    _base.hit()


async def sleep(ctx: dict[str, Any]) -> None:
    _base.started()
    await asyncio.sleep(0.01)
    _base.hit()


async def lat(ctx: dict[str, Any], *, t0: float) -> None:
    _base.hit_latency(t0)


class _Producer:
    def __init__(self, queue: Any) -> None:
        self.queue = queue

    async def one(self, kind: str, *args: Any) -> None:
        if kind == "lat":
            await self.queue.enqueue("lat", t0=args[0])
        else:
            await self.queue.enqueue(kind)


@asynccontextmanager
async def producer(url: str) -> AsyncIterator[_Producer]:
    queue = Queue.from_url(url, name=QUEUE)
    await queue.connect()
    try:
        yield _Producer(queue)
    finally:
        await queue.disconnect()


async def worker(url: str, concurrency: int, result_ttl: int) -> None:
    queue = Queue.from_url(url, name=QUEUE)
    w = Worker(
        queue,
        functions=[("noop", noop), ("sleep", sleep), ("lat", lat)],
        concurrency=concurrency,
    )
    # The same sequence as saq.worker.start() (the CLI), minus its event-loop/signal setup.
    await queue.connect()
    try:
        await w.start()
    finally:
        await queue.disconnect()


if __name__ == "__main__":
    _base.main(sys.modules[__name__])
