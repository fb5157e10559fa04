"""Optional job signing: with a signing key, workers run only jobs signed with one of their
keys, and dead-letter the rest as "bad signature"."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest
import redis
from conftest import RedisServer
from helpers import eventually, running

from aioqueue import Context, JobStatus, Queue, cron
from aioqueue.brokers.redis.keys import Keys
from aioqueue.serialization import Signer

pytestmark = pytest.mark.timeout(30)


async def test_signed_jobs_run_and_forged_ones_are_dead_lettered(
    redis_server: RedisServer,
    queue_name: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEY", "new-key,old-key")
    queue = Queue(redis_server.url, name=queue_name)

    @queue.task()
    async def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    good = await add.enqueue(1, 2)
    stored = redis_client.hget(Keys(queue_name).job(good.id), "env")
    assert stored is not None
    assert stored[:1] == b"\xc1"  # signed
    # Signed with the old key (rotation), with no key at all, with a wrong key, and a signed
    # envelope copied under another job id.
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEY", "old-key")
    rotated = await Queue(redis_server.url, name=queue_name).enqueue("add", 2, 3)
    monkeypatch.delenv("AIOQUEUE_SIGNING_KEY")
    unsigned = await Queue(redis_server.url, name=queue_name).enqueue("add", 3, 4)
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEY", "attacker-key")
    forged = await Queue(redis_server.url, name=queue_name).enqueue("add", 4, 5)
    keys = Keys(queue_name)
    entry = redis_client.xadd(keys.stream, {"j": "copied"})
    redis_client.hset(
        keys.job("copied"), mapping={"env": stored, "status": "queued", "entry": entry}
    )
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEY", "new-key,old-key")
    async with running(queue.worker()):
        assert await good.result(timeout=10) == 3
        assert await rotated.result(timeout=10) == 5
        for job_id in (unsigned.id, forged.id, "copied"):
            await eventually(lambda i=job_id: redis_client.zscore(keys.dead, i) is not None)
    for job_id in (unsigned.id, forged.id, "copied"):
        info = await queue.job(job_id).info()
        assert info.status is JobStatus.DEAD
        assert info.reason == "bad signature"
    # Inspection still shows what a signed job holds.
    assert (await good.info()).args == (1, 2)
    await queue.close()


async def test_cron_runs_are_signed(
    redis_server: RedisServer, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEY", "k1")
    queue = Queue(redis_server.url, name=queue_name)
    ran = 0

    async def tick(ctx: Context) -> None:
        nonlocal ran
        ran += 1

    async with running(queue.worker(cron_jobs=[cron(timedelta(seconds=1), tick)])):
        await eventually(lambda: ran >= 1, timeout=10)
    assert await queue.dead_letters() == []
    await queue.close()


def test_a_worker_without_a_key_still_reads_signed_jobs() -> None:
    sealed = Signer("k").seal("job-1", msgspec.msgpack.encode(["t"]))
    assert Signer().open("job-1", sealed) == msgspec.msgpack.encode(["t"])


async def test_signing_keys_given_in_code_bind_queue_and_worker(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(redis_server.url, name=queue_name, signing_key="code-key")

    @queue.task()
    async def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    signed = await add.enqueue(1, 2)
    unsigned = await Queue(redis_server.url, name=queue_name).enqueue("add", 2, 2)
    # A worker given its own key checks with it, not with the queue's.
    worker_only = Queue(redis_server.url, name=queue_name)
    worker_only.task(name="add")(add.func)
    async with running(worker_only.worker(signing_key="code-key")):
        assert await signed.result(timeout=10) == 3
        await eventually(
            lambda: redis_client.zscore(Keys(queue_name).dead, unsigned.id) is not None
        )
    assert (await unsigned.info()).reason == "bad signature"
    await queue.close()
    await worker_only.close()
