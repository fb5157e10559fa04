"""max_size: enqueue fails fast with QueueFull instead of growing without bound."""

from __future__ import annotations

import asyncio

import pytest
from conftest import RedisServer

from aioqueue import Context, QueueFull


async def test_enqueue_past_max_size_raises_queue_full(
    redis_server: RedisServer, queue_name: str
) -> None:
    from aioqueue import Queue

    queue = Queue(redis_server.url, name=queue_name, max_size=5)

    @queue.task()
    async def noop(ctx: Context) -> None:
        return None

    for _ in range(3):
        await noop.enqueue()
    for _ in range(2):
        await noop.options(delay=60).enqueue()
    with pytest.raises(QueueFull, match="5 unfinished jobs"):
        await noop.enqueue()
    with pytest.raises(QueueFull):
        await noop.options(delay=5).enqueue()
    counts = await queue.counts()
    assert counts.ready + counts.delayed == 5
    await queue.close()


async def test_a_batch_that_does_not_fit_is_not_written_at_all(
    redis_server: RedisServer, queue_name: str
) -> None:
    from aioqueue import Queue

    queue = Queue(redis_server.url, name=queue_name, max_size=10)

    @queue.task()
    async def noop(ctx: Context) -> None:
        return None

    await queue.enqueue_many([noop.prepare() for _ in range(8)])
    with pytest.raises(QueueFull):
        await queue.enqueue_many([noop.prepare() for _ in range(3)])
    assert (await queue.counts()).ready == 8
    worker = queue.worker(burst=True)
    await asyncio.wait_for(worker.run(handle_signals=False), 30)
    assert worker.completed == 8
    await queue.enqueue_many([noop.prepare() for _ in range(10)])
    assert (await queue.counts()).ready == 10
    await queue.close()


async def test_existing_job_ids_do_not_count_against_max_size(
    redis_server: RedisServer, queue_name: str
) -> None:
    from aioqueue import Queue

    queue = Queue(redis_server.url, name=queue_name, max_size=1)

    @queue.task()
    async def noop(ctx: Context) -> None:
        return None

    first = await noop.options(job_id="same").enqueue()
    again = await noop.options(job_id="same").enqueue()
    assert first.id == again.id
    await queue.close()
