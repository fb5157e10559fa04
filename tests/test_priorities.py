"""Priorities and pause/resume on both brokers (the ``storage_url`` fixture), through the
public API and a real worker; then the Redis side's lanes under faults."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from helpers import blocked_readers, eventually, run_cli, running

from aioqueue import ConfigurationError, Context, JobStatus, Queue
from aioqueue.brokers.base import NewJob
from aioqueue.brokers.redis import RedisBroker
from aioqueue.brokers.redis.keys import Keys

pytestmark = pytest.mark.timeout(60)


def make_queue(url: str) -> tuple[Queue, list[tuple[str, int]]]:
    queue = Queue(url, name=f"prio-{uuid.uuid4().hex[:10]}", result_ttl=300)
    started: list[tuple[str, int]] = []

    @queue.task(retries=0)
    async def record(ctx: Context, label: str, n: int) -> None:
        started.append((label, n))

    @queue.task(retries=0, priority=5)
    async def urgent(ctx: Context, n: int) -> None:
        started.append(("urgent", n))

    return queue, started


async def test_higher_priorities_start_first_and_each_lane_stays_fifo(storage_url: str) -> None:
    queue, started = make_queue(storage_url)
    record = queue.tasks["record"]
    async with queue:
        for n in range(20):
            await record.options(priority=-3).enqueue("bulk", n)
        for n in range(20):
            await record.enqueue("normal", n)
        for n in range(20):
            await record.options(priority=7).enqueue("high", n)
        worker = queue.worker(concurrency=1)
        async with running(worker):
            await eventually(lambda: len(started) == 60, timeout=20)
    labels = [label for label, _ in started]
    assert labels == ["high"] * 20 + ["normal"] * 20 + ["bulk"] * 20
    for label in ("high", "normal", "bulk"):
        assert [n for lab, n in started if lab == label] == list(range(20))


async def test_map_with_options_gives_every_job_the_priority(storage_url: str) -> None:
    queue, started = make_queue(storage_url)
    record = queue.tasks["record"]
    async with queue:
        await record.map([("normal", n) for n in range(3)])
        await record.options(priority=4).map([("high", n) for n in range(3)])
        with pytest.raises(ConfigurationError, match="job_id"):
            await record.options(job_id="one").map([("x", 1), ("y", 2)])
        async with running(queue.worker(concurrency=1)):
            await eventually(lambda: len(started) == 6, timeout=20)
    assert [label for label, _ in started] == ["high"] * 3 + ["normal"] * 3


async def test_a_task_priority_is_the_default_of_its_jobs(storage_url: str) -> None:
    queue, started = make_queue(storage_url)
    async with queue:
        for n in range(5):
            await queue.tasks["record"].enqueue("normal", n)
        await queue.tasks["urgent"].enqueue(0)
        await queue.tasks["urgent"].options(priority=-1).enqueue(1)
        async with running(queue.worker(concurrency=1)):
            await eventually(lambda: len(started) == 7, timeout=20)
    assert started[0] == ("urgent", 0)
    assert started[-1] == ("urgent", 1)


async def test_an_urgent_job_overtakes_a_backlog_while_workers_are_busy(storage_url: str) -> None:
    queue, started = make_queue(storage_url)
    gate = asyncio.Event()

    @queue.task(retries=0)
    async def slow(ctx: Context, n: int) -> None:
        started.append(("slow", n))
        await gate.wait()

    async with queue:
        await queue.enqueue_many([slow.prepare(n) for n in range(200)])
        async with running(queue.worker(concurrency=4)):
            await eventually(lambda: len(started) >= 4)
            urgent = await queue.tasks["urgent"].enqueue(99)
            gate.set()
            await urgent.result(timeout=20)
            # Only what the worker had already fetched can start before it.
            position = started.index(("urgent", 99))
            assert position <= 4 + 4
            await eventually(lambda: len(started) == 201, timeout=30)


async def test_priority_applies_to_delayed_jobs_once_due(storage_url: str) -> None:
    queue, started = make_queue(storage_url)

    @queue.task(retries=0)
    async def paced(ctx: Context, label: str, n: int) -> None:
        started.append((label, n))
        await asyncio.sleep(0.05)

    async with queue:
        await queue.enqueue_many([paced.prepare("normal", n) for n in range(20)])
        await paced.options(priority=3, delay=0.2).enqueue("late-high", 0)
        async with running(queue.worker(concurrency=1)):
            await eventually(lambda: len(started) == 21, timeout=20)
    # 20 jobs of 50 ms take 1 s: the delayed high-priority job, once due (0.2 s), overtook
    # the normal jobs still waiting.
    assert [label for label, _ in started].index("late-high") < 15


async def test_bad_priorities_are_refused(storage_url: str) -> None:
    queue, _ = make_queue(storage_url)
    record = queue.tasks["record"]
    for bad in (10, -10, 1.5, True, "1"):
        with pytest.raises(ConfigurationError, match="priority"):
            record.options(priority=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="priority"):

        @queue.task(priority=42)
        async def nope(ctx: Context) -> None: ...


async def test_mixed_priorities_in_one_bounded_batch_are_all_or_nothing(storage_url: str) -> None:
    base, _ = make_queue(storage_url)
    queue = Queue(storage_url, name=base.name, result_ttl=300, max_size=5)
    queue.tasks.update(base.tasks)
    record = queue.tasks["record"]
    async with queue:
        requests = [record.options(priority=p).prepare("x", p) for p in (1, 0, -1)]
        await queue.enqueue_many(requests)
        from aioqueue import QueueFull

        with pytest.raises(QueueFull):
            await queue.enqueue_many(
                [record.options(priority=p).prepare("y", p) for p in (2, 0, 0)]
            )
        counts = await queue.counts()
        assert counts.ready == 3


async def test_a_paused_queue_accepts_jobs_and_starts_them_only_after_resume(
    storage_url: str,
) -> None:
    queue, started = make_queue(storage_url)
    record = queue.tasks["record"]
    async with queue, running(queue.worker(concurrency=4)):
        await record.enqueue("before", 0)
        await eventually(lambda: len(started) == 1)
        assert await queue.pause() is False
        assert await queue.pause() is True
        paused_at = await queue.paused_since()
        assert paused_at is not None
        jobs = [await record.enqueue("paused", n) for n in range(10)]
        delayed = await record.options(delay=0.1).enqueue("paused-delayed", 0)
        # Give the worker more than a poll period to (wrongly) start something.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert len(started) == 1
            await asyncio.sleep(0.05)
        statuses = [await job.status() for job in jobs]
        assert statuses == [JobStatus.QUEUED] * 10
        assert await queue.resume() is True
        assert await queue.paused_since() is None
        await eventually(lambda: len(started) == 12, timeout=10)
        await delayed.result(timeout=10)
        assert await queue.resume() is False


async def test_pause_holds_entries_a_blocked_read_was_handed(redis_server: object) -> None:
    """A worker blocked in XREADGROUP when the queue is paused gets the next entry handed
    over anyway: begin refuses it (paused), it stays pending and is started after resume,
    exactly once."""
    url = redis_server.url  # type: ignore[attr-defined]
    queue, _ = make_queue(url)
    record = queue.tasks["record"]
    async with queue:
        broker = RedisBroker(url, queue.name, result_ttl=60)
        await broker.connect()
        try:
            await broker.ensure_group()
            before = blocked_readers(url)
            read = asyncio.create_task(broker.fetch("c1", 10, 5.0, 5))
            # fetch.lua found nothing: wait until the read blocks.
            await eventually(lambda: blocked_readers(url) > before)
            await queue.pause()
            job = await record.enqueue("x", 1)
            assert await read == []
            assert await job.status() == JobStatus.QUEUED
            await queue.resume()
            deliveries = await broker.fetch("c1", 10, 1.0, 5)
            assert [d.job_id for d in deliveries] == [job.id]
            assert await job.status() == JobStatus.RUNNING
        finally:
            await broker.close()


async def test_lanes_survive_a_takeover_and_a_release(redis_server: object) -> None:
    """Entries of a priority lane are renewed, taken over after a lost lease and handed
    back at shutdown like those of the default lane."""
    url = redis_server.url  # type: ignore[attr-defined]
    name = f"prio-{uuid.uuid4().hex[:10]}"
    broker = RedisBroker(url, name, result_ttl=60)
    await broker.connect()
    try:
        await broker.ensure_group()
        await broker.enqueue([NewJob("hi", b"env-hi", priority=4), NewJob("lo", b"env-lo")], 0)
        got = await broker.fetch("a", 1, 1.0, 5)
        assert [(d.job_id, d.entry_id.endswith("@4")) for d in got] == [("hi", True)]
        lost, aborted = await broker.renew("a", got)
        assert (lost, aborted) == ([], [])
        taken = await broker.reclaim("b", 10, 0.0, 5)
        assert [d.job_id for d in taken] == ["hi"]
        assert (await broker.renew("a", got))[0] == [got[0].entry_id]
        assert await broker.release("b") == 1
        again = await broker.fetch("c", 2, 1.0, 5)
        assert [d.job_id for d in again] == ["hi", "lo"]
        counts = await broker.counts()
        assert (counts.ready, counts.pending) == (0, 2)
    finally:
        await broker.close()


async def test_the_cli_pauses_and_resumes(redis_server: object) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    name = f"prio-{uuid.uuid4().hex[:10]}"
    out = await asyncio.to_thread(run_cli, "pause", "basic_app:queue", url=url, queue=name)
    assert out.returncode == 0, out.stderr
    assert "paused" in out.stdout
    keys = Keys(name)
    broker = RedisBroker(url, name, result_ttl=60)
    await broker.connect()
    try:
        assert await broker.paused_since() is not None
        assert keys.paused.endswith(":paused")
        info = await asyncio.to_thread(run_cli, "info", "basic_app:queue", url=url, queue=name)
        assert info.returncode == 0, info.stderr
        assert "paused" in info.stdout
        assert "aioqueue resume" in info.stdout
        out = await asyncio.to_thread(run_cli, "resume", "basic_app:queue", url=url, queue=name)
        assert out.returncode == 0, out.stderr
        assert "resumed" in out.stdout
        assert await broker.paused_since() is None
    finally:
        await broker.close()


async def test_the_cli_enqueues_with_a_priority(redis_server: object, redis_client: Any) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    name = f"prio-{uuid.uuid4().hex[:10]}"
    args = ("enqueue", "basic_app:queue", "sleep_then_return", "--args", "[0, 1]")
    out = await asyncio.to_thread(run_cli, *args, "--priority", "5", url=url, queue=name)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert redis_client.hget(Keys(name).job(job_id), "prio") == b"5"
    assert redis_client.xlen(Keys(name).lane(5)) == 1
    bad = await asyncio.to_thread(run_cli, *args, "--priority", "42", url=url, queue=name)
    assert bad.returncode == 2
    assert "priority" in bad.stderr
