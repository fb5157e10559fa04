"""Progress and the job event stream, on both brokers (and Redis-only faults at the end)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis
from conftest import RedisServer
from faultproxy import FaultProxy
from helpers import eventually, running

from aioqueue import (
    Context,
    InvalidArguments,
    JobEvent,
    JobFailed,
    Queue,
    Retry,
    group,
)
from aioqueue.brokers.base import NewJob
from aioqueue.brokers.redis import RedisBroker
from aioqueue.testing import drain

pytestmark = pytest.mark.timeout(60)

WAIT = 15.0


def new_queue(url: str, events_max_len: int = 10_000) -> Queue:
    queue = Queue(url, name=f"ev-{uuid.uuid4().hex[:10]}")
    queue.settings = msgspec.structs.replace(queue.settings, events_max_len=events_max_len)
    return queue


@pytest.fixture
async def queue(storage_url: str) -> AsyncIterator[Queue]:
    made = new_queue(storage_url)
    yield made
    await made.purge()
    await made.close()


async def collect(queue: Queue, since: str, until: int) -> list[JobEvent]:
    """Events after ``since`` until ``until`` of them arrived."""
    seen: list[JobEvent] = []

    async def read() -> None:
        async for event in queue.events(since=since):
            seen.append(event)
            if len(seen) >= until:
                return

    await asyncio.wait_for(read(), WAIT)
    return seen


async def test_progress_is_stored_and_announced(queue: Queue) -> None:
    reported = asyncio.Event()
    finish = asyncio.Event()

    @queue.task
    async def render(ctx: Context, pages: int) -> int:
        assert await ctx.progress(0.25, "rendered 250 of 1000 pages")
        assert await ctx.progress(0.4, "rendered 400 of 1000 pages")
        reported.set()
        await finish.wait()
        return pages

    async with running(queue.worker()):
        job = await render.enqueue(1000)
        await asyncio.wait_for(reported.wait(), WAIT)
        progress = await job.progress()
        assert progress is not None
        assert (progress.fraction, progress.message) == (0.4, "rendered 400 of 1000 pages")
        assert progress.at is not None
        info = await job.info()
        assert info.progress == progress
        finish.set()
        assert await job.result(timeout=WAIT) == 1000
    kinds = [(e.kind, e.fraction, e.message) async for e in job.events()]
    assert kinds == [
        ("enqueued", None, None),
        ("started", None, None),
        ("progress", 0.25, "rendered 250 of 1000 pages"),
        ("progress", 0.4, "rendered 400 of 1000 pages"),
        ("completed", None, None),
    ]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
async def test_progress_out_of_range_is_a_typed_error(queue: Queue, bad: object) -> None:
    @queue.task(retries=0)
    async def report(ctx: Context) -> None:
        await ctx.progress(bad)  # type: ignore[arg-type]

    job = await report.enqueue()
    await drain(queue)
    with pytest.raises(JobFailed) as caught:
        await job.result(timeout=WAIT)
    assert caught.value.error_type == "aioqueue.errors.InvalidArguments"
    assert issubclass(InvalidArguments, Exception)


async def test_queue_events_cover_every_outcome_in_order_per_job(queue: Queue) -> None:
    gate = asyncio.Event()

    @queue.task(retries=1)
    async def flaky(ctx: Context) -> str:
        if ctx.attempt == 1:
            raise Retry(delay=0.01, reason="first try")
        return "ok"

    @queue.task(retries=0)
    async def broken(ctx: Context) -> None:
        raise ValueError("no")

    @queue.task(retries=0)
    async def held(ctx: Context) -> None:
        await gate.wait()

    tail = await (await queue.connected_broker()).events_tail()
    async with running(queue.worker()):
        ok = await flaky.enqueue()
        bad = await broken.enqueue()
        stopped = await held.options(delay=60).enqueue()
        assert await ok.result(timeout=WAIT) == "ok"
        with pytest.raises(JobFailed):
            await bad.result(timeout=WAIT)
        await stopped.abort()
    events = await collect(queue, tail, 10)
    per_job: dict[str, list[str]] = defaultdict(list)
    for event in events:
        per_job[event.job_id].append(event.kind)
    assert per_job[ok.id] == ["enqueued", "started", "retrying", "started", "completed"]
    assert per_job[bad.id] == ["enqueued", "started", "dead"]
    assert per_job[stopped.id] == ["enqueued", "aborted"]
    retrying = next(e for e in events if e.kind == "retrying")
    assert (retrying.reason, retrying.attempt) == ("first try", 2)
    dead = next(e for e in events if e.kind == "dead")
    assert dead.reason == "retries exhausted after 1 attempt"
    aborted = next(e for e in events if e.kind == "aborted")
    assert aborted.status == "scheduled"
    assert [e.status for e in events if e.kind == "enqueued"] == ["queued", "queued", "scheduled"]


async def test_events_resume_after_a_disconnect_see_each_event_once(storage_url: str) -> None:
    producer = new_queue(storage_url)

    @producer.task
    async def noop(ctx: Context, n: int) -> int:
        return n

    try:
        start = await (await producer.connected_broker()).events_tail()
        first = await producer.enqueue_many([noop.prepare(i) for i in range(10)])
        await drain(producer)
        # A consumer reads part of the events, then loses its connection.
        consumer = Queue(storage_url, name=producer.name)
        seen = await collect(consumer, start, 13)
        await consumer.close()
        second = await producer.enqueue_many([noop.prepare(i) for i in range(10, 15)])
        await drain(producer)
        # It reconnects and resumes after the last event it handled.
        resumed = Queue(storage_url, name=producer.name)
        seen += await collect(resumed, seen[-1].cursor, 10 * 3 + 5 * 3 - 13)
        await resumed.close()
        cursors = [e.cursor for e in seen]
        assert len(cursors) == len(set(cursors)) == 45
        per_job: dict[str, list[str]] = defaultdict(list)
        for event in seen:
            per_job[event.job_id].append(event.kind)
        assert set(per_job) == {job.id for job in [*first, *second]}
        assert all(kinds == ["enqueued", "started", "completed"] for kinds in per_job.values())
    finally:
        await producer.purge()
        await producer.close()


async def test_workflow_events_show_release_and_group_completion(queue: Queue) -> None:
    @queue.task
    async def one(ctx: Context, n: int) -> int:
        return n

    @queue.task
    async def total(ctx: Context, xs: list[int]) -> int:
        return sum(xs)

    job = await group([one.prepare(1), one.prepare(2)]).then(total).enqueue()
    await drain(queue)
    assert await job.result(timeout=WAIT) == 3
    kinds = [(e.kind, e.status) async for e in job.events()]
    assert kinds == [
        ("enqueued", "waiting"),
        ("released", "queued"),
        ("started", None),
        ("completed", None),
    ]


async def test_job_events_of_a_finished_job_end_after_what_is_kept(queue: Queue) -> None:
    @queue.task
    async def one(ctx: Context) -> int:
        return 1

    job = await one.enqueue()
    await drain(queue)
    events = await asyncio.wait_for(_all(job.events()), WAIT)
    assert [e.kind for e in events] == ["enqueued", "started", "completed"]
    missing = await asyncio.wait_for(_all(queue.job("no-such-job").events()), WAIT)
    assert missing == []


async def _all(events: AsyncIterator[JobEvent]) -> list[JobEvent]:
    return [event async for event in events]


async def test_no_events_are_kept_with_a_cap_of_zero(storage_url: str) -> None:
    queue = new_queue(storage_url, events_max_len=0)

    @queue.task
    async def one(ctx: Context) -> int:
        return 1

    try:
        await one.enqueue()
        await drain(queue)
        broker = await queue.connected_broker()
        assert await broker.events("0-0/*", 100, None) == []
    finally:
        await queue.purge()
        await queue.close()


# -- Redis only ------------------------------------------------------------------------------


async def test_the_cap_bounds_the_event_stream(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    queue.settings = msgspec.structs.replace(queue.settings, events_max_len=10)

    @queue.task
    async def one(ctx: Context) -> int:
        return 1

    try:
        for _ in range(300):
            await one.enqueue()
        # XADD MAXLEN ~ trims whole radix-tree nodes (100 entries each by default).
        assert redis_client.xlen(f"aioqueue:{{{queue_name}}}:events") <= 110
    finally:
        await queue.purge()
        await queue.close()


async def test_a_progress_report_repeated_after_a_lost_reply_is_announced_once(
    fault_proxy: FaultProxy, queue_name: str, redis_client: redis.Redis
) -> None:
    broker = RedisBroker(fault_proxy.url, queue_name, result_ttl=60)
    await broker.connect()
    try:
        await broker.ensure_group()
        await broker.enqueue([NewJob("j1", b"x")], 0)
        (delivery,) = await broker.fetch("a", 1, 0.2, 5)
        fault_proxy.lose_reply(broker._scripts["progress"].sha.encode())
        assert await broker.progress("a", delivery, 0.5, "half", 1)
        await eventually(lambda: fault_proxy.fired(broker._scripts["progress"].sha.encode()) == 1)
        events = await broker.events("0-0/*", 100, None)
        assert [e.kind for e in events] == ["enqueued", "started", "progress"]
        # A report from a delivery that no longer runs the job is refused.
        assert not await broker.progress("someone-else", delivery, 0.9, "late", 2)
    finally:
        await broker.close()


async def test_whole_number_progress_is_a_fraction_in_events(queue: Queue) -> None:
    @queue.task
    async def steps(ctx: Context) -> None:
        await ctx.progress(0, "starting")
        await ctx.progress(1, "done")

    cursor = await queue.events_cursor()
    job = await steps.enqueue()
    await drain(queue)
    progress = [e for e in await collect(queue, cursor, 5) if e.kind == "progress"]
    assert [(e.fraction, e.message) for e in progress] == [(0.0, "starting"), (1.0, "done")]
    assert (await job.progress()) is not None
