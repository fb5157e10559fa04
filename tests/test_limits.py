"""Rate and concurrency limits: on both brokers through a real worker, then across worker
processes on the real redis-server, with a worker SIGKILLed while it holds slots."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
import uuid
from typing import Any

import pytest
import redis
from helpers import eventually, running, spawn_worker, worker_env

from aioqueue import ConfigurationError, Context, JobFailed, JobStatus, Queue, Retry
from aioqueue.brokers.redis.keys import Keys
from aioqueue.limits import parse_rate
from aioqueue.task import JobRequest

pytestmark = pytest.mark.timeout(90)


def test_rates_parse_to_intervals_never_shorter_than_the_rate() -> None:
    assert parse_rate("5000/h") == 720_000
    assert parse_rate("20/s") == 50_000
    assert parse_rate("3/10m") == 200_000_000
    assert parse_rate("3/s") == 333_334
    assert parse_rate("100000/s") == 10
    for bad in ("", "5000", "0/s", "5/week", "-1/s", "1.5/s", "20/0s", "1/00m"):
        with pytest.raises(ConfigurationError, match="rate_limit"):
            parse_rate(bad)


def test_bad_limit_options_are_refused() -> None:
    queue = Queue("memory://limits-bad", name="bad")
    cases: list[dict[str, Any]] = [
        {"rate_limit": "x"},
        {"rate_limit_key": lambda: "k"},
        {"concurrency_key": lambda: "k"},
        {"concurrency_limit": 0},
        {"concurrency_limit": True},
        {"rate_limit": "1/s", "rate_burst": 0},
        {"rate_limit": "1/s", "rate_limit_key": "not callable"},
        {"rate_burst": 5},
    ]
    for options in cases:
        with pytest.raises(ConfigurationError):

            @queue.task(name=f"t{uuid.uuid4().hex}", **options)
            async def task(ctx: Context) -> None: ...


async def test_a_key_function_that_returns_no_text_fails_the_enqueue_only() -> None:
    queue = Queue(f"memory://{uuid.uuid4().hex}", name="keys")

    @queue.task(rate_limit="10/s", rate_limit_key=lambda customer: customer)
    async def call(ctx: Context, customer: Any) -> None: ...

    async with queue:
        with pytest.raises(ConfigurationError, match="rate_limit_key"):
            await call.enqueue(42)
        with pytest.raises(ConfigurationError, match="rate_limit_key"):
            await call.enqueue("bad\nkey")
        await call.enqueue("acme")
        assert (await queue.counts()).ready == 1


async def test_a_rate_limited_job_waits_without_using_an_attempt(storage_url: str) -> None:
    queue = Queue(storage_url, name=f"rl-{uuid.uuid4().hex[:10]}", result_ttl=300)
    starts: list[float] = []

    @queue.task(retries=0, rate_limit="10/s")
    async def tick(ctx: Context, n: int) -> int:
        starts.append(time.monotonic())
        return ctx.attempt

    async with queue:
        jobs = await tick.map([(n,) for n in range(12)])
        async with running(queue.worker(concurrency=20)):
            attempts = [await job.result(timeout=20) for job in jobs]
        events = [event async for event in jobs[-1].events()]
    assert attempts == [1] * 12
    deferred = [event for event in events if event.kind == "deferred"]
    assert deferred
    assert deferred[0].reason == "rate"
    assert deferred[0].run_at is not None
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # One start per 100 ms: 12 starts take at least 1.1 s (a little scheduling slack).
    assert starts[-1] - starts[0] >= 1.0
    assert min(gaps) >= 0.05


async def test_keyed_rate_limits_are_separate_per_key(storage_url: str) -> None:
    queue = Queue(storage_url, name=f"rl-{uuid.uuid4().hex[:10]}", result_ttl=300)
    starts: dict[str, list[float]] = {"a": [], "b": []}

    @queue.task(retries=0, rate_limit="2/s", rate_limit_key=lambda who, n: who)
    async def call(ctx: Context, who: str, n: int) -> None:
        starts[who].append(time.monotonic())

    async with queue:
        jobs = [await call.enqueue(who, n) for n in range(3) for who in ("a", "b")]
        async with running(queue.worker(concurrency=10)):
            for job in jobs:
                await job.result(timeout=20)
    for who in ("a", "b"):
        # 3 starts at 2/s take about 1 s per key; both keys ran side by side.
        assert starts[who][-1] - starts[who][0] >= 0.9
    assert abs(starts["a"][0] - starts["b"][0]) < 0.4


async def test_a_concurrency_limit_holds_and_frees_slots_on_every_outcome(
    storage_url: str,
) -> None:
    queue = Queue(storage_url, name=f"cl-{uuid.uuid4().hex[:10]}", result_ttl=300)
    running_now = 0
    peak = 0
    failures: dict[int, int] = {}

    @queue.task(retries=2, concurrency_limit=3)
    async def work(ctx: Context, n: int) -> int:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        try:
            await asyncio.sleep(0.02)
            if n % 5 == 0 and failures.get(n, 0) == 0:
                failures[n] = 1
                raise Retry(delay=0.01)
            if n % 7 == 0:
                raise ValueError("fails for good")
            return n
        finally:
            running_now -= 1

    async with queue:
        jobs = await work.map([(n,) for n in range(1, 41)])
        async with running(queue.worker(concurrency=20)):
            for job in jobs:
                with contextlib.suppress(JobFailed):
                    await job.result(timeout=30)
        statuses = [await job.status() for job in jobs]
    assert peak == 3
    assert statuses.count(JobStatus.COMPLETE) == 40 - len([n for n in range(1, 41) if n % 7 == 0])


def _spans(client: redis.Redis, name: str) -> list[tuple[float, float]]:
    rows = [row.decode().split() for row in client.lrange(f"spans:{name}", 0, -1)]
    return [(float(start), float(end)) for start, end, _ in rows]


def _peak(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


async def test_rate_limit_20_per_second_holds_across_three_worker_processes(
    redis_server: Any, redis_client: redis.Redis
) -> None:
    name = f"rl-{uuid.uuid4().hex[:10]}"
    env = worker_env(redis_server.url, name, lease=5)
    queue = Queue(redis_server.url, name=name, result_ttl=300)
    procs = [spawn_worker("limits_app:worker", env) for _ in range(3)]
    try:
        async with queue:
            jobs = await queue.enqueue_many([JobRequest("paced", (n,), {}) for n in range(200)])
            began = time.monotonic()
            for job in jobs:
                await job.result(timeout=40)
            elapsed = time.monotonic() - began
            records = [await job.info() for job in jobs]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
    assert all(r.status == JobStatus.COMPLETE for r in records)
    assert all(r.attempt == 1 for r in records)
    started = sorted(int(r.started_at.timestamp() * 1000) for r in records if r.started_at)
    assert len(started) == 200
    # No 1-second window holds more than 20 starts (Redis's clock, as begin recorded it).
    for i, first in enumerate(started):
        in_window = sum(1 for t in started[i:] if t < first + 1000)
        assert in_window <= 20, (i, in_window)
    # About 10 s: each start waits for the one before, plus the few ms it takes a held-back
    # job to come back from the delayed set (see docs/flow-control.md).
    assert 9.0 <= elapsed <= 13.5, elapsed
    keys = Keys(name)
    assert redis_client.zcard(keys.dead) == 0


async def test_concurrency_slots_are_not_leaked_by_a_killed_worker(
    redis_server: Any, redis_client: redis.Redis
) -> None:
    name = f"cl-{uuid.uuid4().hex[:10]}"
    env = worker_env(redis_server.url, name, lease=2)
    queue = Queue(redis_server.url, name=name, result_ttl=300)
    procs = [spawn_worker("limits_app:worker", env) for _ in range(3)]
    try:
        async with queue:
            jobs = await queue.enqueue_many([JobRequest("capped", (0.3,), {}) for _ in range(100)])
            slots = f"{Keys(name).prefix}:conc:capped"
            # Kill a worker while it holds slots.
            await eventually(lambda: redis_client.zcard(slots) == 5, timeout=20)
            holders = {m.decode() for m in redis_client.zrange(slots, 0, -1)}
            victim = None
            for proc in procs:
                for job_id in holders:
                    info = redis_client.hget(Keys(name).job(job_id), "worker")
                    if info is not None and f"-{proc.pid}-" in info.decode():
                        victim = proc
            assert victim is not None
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(timeout=10)
            for job in jobs:
                await job.result(timeout=60)
            statuses = [await job.status() for job in jobs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
    assert statuses == [JobStatus.COMPLETE] * 100
    spans = _spans(redis_client, name)
    # Runs cut short by the kill recorded no span: every recorded run held one of 5 slots.
    assert _peak(spans) == 5
    assert redis_client.zcard(slots) == 0
