"""Seeing and operating the system: stats, info/job/enqueue/purge/check commands, metrics,
middleware and trace propagation, embedded mode, multi-process workers."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, free_port
from helpers import ROOT, eventually, run_cli, running, wait_exit

from aioqueue import Context, JobStatus, Queue
from aioqueue.middleware import CallNext


def _cli(
    redis_server: RedisServer, queue_name: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, url=redis_server.url, queue=queue_name)


async def test_stats_count_a_queue_in_a_known_state(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    gate = asyncio.Event()

    @queue.task(retries=0)
    async def hold(ctx: Context) -> None:
        await gate.wait()

    @queue.task(retries=0)
    async def boom(ctx: Context) -> None:
        raise RuntimeError("boom")

    dead = await boom.enqueue()
    async with running(queue.worker(concurrency=1, burst=True)):
        await eventually(lambda: _status(dead, JobStatus.DEAD))
    held = await hold.enqueue()
    async with running(queue.worker(concurrency=1)):
        await eventually(lambda: _status(held, JobStatus.RUNNING))
        for _ in range(3):
            await hold.enqueue()
        for _ in range(2):
            await hold.options(delay=60).enqueue()
        stats = await queue.stats()
        assert (stats.ready, stats.in_flight, stats.delayed, stats.dead) == (3, 1, 2, 1)
        assert stats.lag_seconds is not None
        assert stats.lag_seconds >= 0
        assert len(stats.workers) == 1
        assert stats.workers[0].in_flight in (0, 1)
        listing = _cli(redis_server, queue_name, "info", "basic_app:queue", "--json")
        assert listing.returncode == 0, listing.stderr
        shape = json.loads(listing.stdout)
        assert shape["ready"] == 3
        assert shape["in_flight"] == 1
        assert shape["delayed"] == 2
        assert shape["dead"] == 1
        assert set(shape["workers"][0]) >= {"id", "host", "pid", "concurrency", "in_flight"}
        table = _cli(redis_server, queue_name, "info", "basic_app:queue")
        assert queue_name in table.stdout
        assert stats.workers[0].id in table.stdout
        gate.set()
    await queue.close()


async def _status(job: Any, status: JobStatus) -> bool:
    return await job.status() is status


async def test_check_fails_without_a_live_worker_and_passes_with_one(
    redis_server: RedisServer, queue_name: str
) -> None:
    assert _cli(redis_server, queue_name, "check", "basic_app:queue").returncode == 1
    queue = Queue(redis_server.url, name=queue_name)
    async with running(queue.worker()):
        result = await asyncio.to_thread(_cli, redis_server, queue_name, "check", "basic_app:queue")
        assert result.returncode == 0, result.stderr
        assert "1 live workers" in result.stdout
        import socket

        here = socket.gethostname()
        mine = await asyncio.to_thread(
            _cli, redis_server, queue_name, "check", "basic_app:queue", "--host", here
        )
        assert mine.returncode == 0
        elsewhere = await asyncio.to_thread(
            _cli, redis_server, queue_name, "check", "basic_app:queue", "--host", "other-host"
        )
        assert elsewhere.returncode == 1
    assert _cli(redis_server, queue_name, "check", "basic_app:queue").returncode == 1
    await queue.close()


async def test_enqueue_and_job_commands_round_trip(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(redis_server.url, name=queue_name)

    @queue.task()
    async def sleep_then_return(ctx: Context, seconds: float, value: int) -> int:
        return value

    async with running(queue.worker()):
        done = await asyncio.to_thread(
            _cli,
            redis_server,
            queue_name,
            "enqueue",
            "basic_app:queue",
            "sleep_then_return",
            "--args",
            "[0, 42]",
            "--wait",
            "10",
        )
        assert done.returncode == 0, done.stderr
        job_id, result = done.stdout.split()
        assert result == "42"
        shown = await asyncio.to_thread(
            _cli, redis_server, queue_name, "job", "basic_app:queue", job_id, "--json"
        )
        details = json.loads(shown.stdout)
        assert details["status"] == "complete"
        assert details["result"] == 42
    bad = _cli(redis_server, queue_name, "enqueue", "basic_app:queue", "x", "--args", "[1,")
    assert bad.returncode == 2
    assert "must be JSON" in bad.stderr
    await queue.close()


async def test_purge_removes_everything_of_the_queue(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    await queue.enqueue("sleep_then_return", 0, 1)
    await queue.options(delay=60).enqueue("sleep_then_return", 0, 2)
    refused = _cli(redis_server, queue_name, "purge", "basic_app:queue")
    assert refused.returncode == 1
    done = _cli(redis_server, queue_name, "purge", "basic_app:queue", "--yes")
    assert done.returncode == 0, done.stderr
    counts = await queue.counts()
    assert (counts.ready, counts.delayed) == (0, 0)
    await queue.close()


async def test_metrics_endpoint_counts_jobs_during_a_run(queue: Queue) -> None:
    @queue.task(retries=0)
    async def ok(ctx: Context) -> None:
        return None

    @queue.task(retries=0)
    async def broken(ctx: Context) -> None:
        raise ValueError("no")

    port = free_port()
    async with running(queue.worker(metrics_port=port)):
        assert _listening_on(port) == "127.0.0.1"
        for _ in range(3):
            await (await ok.enqueue()).result(timeout=10)
        failing = await broken.enqueue()
        await eventually(lambda: _status(failing, JobStatus.DEAD))
        # Job names nobody registered (from a producer without the code) share one label.
        producer = Queue(queue.settings.redis_url, name=queue.name)
        for n in range(5):
            made_up = await producer.enqueue(f"made-up-{n}")
            await eventually(lambda job=made_up: _status(job, JobStatus.DEAD))
        await producer.close()

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                return str(page.read().decode())

        text = await asyncio.to_thread(scrape)
    name = queue.name
    assert f'aioqueue_jobs_total{{outcome="complete",queue="{name}",task="ok"}} 3.0' in text
    assert f'aioqueue_jobs_total{{outcome="dead",queue="{name}",task="broken"}} 1.0' in text
    assert "aioqueue_job_duration_seconds_bucket" in text
    assert "aioqueue_queue_lag_seconds" in text
    assert f'aioqueue_jobs_total{{outcome="dead",queue="{name}",task="unregistered"}} 5.0' in text
    assert "made-up" not in text


def _listening_on(port: int) -> str:
    """The address a local TCP socket listens on for ``port`` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
            return ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
    raise AssertionError(f"nothing listens on port {port}")


