"""A job that kills its worker is dead-lettered after max_deliveries, not run forever."""

from __future__ import annotations

import functools
import signal
import subprocess

import pytest
import redis
from conftest import RedisServer
from helpers import eventually, spawn_worker, wait_exit, worker_env

from aioqueue import JobFailed, JobStatus, Queue
from aioqueue.brokers.redis.keys import Keys

pytestmark = pytest.mark.slow


async def test_job_that_kills_its_worker_is_dead_lettered_after_max_deliveries(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(redis_server.url, name=queue_name)
    poison = await queue.enqueue("kill_own_worker")
    healthy = await queue.enqueue("counted_sleep", 0.0)
    # One job at a time, so only the poison job is in flight when its worker dies.
    env = worker_env(redis_server.url, queue_name, lease=0.5, max_deliveries=2, concurrency=1)
    killed = 0
    try:
        # A supervisor's view: restart the worker each time it dies, as systemd would.
        while await poison.status() is not JobStatus.DEAD:
            assert killed <= 2, "poison job was delivered more than max_deliveries times"
            process = spawn_worker("fault_app:worker", env)
            try:
                await eventually(
                    functools.partial(_exited_or_dead, process, redis_client, queue, poison.id),
                    timeout=20,
                )
            finally:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    await wait_exit(process)
                elif process.returncode == -signal.SIGKILL:
                    killed += 1
        assert killed == 2
        assert redis_client.get(f"runs:{poison.id}") == b"2"
        with pytest.raises(JobFailed, match="worker lost 2 times"):
            await poison.result(timeout=1)
        assert (await queue.counts()).dead == 1
        # The rest of the queue was not held hostage.
        process = spawn_worker("fault_app:worker", env)
        try:
            assert await healthy.result(timeout=20) == "slept"
        finally:
            process.kill()
    finally:
        await queue.close()


def _exited_or_dead(
    process: subprocess.Popen[bytes], client: redis.Redis, queue: Queue, job_id: str
) -> bool:
    if process.poll() is not None:
        return True
    return client.hget(Keys(queue.name).job(job_id), "status") == b"dead"
