"""Helpers shared by the tests: wait for a condition, run a worker, spawn a worker process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aioqueue import Worker

ROOT = Path(__file__).resolve().parent.parent


async def eventually(
    condition: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Wait until ``condition()`` is true, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def blocked_readers(url: str) -> int:
    """How many clients of the Redis at ``url`` are blocked in XREADGROUP now."""
    import redis

    with redis.Redis.from_url(url) as client:
        return sum(
            1 for c in client.client_list() if c.get("cmd") == "xreadgroup" and "b" in c["flags"]
        )


@contextlib.asynccontextmanager
async def running(worker: Worker, stop_timeout: float = 30.0) -> AsyncIterator[Worker]:
    """Run a worker in this event loop for the duration of the block."""
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await eventually(lambda: worker.started_at is not None or task.done(), timeout=10)
        if task.done():
            task.result()
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, stop_timeout)


def spawn_worker(
    target: str, env: dict[str, str] | None = None, *args: str
) -> subprocess.Popen[bytes]:
    """Start ``python -m aioqueue run target`` with tests/apps on the path."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT / "tests" / "apps")}
    return subprocess.Popen(
        [sys.executable, "-m", "aioqueue", "run", target, *args],
        env=full_env,
        cwd=ROOT / "tests" / "apps",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def worker_env(url: str, queue: str, **settings: object) -> dict[str, str]:
    """Environment for a worker subprocess: Redis URL, queue name and other settings."""
    env = {"AIOQUEUE_REDIS_URL": url, "AIOQUEUE_QUEUE": queue}
    env.update({f"AIOQUEUE_{name.upper()}": str(value) for name, value in settings.items()})
    return env


async def wait_exit(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """Wait for a subprocess to exit without blocking the event loop."""
    return await asyncio.to_thread(process.wait, timeout)


def output_of(process: subprocess.Popen[bytes]) -> str:
    """Everything a finished subprocess printed."""
    return process.stdout.read().decode(errors="replace") if process.stdout else ""


def run_cli(
    *args: str, url: str | None = None, queue: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m aioqueue ARGS`` from ``tests/apps`` (or ``cwd``) against a Redis URL
    and queue name given through the environment, as an operator would."""
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    if url is not None:
        env["AIOQUEUE_REDIS_URL"] = url
    if queue is not None:
        env["AIOQUEUE_QUEUE"] = queue
    return subprocess.run(
        [sys.executable, "-m", "aioqueue", *args],
        cwd=cwd or ROOT / "tests" / "apps",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
