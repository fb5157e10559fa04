"""Leases: a dead worker's jobs are taken over; a live worker's long job is never run twice."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
from conftest import RedisServer
from helpers import eventually, output_of, running, spawn_worker, wait_exit, worker_env

from aioqueue import Context, JobStatus, Queue
from aioqueue.brokers.redis.keys import GROUP, Keys

pytestmark = pytest.mark.slow


async def test_job_of_a_killed_worker_is_finished_by_another_within_the_lease(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    job = await queue.enqueue("counted_sleep", 2.0)
    env = worker_env(redis_server.url, queue_name, lease=1.0)
    first = spawn_worker("fault_app:worker", env)
    second = None
    try:
        await eventually(lambda: redis_client.get(f"runs:{job.id}") == b"1", timeout=20)
        first.send_signal(signal.SIGKILL)
        await wait_exit(first)
        killed_at = time.monotonic()
        second = spawn_worker("fault_app:worker", env)
        assert await job.result(timeout=20) == "slept"
        # Takeover needs the lease to expire (1s), a reclaim sweep and the 2s job itself;
        # process start-up is the rest.
        assert time.monotonic() - killed_at < 15
        info = await job.info()
        assert info.deliveries == 2
        assert redis_client.get(f"runs:{job.id}") == b"2"
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
        await queue.close()


async def test_job_running_three_times_longer_than_the_lease_runs_once(
    queue: Queue, redis_client: redis.Redis
) -> None:
    lease = 0.6
    runs = 0
    started = asyncio.Event()
    release = asyncio.Event()

    @queue.task(retries=0)
    async def long_job(ctx: Context) -> str:
        nonlocal runs
        runs += 1
        started.set()
        await release.wait()
        return "done"

    def renewed_for_three_leases(since: float) -> bool:
        pending = redis_client.xpending_range(Keys(queue.name).stream, GROUP, "-", "+", 10)
        # The entry's idle time keeps being reset by the lease renewal.
        assert all(row["time_since_delivered"] < lease * 1000 for row in pending)
        return time.monotonic() - since >= 3 * lease

    job = await long_job.enqueue()
    # Two workers compete for the queue; the job holds on until three leases have passed.
    async with running(queue.worker(lease=lease)), running(queue.worker(lease=lease)):
        await asyncio.wait_for(started.wait(), 10)
        since = time.monotonic()
        await eventually(lambda: renewed_for_three_leases(since), timeout=10)
        release.set()
        assert await job.result(timeout=20) == "done"
    assert runs == 1
    info = await job.info()
    assert info.deliveries == 1
    assert info.status is JobStatus.COMPLETE


async def test_sigterm_after_the_grace_period_hands_the_job_back_at_once(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    job = await queue.enqueue("counted_sleep", 3.0)
    env = worker_env(redis_server.url, queue_name, lease=30, shutdown_grace=0.2)
    first = spawn_worker("fault_app:worker", env)
    second = None
    try:
        await eventually(lambda: redis_client.get(f"runs:{job.id}") == b"1", timeout=20)
        first.send_signal(signal.SIGTERM)
        assert await wait_exit(first) == 0, output_of(first)
        # Handed back as a fresh entry: ready now, not after the 30s lease.
        assert await job.status() is JobStatus.QUEUED
        assert (await queue.counts()).ready == 1
        second = spawn_worker("fault_app:worker", env)
        assert await job.result(timeout=20) == "slept"
        assert (await job.info()).deliveries == 1
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
        await queue.close()


async def test_second_signal_stops_without_waiting_for_the_grace_period(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    job = await queue.enqueue("counted_sleep", 60.0)
    env = worker_env(redis_server.url, queue_name, shutdown_grace=60)
    process = spawn_worker("fault_app:worker", env)
    try:
        await eventually(lambda: redis_client.get(f"runs:{job.id}") == b"1", timeout=20)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGINT)
        assert await wait_exit(process, timeout=15) == 0
        assert await job.status() is JobStatus.QUEUED
    finally:
        process.kill()
        await queue.close()
