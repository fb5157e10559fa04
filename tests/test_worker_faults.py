"""The worker under faults that do not kill it: lost replies of the reads that hand entries
over, outcomes refused after a lost lease, Redis away at shutdown or in burst mode, a job
that ignores cancellation; and its bookkeeping (consumers, heartbeats, queue names)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import RedisServer
from faultproxy import FaultProxy
from helpers import eventually, running

import aioqueue.worker
from aioqueue import ConfigurationError, Context, JobRequest, JobStatus, Queue
from aioqueue.brokers.base import Broker
from aioqueue.brokers.redis import RedisBroker
from aioqueue.brokers.redis.keys import GROUP, Keys
from aioqueue.brokers.redis.scripts import source
from aioqueue.errors import RedisUnavailable

pytestmark = pytest.mark.timeout(40)


def patch_broker(queue: Queue, patch: Callable[[RedisBroker], None]) -> None:
    """Give the worker a broker with one method replaced (a fault at the broker boundary)."""
    original = queue.new_broker

    def new_broker(*args: Any, **kwargs: Any) -> Broker:
        broker = original(*args, **kwargs)
        assert isinstance(broker, RedisBroker)
        patch(broker)
        return broker

    queue.new_broker = new_broker  # type: ignore[method-assign]


async def test_a_lost_read_reply_is_taken_up_at_once_not_a_lease_later(
    fault_proxy: FaultProxy, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(fault_proxy.url, name=queue_name)
    runs = 0

    @queue.task()
    async def work(ctx: Context) -> int:
        nonlocal runs
        runs += 1
        return ctx.deliveries

    fault_proxy.lose_reply(b"XREADGROUP")
    async with running(queue.worker(lease=30, block=0.5)):
        job = await work.enqueue()
        # Without adoption the entry would wait for the takeover sweep after 30 s.
        assert await job.result(timeout=10) == 1
    assert fault_proxy.fired(b"XREADGROUP") == 1
    assert runs == 1
    await queue.close()


async def test_an_outcome_refused_after_a_lost_lease_is_not_counted_as_complete(
    queue: Queue, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()
    finish = asyncio.Event()

    @queue.task()
    async def held(ctx: Context) -> str:
        started.set()
        await finish.wait()
        return "late"

    job = await held.enqueue()
    worker = queue.worker(lease=30)
    async with running(worker):
        await asyncio.wait_for(started.wait(), 10)
        # Another worker takes the entry over (as after an expired lease) and begins it.
        keys = Keys(queue.name)
        (pending,) = redis_client.xpending_range(keys.stream, GROUP, "-", "+", 1)
        redis_client.xclaim(keys.stream, GROUP, "other", 0, [pending["message_id"]], justid=True)
        other = RedisBroker(queue.settings.redis_url, queue.name, result_ttl=60)
        await other.connect()
        assert len(await other.reclaim("other", 1, 0, 5)) == 1
        with caplog.at_level(logging.WARNING):
            finish.set()
            await eventually(lambda: worker.in_flight == 0)
        assert worker.completed == 0
        assert "not recorded" in caplog.text
        assert (await job.info()).status is JobStatus.RUNNING
        await other.close()


@pytest.mark.parametrize("name", ["", "with space", "{braces}", "x" * 101])
def test_queue_names_that_would_break_keys_or_channels_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="queue"):
        Queue("redis://localhost:6379/0", name=name)


async def test_a_clean_stop_removes_the_workers_consumer_and_heartbeat(
    queue: Queue, redis_client: redis.Redis
) -> None:
    @queue.task()
    async def noop(ctx: Context) -> None:
        return None

    keys = Keys(queue.name)
    worker = queue.worker()
    async with running(worker):
        await (await noop.enqueue()).result(timeout=10)
        consumers = redis_client.xinfo_consumers(keys.stream, GROUP)
        assert [c["name"] for c in consumers] == [worker.id.encode()]
    assert redis_client.xinfo_consumers(keys.stream, GROUP) == []
    assert redis_client.zscore(keys.workers, worker.id) is None


async def test_heartbeats_remove_workers_that_stopped_long_ago(
    queue: Queue, redis_client: redis.Redis
) -> None:
    keys = Keys(queue.name)
    redis_client.zadd(keys.workers, {"killed-long-ago": 1})
    async with running(queue.worker()):
        await eventually(lambda: redis_client.zscore(keys.workers, "killed-long-ago") is None)


async def test_an_outcome_not_yet_written_at_shutdown_is_not_handed_back(
    queue: Queue, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aioqueue.worker, "SHUTDOWN_WAIT", 0.5)
    runs = 0

    @queue.task()
    async def quick(ctx: Context) -> None:
        nonlocal runs
        runs += 1

    async def unreachable(consumer: str, settlements: Any) -> list[bool]:
        raise RedisUnavailable("Redis unavailable while settling jobs (injected)")

    patch_broker(queue, lambda broker: setattr(broker, "settle", unreachable))
    job = await quick.enqueue()
    worker = queue.worker(shutdown_grace=0.5)
    async with running(worker):
        await eventually(lambda: runs == 1)
    keys = Keys(queue.name)
    # The entry stays with the stopped worker: its outcome is known, handing it back would
    # run the job again. It returns through its lease only if the outcome is never written.
    assert redis_client.xpending(keys.stream, GROUP)["pending"] == 1
    assert (await job.info()).status is JobStatus.RUNNING
    assert runs == 1


async def test_a_job_that_ignores_cancellation_does_not_hang_shutdown(
    queue: Queue, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aioqueue.worker, "SHUTDOWN_WAIT", 0.5)
    started = asyncio.Event()
    allowed_to_end = asyncio.Event()

    @queue.task()
    async def stubborn(ctx: Context) -> None:
        started.set()
        while not allowed_to_end.is_set():
            try:
                await allowed_to_end.wait()
            except asyncio.CancelledError:
                continue

    job = await stubborn.enqueue()
    worker = queue.worker(shutdown_grace=0.1)
    task = asyncio.create_task(worker.run(handle_signals=False))
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    await asyncio.wait_for(task, 10)
    keys = Keys(queue.name)
    # Not handed back: a second copy would start beside the one still running.
    assert redis_client.xlen(keys.stream) == 1
    assert (await job.info()).status is JobStatus.RUNNING
    allowed_to_end.set()


async def test_burst_mode_goes_on_when_counting_fails_once(queue: Queue) -> None:
    failed = False

    @queue.task()
    async def noop(ctx: Context) -> None:
        return None

    def flaky_counts(broker: RedisBroker) -> None:
        real = broker.counts

        async def counts() -> Any:
            nonlocal failed
            if not failed:
                failed = True
                raise RedisUnavailable("Redis unavailable while counting jobs (injected)")
            return await real()

        broker.counts = counts  # type: ignore[method-assign]

    patch_broker(queue, flaky_counts)
    job = await noop.enqueue()
    await asyncio.wait_for(queue.worker(burst=True).run(handle_signals=False), 20)
    assert failed
    assert (await job.info()).status is JobStatus.COMPLETE


async def test_lost_read_replies_never_leave_jobs_behind_at_scale(
    fault_proxy: FaultProxy, redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(fault_proxy.url, name=queue_name)
    starts: dict[int, int] = {}

    @queue.task()
    async def work(ctx: Context, n: int) -> int:
        starts[n] = starts.get(n, 0) + 1
        await asyncio.sleep(0.05)
        return n

    jobs = await queue.enqueue_many(work.prepare(n) for n in range(300))
    # Reads happen in fetch.lua while jobs wait (and XREADGROUP when none do): lose both.
    fetch = hashlib.sha1(source("fetch").encode()).hexdigest().encode()
    fault_proxy.lose_reply(fetch, count=10)
    fault_proxy.lose_reply(b"XREADGROUP", count=2)
    async with running(queue.worker(lease=30, block=0.2, concurrency=40)):
        for job in jobs:
            await job.result(timeout=20)
    assert fault_proxy.fired(fetch) == 10
    assert starts == dict.fromkeys(range(300), 1)
    await queue.close()


async def test_after_an_outage_no_worker_takes_jobs_from_live_workers(
    fault_proxy: FaultProxy, queue_name: str
) -> None:
    # Redis is away for every worker for longer than the lease: every lease looks expired
    # when it returns. The idle worker must not take the busy one's jobs before the busy
    # one has had a chance to renew them.
    busy = Queue(fault_proxy.url, name=queue_name)
    idle = Queue(fault_proxy.url, name=queue_name)
    starts: dict[int, int] = {}
    started = asyncio.Event()

    async def body(ctx: Context, n: int) -> int:
        starts[n] = starts.get(n, 0) + 1
        if len(starts) == 5:
            started.set()
        await asyncio.sleep(4)
        return n

    for queue in (busy, idle):
        queue.task(name="body")(body)
    jobs = await busy.enqueue_many(JobRequest("body", (n,), {}) for n in range(5))
    async with running(busy.worker(lease=1.5, concurrency=5)):
        await asyncio.wait_for(started.wait(), 10)
        async with running(idle.worker(lease=1.5, concurrency=5)):
            fault_proxy.blackhole(2.5)
            for job in jobs:
                await job.result(timeout=30)
    assert starts == dict.fromkeys(range(5), 1)
    for queue in (busy, idle):
        await queue.close()


async def test_shutdown_during_a_partition_is_bounded(
    fault_proxy: FaultProxy, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aioqueue.worker, "SHUTDOWN_WAIT", 1.0)
    queue = Queue(fault_proxy.url, name=queue_name)
    started = asyncio.Event()

    @queue.task()
    async def long(ctx: Context) -> None:
        started.set()
        await asyncio.sleep(60)

    await long.enqueue()
    worker = queue.worker(shutdown_grace=0.2)
    task = asyncio.create_task(worker.run(handle_signals=False))
    await asyncio.wait_for(started.wait(), 10)
    fault_proxy.blackhole(None)  # Redis stops answering, connections stay open
    worker.stop()
    # Hand-back and goodbye each get SHUTDOWN_WAIT; without the bound the client's retries
    # times its socket timeout held the exit for minutes.
    await asyncio.wait_for(task, 15)
    fault_proxy.restore()
    await queue.close()


async def test_every_entry_of_a_lost_takeover_reply_is_taken_up_at_once(
    fault_proxy: FaultProxy, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(fault_proxy.url, name=queue_name)
    keys = Keys(queue_name)
    starts: dict[int, int] = {}

    @queue.task()
    async def work(ctx: Context, n: int) -> int:
        starts[n] = starts.get(n, 0) + 1
        return n

    jobs = await queue.enqueue_many(work.prepare(n) for n in range(40))
    # A worker read all 40 and died: their entries are long idle.
    redis_client.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    ((_, entries),) = redis_client.xreadgroup(GROUP, "dead-worker", {keys.stream: ">"})
    ids = [entry for entry, _ in entries]
    redis_client.xclaim(keys.stream, GROUP, "dead-worker", 0, ids, idle=60_000, justid=True)
    fault_proxy.lose_reply(b"XAUTOCLAIM")
    async with running(queue.worker(lease=30, block=0.5, concurrency=40)):
        for job in jobs:
            await job.result(timeout=10)  # not a lease (30 s) later
    assert starts == dict.fromkeys(range(40), 1)
    await queue.close()


async def test_a_job_aborted_while_it_finishes_is_not_counted_as_complete(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    @queue.task()
    async def finishes_anyway(ctx: Context) -> str:
        started.set()
        # The abort lands while the job is finishing: it still returns a result.
        try:
            await release.wait()
        except asyncio.CancelledError:
            await release.wait()
        return "done"

    job = await finishes_anyway.enqueue()
    worker = queue.worker()
    async with running(worker):
        await asyncio.wait_for(started.wait(), 10)
        await queue.job(job.id).abort()
        release.set()
        await eventually(lambda: worker.in_flight == 0)
    assert worker.completed == 0
    assert (await job.info()).status is JobStatus.ABORTED
