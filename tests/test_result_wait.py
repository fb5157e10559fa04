"""Waiting for results: typed timeouts, many waiters, jobs that do not exist, and a result
listener that fails to subscribe or stops on an error."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions as rexc
from conftest import RedisServer
from helpers import eventually, running
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aioqueue import Context, JobNotFound, PermissionDenied, Queue, ResultTimeout
from aioqueue.brokers.redis import waiter
from aioqueue.brokers.redis.waiter import DoneWaiter


async def test_result_times_out_with_a_typed_error_when_no_worker_runs(queue: Queue) -> None:
    @queue.task()
    async def never(ctx: Context) -> None:
        return None

    job = await never.enqueue()
    with pytest.raises(ResultTimeout, match=r"did not finish within 0\.2s"):
        await job.result(timeout=0.2)


async def test_result_of_an_unknown_job_is_job_not_found(queue: Queue) -> None:
    with pytest.raises(JobNotFound):
        await queue.job("no-such-job").result(timeout=1)


async def test_a_thousand_concurrent_waiters_all_get_their_results(queue: Queue) -> None:
    @queue.task()
    async def square(ctx: Context, n: int) -> int:
        await asyncio.sleep(0.01)
        return n * n

    jobs = await square.map([(n,) for n in range(1000)])
    async with running(queue.worker(concurrency=100)):
        results = await asyncio.gather(*(job.result(timeout=30) for job in jobs))
    assert results == [n * n for n in range(1000)]


# -- a result listener that cannot subscribe, or stops -------------------------------------


@pytest.fixture
def no_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters re-check their job only once a minute: a wait can then finish within the
    tests' timeouts through its notification (or an error), never through a re-check."""
    monkeypatch.setattr(waiter, "RECHECK", 60.0)


