"""taskiq runner: taskiq-redis ``RedisStreamBroker`` (XADD / XREADGROUP / XACK). No bulk API.

The worker is taskiq's ``Receiver`` driven the way ``taskiq worker`` does it
(``taskiq.cli.worker.run.start_listen``), with ``max_async_tasks=100``. taskiq's default result
backend (none) is kept, as a plain ``taskiq worker`` would run.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

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


def _broker(url: str, *, worker: bool = False) -> RedisStreamBroker:
    broker = RedisStreamBroker(url, queue_name=QUEUE)
    # As in start_listen(): mark the broker as a worker before the tasks are registered.
    broker.is_worker_process = worker
    for name, fn in (("noop", noop), ("sleep", sleep), ("lat", lat)):
        TASKS[name] = broker.task(task_name=name)(fn)
    return broker


class _Producer:
    async def one(self, kind: str, *args: Any) -> None:
        await TASKS[kind].kiq(*args)


@asynccontextmanager
async def producer(url: str) -> AsyncIterator[_Producer]:
    broker = _broker(url)
    await broker.startup()
    try:
        yield _Producer()
    finally:
        await broker.shutdown()


async def worker(url: str, concurrency: int, result_ttl: int) -> None:
    broker = _broker(url, worker=True)
    with ThreadPoolExecutor() as pool:
        receiver = Receiver(broker=broker, executor=pool, max_async_tasks=concurrency)
        try:
            await receiver.listen(asyncio.Event())
        finally:
            await broker.shutdown()


if __name__ == "__main__":
    _base.main(sys.modules[__name__])
