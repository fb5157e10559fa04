"""A 10,000-member group with a fan-in callback, run by three worker processes while one of
them is SIGKILLed every 2 s: the callback runs exactly once, with all 10,000 results in
order."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess

import pytest
import redis
from conftest import RedisServer
from helpers import spawn_worker, worker_env

from aioqueue import Context, Queue, group

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MEMBERS = 10_000


async def test_callback_runs_once_with_every_result_while_workers_are_killed(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    queue = Queue(redis_server.url, name=queue_name)

    # The producer's view of fault_app's tasks: same names and signatures.
    @queue.task(retries=0)
    async def member(ctx: Context, i: int) -> int:
        raise NotImplementedError

    @queue.task(retries=0)
    async def gather(ctx: Context, results: list[int]) -> int:
        raise NotImplementedError

    callback = await group(member.prepare(i) for i in range(MEMBERS)).then(gather).enqueue()
    env = worker_env(
        redis_server.url,
        queue_name,
        lease=2,
        max_deliveries=1000,
        concurrency=20,
        log_level="WARNING",
    )
    workers: list[subprocess.Popen[bytes]] = [
        spawn_worker("fault_app:worker", env) for _ in range(3)
    ]
    kills = 0
    try:
        for turn in itertools.count():
            try:
                result = await callback.result(timeout=2)
                break
            except TimeoutError:
                pass
            victim = workers[turn % 3]
            victim.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.wait, 10)
            kills += 1
            workers[turn % 3] = spawn_worker("fault_app:worker", env)
        assert result == MEMBERS
        assert kills >= 2
        assert redis_client.get(f"gather-runs:{callback.id}") == b"1"
        assert redis_client.get(f"gather-in-order:{callback.id}") == b"1"
    finally:
        for process in workers:
            process.kill()
            process.wait()
        await queue.purge()
        await queue.close()