@pytest.fixture
def acl_user(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis user allowed every command and key but no pub/sub channel; deleted after."""
    name = f"waiter-{uuid.uuid4().hex[:10]}"
    redis_client.acl_setuser(
        name, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"], reset_channels=True
    )
    yield name
    redis_client.acl_deluser(name)


def user_url(redis_server: RedisServer, user: str) -> str:
    return f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0"


def channel_rights(redis_client: redis.Redis, user: str, *, granted: bool) -> None:
    """Give ``user`` every channel, or take them all away (``resetchannels``)."""
    if granted:
        redis_client.acl_setuser(user, enabled=True, channels=["*"])
    else:
        redis_client.acl_setuser(user, enabled=True, reset_channels=True)


def subscribed(port: int, *, user: str | None = None, channel: str | None = None) -> bool:
    """True once a connection (of ``user``, if given) holds a subscription (to ``channel``,
    if given). A fresh connection each time: the server may just have restarted."""
    with redis.Redis(port=port) as client:
        if channel is not None:
            return any(count for _, count in client.pubsub_shardnumsub(channel))
        return any(
            int(entry.get("ssub", 0)) > 0 and user in (None, entry.get("user"))
            for entry in client.client_list()
        )


async def test_a_refused_subscribe_is_an_error_and_the_next_wait_subscribes_again(
    queue: Queue,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    acl_user: str,
    no_recheck: None,
) -> None:
    @queue.task()
    async def double(ctx: Context, n: int) -> int:
        return 2 * n

    job = await double.enqueue(21)
    async with Queue(user_url(redis_server, acl_user), name=queue.name) as waiting:
        handle = waiting.job(job.id, double)
        with pytest.raises(PermissionDenied):
            await asyncio.wait_for(handle.result(timeout=30), 5)

        channel_rights(redis_client, acl_user, granted=True)
        later = asyncio.create_task(handle.result(timeout=30))
        await eventually(lambda: subscribed(redis_server.port, user=acl_user) or later.done())
        assert not later.done()
        async with running(queue.worker()):
            assert await asyncio.wait_for(later, 10) == 42


async def test_a_wait_without_timeout_whose_subscribe_is_refused_raises_instead_of_hanging(
    queue: Queue, redis_server: RedisServer, acl_user: str, no_recheck: None
) -> None:
    @queue.task()
    async def never(ctx: Context) -> None:
        return None

    job = await never.enqueue()
    async with Queue(user_url(redis_server, acl_user), name=queue.name) as waiting:
        for _ in range(2):
            with pytest.raises(PermissionDenied):
                await asyncio.wait_for(waiting.job(job.id).result(), 5)


async def test_revoked_channel_rights_wake_every_waiter_with_the_error(
    queue: Queue,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    acl_user: str,
    no_recheck: None,
) -> None:
    @queue.task()
    async def triple(ctx: Context, n: int) -> int:
        return 3 * n

    jobs = [await triple.enqueue(n) for n in range(3)]
    channel_rights(redis_client, acl_user, granted=True)
    async with Queue(user_url(redis_server, acl_user), name=queue.name) as waiting:
        waits = [
            asyncio.create_task(waiting.job(job.id, triple).result(timeout=30)) for job in jobs
        ]
        await eventually(lambda: subscribed(redis_server.port, user=acl_user))
        # Redis 7 disconnects a subscriber whose user loses the channel; redis-py reconnects
        # and subscribes again, which Redis refuses: the listener stops on NOPERM.
        channel_rights(redis_client, acl_user, granted=False)
        for wait in waits:
            with pytest.raises(PermissionDenied):
                await asyncio.wait_for(wait, 10)

        channel_rights(redis_client, acl_user, granted=True)
        later = [
            asyncio.create_task(waiting.job(job.id, triple).result(timeout=30)) for job in jobs
        ]
        await eventually(
            lambda: subscribed(redis_server.port, user=acl_user) or any(w.done() for w in later)
        )
        assert not any(w.done() for w in later)
        async with running(queue.worker()):
            assert await asyncio.wait_for(asyncio.gather(*later), 10) == [0, 3, 6]


async def test_a_subscribe_that_cannot_reach_redis_fails_and_the_next_wait_subscribes_again(
    tmp_path: Path, no_recheck: None
) -> None:
    server = RedisServer(tmp_path)  # not started yet: nothing listens on its port
    client = aioredis.Redis(port=server.port, retry=Retry(NoBackoff(), 0))
    done_waiter = DoneWaiter(client, f"waiter-test-{uuid.uuid4().hex[:10]}")
    try:
        with pytest.raises(rexc.ConnectionError):
            await asyncio.wait_for(done_waiter.wait("job-1", not_final, None), 5)

        await asyncio.to_thread(server.start)
        wait = asyncio.create_task(done_waiter.wait("job-1", not_final, None))
        await eventually(lambda: subscribed(server.port, channel=done_waiter.channel))
        await client.spublish(done_waiter.channel, "job-1")
        await asyncio.wait_for(wait, 5)
    finally:
        await done_waiter.close()
        await client.aclose()
        server.kill()


async def test_a_waiter_is_notified_across_a_redis_restart(
    tmp_path: Path, no_recheck: None
) -> None:
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    queue = Queue(server.url, name="restart-wait")
    try:

        @queue.task()
        async def echo(ctx: Context, value: int) -> int:
            return value

        job = await echo.enqueue(5)
        wait = asyncio.create_task(job.result(timeout=30))
        await eventually(lambda: subscribed(server.port) or wait.done())
        await asyncio.to_thread(server.restart)
        # redis-py subscribes again on reconnect; the job then finishes and notifies.
        await eventually(lambda: subscribed(server.port) or wait.done(), timeout=20)
        assert not wait.done()
        async with running(queue.worker()):
            assert await asyncio.wait_for(wait, 10) == 5
    finally:
        await queue.close()
        server.kill()


async def test_close_wakes_current_waiters_and_leaves_no_listener(
    redis_server: RedisServer, no_recheck: None
) -> None:
    client = aioredis.Redis(port=redis_server.port)
    done_waiter = DoneWaiter(client, f"waiter-test-{uuid.uuid4().hex[:10]}")
    try:
        wait = asyncio.create_task(done_waiter.wait("job-1", not_final, None))
        await eventually(lambda: subscribed(redis_server.port, channel=done_waiter.channel))
        await done_waiter.close()
        with pytest.raises(RuntimeError, match="closed"):
            await asyncio.wait_for(wait, 5)
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "aioqueue-result-listener"]
        await eventually(lambda: not subscribed(redis_server.port, channel=done_waiter.channel))
    finally:
        await done_waiter.close()
        await client.aclose()


async def not_final() -> bool:
    """A ``watch`` for a job that never finishes by itself."""
    return False


async def test_a_result_wait_rides_out_redis_being_away_within_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover or restart makes the waiter's re-check of the job fail for a while:
    result() waits it out instead of raising RedisUnavailable at the first miss."""
    monkeypatch.setattr(waiter, "RECHECK", 0.2)
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    queue = Queue(server.url, name="away-wait")
    try:

        @queue.task()
        async def echo(ctx: Context, value: int) -> int:
            return value

        job = await echo.enqueue(7)
        wait = asyncio.create_task(job.result(timeout=30))
        await eventually(lambda: subscribed(server.port) or wait.done())
        await asyncio.to_thread(server.kill)
        # Several re-checks fail while nothing listens on the port.
        for _ in range(3):
            await asyncio.sleep(0.3)
            assert not wait.done(), wait.exception() if wait.done() else None
        await asyncio.to_thread(server.start)
        async with running(queue.worker()):
            assert await asyncio.wait_for(wait, 15) == 7
    finally:
        await queue.close()
        server.kill()
