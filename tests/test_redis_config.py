"""Workers and health checks refuse a Redis that would lose jobs by configuration."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import RedisServer
from helpers import ROOT, run_cli, running

from aioqueue import ConfigurationError, Context, Queue

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
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AIOQUEUE_REDIS_URL": evicting_redis.url,
        "AIOQUEUE_QUEUE": queue_name,
    }
    done = subprocess.run(
        [sys.executable, "-m", "aioqueue", "run", "basic_app:worker", "--burst"],
        cwd=ROOT / "tests" / "apps",
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
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
