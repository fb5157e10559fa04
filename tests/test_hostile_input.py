"""Anyone with write access to Redis can write jobs: whatever a worker reads is bounded and
validated, and what fails is dead-lettered with the reason while good jobs keep running."""

from __future__ import annotations

import logging

import msgspec
import pytest
import redis
from conftest import RedisServer
from helpers import eventually, running

from aioqueue import Context, JobStatus, Queue
from aioqueue.brokers.redis.keys import Keys

pytestmark = pytest.mark.timeout(30)


def plant(client: redis.Redis, queue: Queue, job_id: str, envelope: bytes) -> None:
    """Write a job the way enqueue.lua does, bypassing every producer-side check."""
    keys = Keys(queue.name)
    entry = client.xadd(keys.stream, {"j": job_id})
    client.hset(keys.job(job_id), mapping={"env": envelope, "status": "queued", "entry": entry})


def raw(*fields: object) -> bytes:
    return msgspec.msgpack.encode(list(fields))


@pytest.mark.parametrize(
    ("job_id", "envelope"),
    [
        ("deep", b"\x94\xa2ok" + b"\x91" * 100_000 + b"\xc0"),
        ("many-retries", raw("ok", [], {}, 0, 10**18)),
        ("nan-timeout", raw("ok", [], {}, 0, None, float("nan"))),
        ("negative-timeout", raw("ok", [], {}, 0, None, -5.0)),
        ("newline-name", raw("ok\nINFO forged log line", [], {}, 0)),
    ],
    ids=["deep", "many-retries", "nan-timeout", "negative-timeout", "newline-name"],
)
async def test_a_hostile_envelope_is_dead_lettered_and_good_jobs_still_run(
    queue: Queue,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    job_id: str,
    envelope: bytes,
) -> None:
    @queue.task()
    async def ok(ctx: Context) -> str:
        return "fine"

    plant(redis_client, queue, job_id, envelope)
    good = await ok.enqueue()
    with caplog.at_level(logging.INFO):
        async with running(queue.worker()):
            assert await good.result(timeout=10) == "fine"
            await eventually(lambda: redis_client.zscore(Keys(queue.name).dead, job_id) is not None)
    info = await queue.job(job_id).info()
    assert info.status is JobStatus.DEAD
    assert info.reason == "undecodable job"
    assert "forged log line" not in caplog.text.replace("\\n", " ")


async def test_a_job_larger_than_the_limit_is_dead_lettered_without_being_read(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(redis_server.url, name=queue_name, max_payload_bytes=100_000)

    @queue.task()
    async def ok(ctx: Context, data: str = "") -> int:
        return len(data)

    plant(redis_client, queue, "huge", raw("ok", ["x" * 300_000], {}, 0))
    good = await ok.enqueue()
    async with running(queue.worker()):
        assert await good.result(timeout=10) == 0
        await eventually(lambda: redis_client.zscore(Keys(queue.name).dead, "huge") is not None)
    info = await queue.job("huge").info()
    assert info.reason == "payload too large"
    assert info.error is not None
    assert "more than max_payload_bytes (100000)" in info.error.message
    await queue.close()


async def test_an_entry_whose_record_is_missing_is_skipped_with_a_log_line(
    queue: Queue, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    @queue.task()
    async def ok(ctx: Context) -> str:
        return "fine"

    keys = Keys(queue.name)
    redis_client.xadd(keys.stream, {"j": "evicted-job"})
    good = await ok.enqueue()
    with caplog.at_level(logging.WARNING):
        async with running(queue.worker()):
            assert await good.result(timeout=10) == "fine"
            await eventually(lambda: redis_client.xlen(keys.stream) == 0)
    assert "evicted-job, which has no record" in caplog.text


@pytest.mark.parametrize(
    "corruption", ["deliveries-not-a-number", "key-is-a-string", "key-is-a-list"]
)
async def test_a_corrupt_job_record_neither_stops_the_worker_nor_blocks_the_queue(
    queue: Queue, redis_client: redis.Redis, corruption: str
) -> None:
    @queue.task()
    async def ok(ctx: Context) -> str:
        return "fine"

    keys = Keys(queue.name)
    key = keys.job("broken")
    if corruption == "deliveries-not-a-number":
        plant(redis_client, queue, "broken", raw("ok", [], {}, 0))
        redis_client.hset(key, "deliveries", "abc")
    else:
        if corruption == "key-is-a-string":
            redis_client.set(key, "not a hash")
        else:
            redis_client.rpush(key, "not", "a", "hash")
        redis_client.xadd(keys.stream, {"j": "broken"})
    good = [await ok.enqueue() for _ in range(5)]
    async with running(queue.worker()):
        for job in good:
            assert await job.result(timeout=10) == "fine"
        await eventually(lambda: redis_client.xlen(keys.stream) == 0)
    if corruption == "deliveries-not-a-number":
        info = await queue.job("broken").info()
        assert (info.status, info.reason) == (JobStatus.DEAD, "corrupt job record")


@pytest.mark.parametrize("job_id", ["line\nINFO forged", "x" * 100_000], ids=["newline", "100-kb"])
async def test_a_job_id_that_would_forge_or_flood_log_lines_is_dead_lettered_as_foreign(
    queue: Queue, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture, job_id: str
) -> None:
    @queue.task()
    async def ok(ctx: Context) -> str:
        return "fine"

    keys = Keys(queue.name)
    redis_client.xadd(keys.stream, {"j": job_id})
    good = await ok.enqueue()
    with caplog.at_level(logging.INFO):
        async with running(queue.worker()):
            assert await good.result(timeout=10) == "fine"
            await eventually(lambda: redis_client.xlen(keys.stream) == 0)
    assert "INFO forged" not in caplog.text.replace("\\n", " ")
    assert len(caplog.text) < 50_000
    (dead,) = await queue.dead_letters()
    assert dead.id.startswith("foreign-")


@pytest.mark.parametrize("field", ["enqueued", "fire"])
async def test_a_timestamp_outside_the_calendar_is_undecodable_not_a_crash(
    queue: Queue, redis_client: redis.Redis, field: str
) -> None:
    huge = 10**17
    envelope = (
        raw("ok", [], {}, huge)
        if field == "enqueued"
        else raw("ok", [], {}, 0, None, None, None, huge)
    )
    plant(redis_client, queue, "odd-time", envelope)

    @queue.task()
    async def ok(ctx: Context) -> str:
        return "fine"

    async with running(queue.worker()):
        await eventually(lambda: redis_client.zscore(Keys(queue.name).dead, "odd-time") is not None)
    assert (await queue.job("odd-time").info()).reason == "undecodable job"


async def test_a_queue_key_of_the_wrong_type_does_not_stop_the_worker(
    queue: Queue, redis_client: redis.Redis
) -> None:
    @queue.task()
    async def ok(ctx: Context) -> str:
        return "fine"

    redis_client.set(Keys(queue.name).delayed, "not a sorted set")
    async with running(queue.worker()):
        assert await (await ok.enqueue()).result(timeout=10) == "fine"
