"""Workers and health checks refuse a Redis that would lose jobs by configuration."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import RedisServer
from helpers import eventually, run_cli, running

from aioqueue import (
    ConfigurationError,
    Context,
    EnqueueIncomplete,
    JobRequest,
    Queue,
    RedisUnavailable,
)
from aioqueue.brokers.redis.keys import Keys

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def evicting_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path_factory.mktemp("evicting"),
        extra=("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"),
    )
    server.start()
    yield server
    server.kill()


def test_a_worker_refuses_an_evicting_redis_in_one_line(
    evicting_redis: RedisServer, queue_name: str
) -> None:
    done = run_cli("run", "basic_app:worker", "--burst", url=evicting_redis.url, queue=queue_name)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "maxmemory-policy allkeys-lru" in lines[0]
    assert "noeviction" in lines[0]


async def test_a_worker_starts_on_an_evicting_redis_when_allowed(
    evicting_redis: RedisServer, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = Queue(evicting_redis.url, name=queue_name)

    @queue.task()
    async def ping(ctx: Context) -> str:
        return "pong"

    with caplog.at_level(logging.WARNING):
        async with running(queue.worker(allow_eviction=True)):
            assert await (await ping.enqueue()).result(timeout=10) == "pong"
    assert "starting anyway (allow_eviction)" in caplog.text
    with pytest.raises(ConfigurationError, match="allkeys-lru"):
        await queue.worker().run(handle_signals=False)
    await queue.close()


def test_check_reports_an_evicting_redis_as_unhealthy(
    evicting_redis: RedisServer, queue_name: str
) -> None:
    done = run_cli("check", "basic_app:queue", url=evicting_redis.url, queue=queue_name)
    assert done.returncode == 1
    assert "unhealthy: Redis evicts keys (maxmemory-policy allkeys-lru)" in done.stderr


async def test_a_worker_warns_when_redis_persists_nothing(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with running(queue.worker()):
            pass
    assert "Redis persistence (appendonly) is off" in caplog.text


def test_the_suite_redis_is_not_evicting(redis_server: RedisServer) -> None:
    # The guarantees tests rely on noeviction, the default this check enforces.
    done = run_cli("check", "basic_app:queue", "--min-workers", "0", url=redis_server.url)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, extra=("--maxmemory", "3mb", "--maxmemory-policy", "noeviction"))
    server.start()
    yield server
    server.kill()


async def fill(queue: Queue, task: str) -> list[str]:
    """Enqueue jobs of ~1 KB until Redis refuses for lack of memory; the ids written."""
    written: list[str] = []

    async def until_refused() -> None:
        while True:
            jobs = await queue.enqueue_many(JobRequest(task, ("x" * 1000,), {}) for _ in range(100))
            written.extend(job.id for job in jobs)

    with pytest.raises(RedisUnavailable, match="out of memory"):
        await until_refused()
    return written


async def test_workers_drain_a_redis_that_hit_maxmemory(
    full_redis: RedisServer, queue_name: str
) -> None:
    queue = Queue(full_redis.url, name=queue_name, result_ttl=1)
    ran = 0

    @queue.task()
    async def work(ctx: Context, data: str) -> None:
        nonlocal ran
        ran += 1

    written = await fill(queue, "work")
    assert len(written) > 100
    # A fresh worker creates its group, begins and settles every job although Redis is
    # over maxmemory: those steps free memory (allow-oom scripts).
    async with running(queue.worker(concurrency=50)):
        await eventually(lambda: ran >= len(written), timeout=40)
        await eventually(lambda: _enqueues(queue), timeout=20)
    await queue.close()


async def _enqueues(queue: Queue) -> bool:
    try:
        await queue.enqueue("work", "again")
    except RedisUnavailable:
        return False
    return True


async def test_a_bulk_enqueue_failing_part_way_says_which_jobs_were_written(
    full_redis: RedisServer, queue_name: str
) -> None:
    queue = Queue(full_redis.url, name=queue_name)
    await fill(queue, "work")
    client = redis.Redis(port=full_redis.port)
    # Free a little: some chunks of the next batch fit, the rest do not.
    keys = Keys(queue_name)
    client.delete(*list(client.scan_iter(f"{keys.job_prefix}*", count=1000))[:700])
    with pytest.raises(EnqueueIncomplete) as failure:
        await queue.enqueue_many(JobRequest("work", ("y" * 1000,), {}) for _ in range(2000))
    written, not_written = failure.value.written, failure.value.not_written
    assert written
    assert not_written
    assert len(written) + len(not_written) == 2000
    assert all(client.exists(keys.job(i)) for i in written)
    assert not any(client.exists(keys.job(i)) for i in not_written)
    client.close()
    await queue.close()


def test_a_supervisor_stops_when_its_workers_cannot_start_for_good(
    evicting_redis: RedisServer, queue_name: str
) -> None:
    # Restarting a worker refused for its configuration would only repeat the refusal.
    done = run_cli(
        "run", "basic_app:worker", "--processes", "2", url=evicting_redis.url, queue=queue_name
    )
    assert done.returncode == 2, done.stderr
    assert "maxmemory-policy allkeys-lru" in done.stderr
