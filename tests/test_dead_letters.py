"""Dead letters can be listed, inspected, requeued and purged, from Python and the CLI."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
import redis
from conftest import RedisServer
from helpers import run_cli, running

from aioqueue import Context, JobFailed, JobStatus, Queue
from aioqueue.brokers.redis.keys import Keys


async def _dead_job(queue: Queue, fixed: list[bool]) -> str:
    @queue.task(retries=0)
    async def fragile(ctx: Context, n: int) -> int:
        if not fixed:
            raise RuntimeError("downstream is down")
        return n * 10

    job = await fragile.enqueue(4)
    await asyncio.wait_for(queue.worker(burst=True).run(handle_signals=False), 30)
    with pytest.raises(JobFailed):
        await job.result(timeout=1)
    return job.id


async def test_requeued_dead_job_runs_again_and_can_succeed(queue: Queue) -> None:
    fixed: list[bool] = []
    job_id = await _dead_job(queue, fixed)
    (dead,) = await queue.dead_letters()
    assert dead.id == job_id
    assert dead.error is not None
    assert dead.error.message == "downstream is down"
    assert "RuntimeError" in dead.error.traceback
    fixed.append(True)
    assert await queue.requeue_dead() == 1
    assert await queue.job(job_id).status() is JobStatus.QUEUED
    async with running(queue.worker()):
        assert await queue.job(job_id).result(timeout=10) == 40
    assert await queue.dead_letters() == []


async def test_purge_deletes_dead_jobs(queue: Queue) -> None:
    job_id = await _dead_job(queue, [])
    assert await queue.purge_dead([job_id]) == 1
    assert await queue.dead_letters() == []
    assert await queue.job(job_id).status() is JobStatus.NOT_FOUND


def _cli(
    redis_server: RedisServer, queue_name: str, *args: str, command: str = "dlq"
) -> subprocess.CompletedProcess[str]:
    prefix = [] if command == "run" else ["dlq"]
    return run_cli(*prefix, *args, url=redis_server.url, queue=queue_name)


@pytest.mark.slow
async def test_dlq_commands_list_show_requeue_and_purge(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    first = await queue.enqueue("fails", "first failure")
    second = await queue.enqueue("fails", "second failure")
    burst = _cli(redis_server, queue_name, "run", "fault_app:worker", "--burst", command="run")
    assert burst.returncode == 0, burst.stderr
    listing = _cli(redis_server, queue_name, "list", "fault_app:queue")
    assert listing.returncode == 0, listing.stderr
    assert first.id in listing.stdout
    assert second.id in listing.stdout
    assert "first failure" in listing.stdout
    shown = _cli(redis_server, queue_name, "show", "fault_app:queue", first.id)
    assert "RuntimeError: first failure" in shown.stdout
    assert "Traceback" in shown.stdout
    requeued = _cli(redis_server, queue_name, "requeue", "fault_app:queue", first.id)
    assert requeued.stdout.strip() == "requeued 1 job"
    assert await first.status() is JobStatus.QUEUED
    refused = _cli(redis_server, queue_name, "purge", "fault_app:queue")
    assert refused.returncode == 1
    purged = _cli(redis_server, queue_name, "purge", "fault_app:queue", "--yes")
    assert purged.stdout.strip() == "purged 1 job"
    assert await second.status() is JobStatus.NOT_FOUND
    await queue.close()


async def test_requeue_leaves_dead_letters_that_hold_no_job_in_the_list(
    queue: Queue, redis_client: redis.Redis
) -> None:
    # A foreign stream entry's dead letter has no envelope: there is nothing to run again.
    keys = Keys(queue.name)
    redis_client.hset(keys.job("foreign-1-0"), mapping={"status": "dead", "reason": "foreign"})
    redis_client.zadd(keys.dead, {"foreign-1-0": 1})
    assert await queue.requeue_dead(["foreign-1-0"]) == 0
    assert [job.id for job in await queue.dead_letters()] == ["foreign-1-0"]
