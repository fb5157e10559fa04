"""Redis trouble is survived: restarts, flushes, refused connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import RedisServer, free_port
from helpers import eventually, running

from aioqueue import Context, Queue, RedisUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server only this test uses, persisting every write, so it can be restarted."""
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    yield server
    server.kill()


async def test_every_job_completes_across_a_redis_restart(own_redis: RedisServer) -> None:
    queue = Queue(own_redis.url, name="restart")
    done: set[int] = set()

    @queue.task(retries=5)
    async def work(ctx: Context, n: int) -> None:
        await asyncio.sleep(0.01)
        done.add(n)

    await queue.enqueue_many([work.prepare(i) for i in range(300)])
    async with running(queue.worker(concurrency=10, lease=2)):
        await eventually(lambda: len(done) >= 50, timeout=30)
        await asyncio.to_thread(own_redis.restart)
        await eventually(lambda: len(done) == 300, timeout=60)
        await eventually(lambda: _empty(queue), timeout=30)
    assert done == set(range(300))
    await queue.close()


async def _empty(queue: Queue) -> bool:
    counts = await queue.counts()
    return counts.ready + counts.pending + counts.delayed == 0


async def test_worker_keeps_consuming_after_flushall(own_redis: RedisServer) -> None:
    queue = Queue(own_redis.url, name="flush")

    @queue.task()
    async def echo(ctx: Context, value: int) -> int:
        return value

    async with running(queue.worker(block=0.5)):
        assert await (await echo.enqueue(1)).result(timeout=10) == 1
        redis.Redis(port=own_redis.port).flushall()
        assert await (await echo.enqueue(2)).result(timeout=20) == 2
    await queue.close()


async def test_producer_gets_a_typed_error_when_redis_is_down() -> None:
    queue = Queue(f"redis://127.0.0.1:{free_port()}/0", name="down")
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="Redis unavailable"):
        await queue.enqueue("anything")
    assert time.monotonic() - started < 10
    assert isinstance(RedisUnavailable("x"), ConnectionError)
