"""One worker consuming several queues, in strict or weighted order, on both brokers (the
``storage_url`` fixture), through the public API."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from helpers import blocked_readers, eventually, run_cli, running

from aioqueue import ConfigurationError, Context, Queue

pytestmark = pytest.mark.timeout(90)


class Three:
    """Queues high, default and low of one app, each with a task recording its starts."""

    def __init__(self, url: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.started: list[str] = []
        self.queues = {
            level: Queue(url, name=f"{level}-{tag}", result_ttl=300)
            for level in ("high", "default", "low")
        }
        for level, queue in self.queues.items():
            self._register(level, queue)

    def _register(self, level: str, queue: Queue) -> None:
        @queue.task(name="work", retries=0)
        async def work(ctx: Context, n: int) -> int:
            self.started.append(level)
            await asyncio.sleep(0)
            return n

    async def fill(self, counts: dict[str, int]) -> None:
        for level, n in counts.items():
            task = self.queues[level].tasks["work"]
            await self.queues[level].enqueue_many([task.prepare(i) for i in range(n)])

    async def close(self) -> None:
        for queue in self.queues.values():
            await queue.close()


async def test_strict_order_never_starts_a_later_queue_while_an_earlier_has_jobs(
    storage_url: str,
) -> None:
    app = Three(storage_url)
    q = app.queues
    try:
        await app.fill({"low": 300, "default": 400, "high": 300})
        worker = q["high"].worker(concurrency=8, also=[q["default"], q["low"]])
        async with running(worker):
            await eventually(lambda: len(app.started) == 1000, timeout=60)
        assert app.started == ["high"] * 300 + ["default"] * 400 + ["low"] * 300
    finally:
        await app.close()


async def test_urgent_jobs_enqueued_while_running_go_before_the_rest(storage_url: str) -> None:
    app = Three(storage_url)
    q = app.queues
    gate = asyncio.Event()

    @q["high"].task(name="urgent", retries=0)
    async def urgent(ctx: Context, n: int) -> None:
        app.started.append("urgent")

    @q["low"].task(name="slow", retries=0)
    async def slow(ctx: Context, n: int) -> None:
        app.started.append("slow")
        await gate.wait()

    try:
        await q["low"].enqueue_many([slow.prepare(n) for n in range(50)])
        worker = q["high"].worker(concurrency=4, also=[q["default"], q["low"]])
        async with running(worker):
            await eventually(lambda: len(app.started) == 4)
            jobs = await q["high"].enqueue_many([urgent.prepare(n) for n in range(5)])
            gate.set()
            for job in jobs:
                await job.result(timeout=20)
            await eventually(lambda: len(app.started) == 55, timeout=30)
        # Only the slow jobs already running or fetched (at most one batch) went first.
        assert app.started.index("urgent") <= 4 + 4
        assert app.started[app.started.index("urgent") :][:5] == ["urgent"] * 5
    finally:
        await app.close()


async def test_weighted_order_follows_the_weights_without_starving_any_queue(
    storage_url: str,
) -> None:
    app = Three(storage_url)
    q = app.queues
    try:
        await app.fill({"high": 3000, "default": 3000, "low": 3000})
        worker = q["high"].worker(concurrency=8, also=[q["default"], q["low"]], weights=[6, 3, 1])
        async with running(worker):
            await eventually(lambda: len(app.started) >= 3000, timeout=60)
        counts = Counter(app.started[:3000])
        for level, weight in (("high", 6), ("default", 3), ("low", 1)):
            expected = 3000 * weight / 10
            assert abs(counts[level] - expected) <= 0.1 * expected, counts
    finally:
        await app.close()


async def test_an_empty_first_queue_adds_no_latency_to_the_next(storage_url: str) -> None:
    app = Three(storage_url)
    q = app.queues
    try:
        # A long block: a worker that polled its queues one by one would take seconds.
        worker = q["high"].worker(concurrency=4, also=[q["default"], q["low"]], block=5.0)
        before = blocked_readers(storage_url) if storage_url.startswith("redis") else 0
        async with running(worker):
            if storage_url.startswith("redis"):
                # The worker is idle, blocked in one read on all three queues.
                await eventually(lambda: blocked_readers(storage_url) > before)
            sent = time.monotonic()
            job = await q["low"].tasks["work"].enqueue(1)
            assert await job.result(timeout=10) == 1
            assert time.monotonic() - sent < 2.0
    finally:
        await app.close()


async def test_pausing_one_queue_leaves_the_others_running(storage_url: str) -> None:
    app = Three(storage_url)
    q = app.queues
    try:
        await q["high"].pause()
        await app.fill({"high": 5, "low": 5})
        worker = q["high"].worker(concurrency=4, also=[q["default"], q["low"]])
        async with running(worker):
            await eventually(lambda: len(app.started) == 5)
            assert set(app.started) == {"low"}
            await q["high"].resume()
            await eventually(lambda: len(app.started) == 10)
    finally:
        await app.close()


def test_queues_of_one_worker_must_share_a_redis_and_differ() -> None:
    a = Queue("redis://localhost:1/0", name="a")
    b = Queue("redis://localhost:2/0", name="b")
    with pytest.raises(ConfigurationError, match="same Redis"):
        a.worker(also=[b])
    with pytest.raises(ConfigurationError, match="each queue once"):
        a.worker(also=[Queue("redis://localhost:1/0", name="a")])
    with pytest.raises(ConfigurationError, match="list of queues"):
        a.worker(also=b)  # type: ignore[arg-type]
    c = Queue("redis://localhost:1/0", name="c")
    for bad in ([1], [1, 0], [1, True], [2.5, 1]):
        with pytest.raises(ConfigurationError, match="weights"):
            a.worker(also=[c], weights=bad)  # type: ignore[arg-type]


async def test_the_cli_pauses_and_shows_every_queue_of_a_worker(redis_server: Any) -> None:
    url = redis_server.url
    out = await asyncio.to_thread(run_cli, "pause", "multi_app:worker", url=url)
    assert out.returncode == 0, out.stderr
    for level in ("high", "default", "low"):
        assert f"queue 'multi-{level}' paused" in out.stdout
    queues = [Queue(url, name=f"multi-{level}") for level in ("high", "default", "low")]
    try:
        assert all([await q.paused_since() is not None for q in queues])
        info = await asyncio.to_thread(run_cli, "info", "multi_app:worker", "--json", url=url)
        assert info.returncode == 0, info.stderr
        stats = json.loads(info.stdout)
        assert [s["queue"] for s in stats] == [q.name for q in queues]
        assert all(s["paused_at"] is not None for s in stats)
        out = await asyncio.to_thread(run_cli, "resume", "multi_app:worker", url=url)
        assert out.returncode == 0, out.stderr
        assert all([await q.paused_since() is None for q in queues])
    finally:
        for q in queues:
            await q.close()


async def test_each_queue_s_heartbeat_counts_only_its_own_jobs(redis_server: Any) -> None:
    app = Three(redis_server.url)
    q = app.queues
    try:
        await app.fill({"low": 30})
        worker = q["high"].worker(concurrency=4, also=[q["default"], q["low"]], lease=1.5)
        async with running(worker):
            await eventually(lambda: len(app.started) == 30, timeout=30)

            async def beat_counts() -> bool:
                low = await q["low"].stats()
                return sum(w.completed for w in low.workers) == 30

            await eventually(beat_counts, timeout=10)
            high = await q["high"].stats()
            assert [w.completed for w in high.workers] == [0]
            assert high.settled_per_second == 0
    finally:
        await app.close()
