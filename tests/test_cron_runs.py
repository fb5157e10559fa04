"""Cron runs: exactly once per tick across workers, no overlap, no lost tick."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from datetime import timedelta

import pytest
import redis
from conftest import RedisServer
from helpers import eventually, run_cli, running, spawn_worker, wait_exit, worker_env

from aioqueue import ConfigurationError, Context, Queue, cron

pytestmark = pytest.mark.slow


def _ticks(client: redis.Redis, queue_name: str) -> dict[int, int]:
    raw = client.hgetall(f"ticks:{queue_name}")
    return {int(k): int(v) for k, v in raw.items()}


def _assert_each_tick_once(ticks: dict[int, int]) -> None:
    fires = sorted(ticks)
    assert all(count == 1 for count in ticks.values()), ticks
    # Consecutive one-second ticks: none skipped between the first and the last.
    assert [b - a for a, b in itertools.pairwise(fires)] == [1000] * (len(fires) - 1), fires


async def test_three_workers_run_a_one_second_cron_exactly_once_per_tick(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    env = worker_env(redis_server.url, queue_name)
    workers = [spawn_worker("cron_app:worker", env) for _ in range(3)]
    try:
        await eventually(lambda: len(_ticks(redis_client, queue_name)) >= 10, timeout=30)
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            assert await wait_exit(process) == 0
        _assert_each_tick_once(_ticks(redis_client, queue_name))
    finally:
        for process in workers:
            process.kill()


async def test_killing_a_worker_loses_no_tick(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    env = worker_env(redis_server.url, queue_name, lease=1)
    first = spawn_worker("cron_app:worker", env)
    second = spawn_worker("cron_app:worker", env)
    try:
        await eventually(lambda: len(_ticks(redis_client, queue_name)) >= 3, timeout=30)
        first.send_signal(signal.SIGKILL)
        await wait_exit(first)
        killed_after = len(_ticks(redis_client, queue_name))
        await eventually(
            lambda: len(_ticks(redis_client, queue_name)) >= killed_after + 4, timeout=30
        )
        second.send_signal(signal.SIGTERM)
        assert await wait_exit(second) == 0
        ticks = _ticks(redis_client, queue_name)
        # A tick whose run was in flight on the killed worker runs again once its lease
        # expires (at-least-once after a crash), and none was enqueued twice. The job is
        # unique, and a crash looks like a stall until the lease (1 s) has passed: a tick due
        # meanwhile is skipped, as it would be beside a stalled run. Every other tick ran.
        fires = sorted(ticks)
        gaps = [b - a for a, b in itertools.pairwise(fires)]
        assert len([gap for gap in gaps if gap != 1000]) <= 1, fires
        assert max(gaps) <= 3000, fires
        assert sum(ticks.values()) <= len(ticks) + 1
    finally:
        first.kill()
        second.kill()


async def test_unique_cron_job_never_overlaps_itself(queue: Queue) -> None:
    release = asyncio.Event()
    active = 0
    peak = 0
    fires: list[float] = []

    @queue.cron(timedelta(seconds=1))
    async def slow(ctx: Context) -> None:
        nonlocal active, peak
        assert ctx.fire_time is not None
        fires.append(ctx.fire_time.timestamp())
        active += 1
        peak = max(peak, active)
        await release.wait()
        active -= 1

    async def claimed_two_more_ticks() -> bool:
        runs = await (await queue.connected_broker()).cron_runs(["slow"])
        last = runs["slow"].fire_ms
        return last is not None and last >= fires[0] * 1000 + 2000

    async with running(queue.worker(shutdown_grace=5)):
        await eventually(lambda: len(fires) == 1, timeout=10)
        # Two more ticks are claimed while the first run holds on: both are skipped.
        await eventually(claimed_two_more_ticks, timeout=10)
        assert len(fires) == 1
        release.set()
        await eventually(lambda: len(fires) == 2, timeout=10)
    assert peak == 1
    assert fires[1] - fires[0] >= 3


async def test_cron_jobs_can_be_given_to_the_worker(queue: Queue) -> None:
    fire_times: list[float] = []

    async def beat(ctx: Context, label: str) -> None:
        assert ctx.fire_time is not None
        fire_times.append(ctx.fire_time.timestamp())
        assert label == "hb"

    job = cron(timedelta(seconds=1), beat, args=("hb",))
    started = time.time()
    async with running(queue.worker(cron_jobs=[job])):
        await eventually(lambda: len(fire_times) >= 2, timeout=10)
    assert all(t == int(t) for t in fire_times)
    assert fire_times[0] > started
    assert "beat" in queue.tasks


def test_invalid_cron_expression_names_the_job(queue: Queue) -> None:
    with pytest.raises(ConfigurationError, match="cron job 'broken'"):

        @queue.cron("*/61 * * * *")
        async def broken(ctx: Context) -> None:
            return None


def test_cron_list_shows_schedule_next_fires_and_last_outcome(
    redis_server: RedisServer, queue_name: str
) -> None:
    result = run_cli("cron", "list", "cron_app:worker", url=redis_server.url, queue=queue_name)
    assert result.returncode == 0, result.stderr
    assert "tick" in result.stdout
    assert "every 1s" in result.stdout
    assert "never run" in result.stdout
