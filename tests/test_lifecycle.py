"""Starting and stopping workers: burst mode, signals, the CLI's import errors."""

from __future__ import annotations

import asyncio
import signal

import pytest
from conftest import RedisServer
from helpers import eventually, run_cli, spawn_worker

from aioqueue import Context, JobStatus, Queue


async def test_burst_worker_exits_once_the_queue_is_empty(queue: Queue) -> None:
    done: list[int] = []

    @queue.task()
    async def note(ctx: Context, n: int) -> None:
        done.append(n)

    await queue.enqueue_many([note.prepare(i) for i in range(20)])
    await asyncio.wait_for(queue.worker(burst=True).run(handle_signals=False), 20)
    assert sorted(done) == list(range(20))


@pytest.mark.slow
async def test_sigterm_lets_in_flight_jobs_finish_and_exits_zero(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    jobs = [await queue.enqueue("sleep_then_return", 1.5, i) for i in range(5)]
    env = {"AIOQUEUE_REDIS_URL": redis_server.url, "AIOQUEUE_QUEUE": queue_name}
    process = spawn_worker("basic_app:worker", env)
    try:

        async def all_running() -> bool:
            return all([await job.status() is JobStatus.RUNNING for job in jobs])

        await eventually(all_running, timeout=20)
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 30)
        output = process.stdout.read().decode() if process.stdout else ""
        assert returncode == 0, output
        assert [await job.result(timeout=1) for job in jobs] == list(range(5))
    finally:
        process.kill()
        await queue.close()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module:worker", "cannot import module 'no_such_module'"),
        ("basic_app:missing", "has no attribute 'missing'"),
        ("basic_app", "must look like 'module:attribute'"),
        ("basic_app:not_a_worker", "is a int, not a Worker"),
    ],
)
def test_bad_import_path_is_one_clear_line(target: str, message: str) -> None:
    result = run_cli("run", target)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "target",
    ["basic_app:worker", "basic_app:queue", "basic_app:WorkerSettings", "basic_app:make_worker"],
)
def test_cli_runs_a_worker_from_each_supported_object(
    target: str, redis_server: RedisServer, queue_name: str
) -> None:
    result = run_cli(
        "run", target, "--burst", "--log-level", "WARNING", url=redis_server.url, queue=queue_name
    )
    assert result.returncode == 0, result.stderr
