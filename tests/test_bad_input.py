"""Bad input gets a typed error at enqueue, or a dead letter with a reason; nothing else
is affected and the worker keeps running."""

from __future__ import annotations

import pytest
import redis
from helpers import eventually, running

from aioqueue import (
    Context,
    InvalidArguments,
    JobFailed,
    PayloadTooLarge,
    Queue,
    SerializationError,
    UnknownTask,
)
from aioqueue.brokers.redis.keys import Keys


async def test_garbage_in_the_stream_is_dead_lettered_and_good_jobs_still_run(
    queue: Queue, redis_client: redis.Redis
) -> None:
    @queue.task()
    async def ok(ctx: Context) -> str:
        return "fine"

    keys = Keys(queue.name)
    before = await ok.enqueue()
    redis_client.xadd(keys.stream, {"payload": b"\xff\x00\x13garbage"})
    redis_client.xadd(keys.stream, {"j": "no-such-job"})
    redis_client.hset(keys.job("mangled"), mapping={"env": b"\xc1\xc1\xc1", "status": "queued"})
    redis_client.xadd(keys.stream, {"j": "mangled"})
    after = await ok.enqueue()
    async with running(queue.worker()):
        assert await before.result(timeout=10) == "fine"
        assert await after.result(timeout=10) == "fine"
        await eventually(lambda: redis_client.xlen(keys.stream) == 0)
        dead = {job.id: job for job in await queue.dead_letters()}
        assert set(dead) == {"mangled", next(i for i in dead if i.startswith("foreign-"))}
        assert dead["mangled"].reason == "undecodable job"
        foreign = next(job for i, job in dead.items() if i.startswith("foreign-"))
        assert foreign.reason == "foreign stream entry"
        late = await ok.enqueue()
        assert await late.result(timeout=10) == "fine"


async def test_unknown_task_from_a_producer_without_the_code_is_dead_lettered(
    queue: Queue,
) -> None:
    producer = Queue(queue.settings.redis_url, name=queue.name)

    @queue.task()
    async def known(ctx: Context) -> None:
        return None

    job = await producer.enqueue("does_not_exist", 1)
    async with running(queue.worker()):
        with pytest.raises(JobFailed, match="unknown task"):
            await job.result(timeout=10)
    await producer.close()


async def test_wrong_argument_types_from_a_producer_without_the_code_are_dead_lettered(
    queue: Queue,
) -> None:
    producer = Queue(queue.settings.redis_url, name=queue.name)

    @queue.task()
    async def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    bad = await producer.enqueue("add", "one", 2)
    good = await producer.enqueue("add", 1, 2)
    async with running(queue.worker()):
        with pytest.raises(JobFailed, match="invalid arguments"):
            await bad.result(timeout=10)
        assert await good.result(timeout=10) == 3
    await producer.close()


async def test_known_task_with_wrong_arguments_is_refused_at_enqueue(queue: Queue) -> None:
    @queue.task()
    async def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    with pytest.raises(InvalidArguments, match="'a'"):
        await queue.enqueue("add", "one", 2)
    with pytest.raises(UnknownTask):
        await queue.enqueue("ad", 1, 2)


async def test_payload_over_the_limit_is_refused(redis_server: object, queue_name: str) -> None:
    queue = Queue("redis://127.0.0.1:1/0", name=queue_name, max_payload_bytes=1000)

    @queue.task()
    async def store(ctx: Context, blob: str) -> None:
        return None

    with pytest.raises(PayloadTooLarge, match="max_payload_bytes=1000"):
        await store.enqueue("x" * 2000)


async def test_unencodable_arguments_are_refused(queue: Queue) -> None:
    with pytest.raises(SerializationError):
        await queue.enqueue("anything", object())