async def test_middleware_wraps_jobs_and_sees_the_producer_trace(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(
        redis_server.url,
        name=queue_name,
        trace_context=lambda: {"traceparent": "00-abc-def-01"},
    )
    seen: list[tuple[str, str, Any]] = []

    async def outer(ctx: Context, call_next: CallNext) -> Any:
        seen.append(("outer-before", ctx.task_name, ctx.trace))
        try:
            return await call_next()
        finally:
            seen.append(("outer-after", ctx.task_name, None))

    async def inner(ctx: Context, call_next: CallNext) -> Any:
        seen.append(("inner-before", ctx.task_name, None))
        return (await call_next()) * 10

    @queue.task()
    async def two(ctx: Context) -> int:
        return 2

    async with running(queue.worker(middleware=[outer, inner])):
        assert await (await two.enqueue()).result(timeout=10) == 20
    assert seen == [
        ("outer-before", "two", {"traceparent": "00-abc-def-01"}),
        ("inner-before", "two", None),
        ("outer-after", "two", None),
    ]
    await queue.close()


async def test_embedded_worker_runs_inside_an_asgi_lifespan(queue: Queue) -> None:
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    @queue.task()
    async def double(ctx: Context, n: int) -> int:
        return n * 2

    worker = queue.worker(concurrency=5)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with worker.embedded():
            yield

    async def compute(request: Request) -> JSONResponse:
        job = await double.enqueue(int(request.path_params["n"]))
        return JSONResponse({"result": await job.result(timeout=10)})

    app = Starlette(routes=[Route("/double/{n}", compute)], lifespan=lifespan)
    async with app.router.lifespan_context(app):
        assert worker.started_at is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/double/21")
        assert response.json() == {"result": 42}
    assert worker.completed == 1


@pytest.mark.slow
async def test_processes_two_survives_a_sigkill_of_one_child(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "aioqueue", "run", "basic_app:worker", "--processes", "2"],
        cwd=ROOT / "tests" / "apps",
        env={
            "PATH": "/usr/bin:/bin",
            "AIOQUEUE_REDIS_URL": redis_server.url,
            "AIOQUEUE_QUEUE": queue_name,
            "AIOQUEUE_LEASE": "1.5",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def pids() -> set[int]:
            return {w.pid for w in (await queue.stats()).workers}

        await eventually(lambda: _count(pids, 2), timeout=30)
        first = await pids()
        victim = min(first)
        import os

        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: _replaced(pids, first, victim), timeout=30)
        job = await queue.enqueue("sleep_then_return", 0, 7)
        assert await job.result(timeout=20) == 7
        supervisor.send_signal(signal.SIGTERM)
        assert await wait_exit(supervisor, 30) == 0
        await eventually(lambda: _count(pids, 0), timeout=10)
    finally:
        supervisor.kill()
        await queue.close()


async def _count(pids: Any, expected: int) -> bool:
    return len(await pids()) == expected


async def _replaced(pids: Any, before: set[int], victim: int) -> bool:
    now = await pids()
    return len(now) == 2 and victim not in now and bool(now - before)
