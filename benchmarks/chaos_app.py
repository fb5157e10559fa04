"""The worker app ``chaos.py`` runs, kills, stops and cuts off from Redis.

Every job records each start and each finish of its body in Redis with plain commands, under
keys of its own (never aioqueue's), so ``chaos.py`` can tell how often each body really ran
and in which process: ``chaos:<queue>:starts`` and ``chaos:<queue>:finishes`` are hashes whose
field ``"<job id> <pid>"`` counts the starts / finishes of that job's body in that process.

The bookkeeping goes to ``CHAOS_REDIS_URL``, which ``chaos.py`` points straight at
redis-server even when the worker itself reaches Redis through a fault-injecting proxy: the
counts must stay exact whatever the faults do to aioqueue's own connections.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis

from aioqueue import Context, Queue

# chaos.py sets AIOQUEUE_QUEUE, AIOQUEUE_LEASE, AIOQUEUE_CONCURRENCY, ... per scenario: the
# environment overrides the values given here.
queue = Queue(name="chaos")


async def open_redis(state: dict[str, Any]) -> None:
    url = os.environ.get("CHAOS_REDIS_URL") or queue.settings.redis_url
    state["redis"] = redis.Redis.from_url(url)


async def close_redis(state: dict[str, Any]) -> None:
    state.pop("redis").close()


# No retries: nothing here is meant to fail, so a failure must surface as a dead letter
# (which chaos.py reports) instead of hiding behind a second attempt.
@queue.task(retries=0)
async def work(ctx: Context, seconds: float) -> int:
    """Sleep ``seconds`` (pretend I/O), recording the start and the finish; returns the pid."""
    # Blocking calls on purpose (a local round trip, well under a millisecond): with no await
    # between recording and going on, a recorded start is a body that began and a recorded
    # finish is a body that returned, i.e. an outcome the worker will try to settle. An
    # awaited call could be cancelled (lease lost, shutdown) after Redis had run it.
    client: redis.Redis = ctx.state["redis"]
    prefix = f"chaos:{ctx.queue.name}"
    run = f"{ctx.job_id} {os.getpid()}"
    client.hincrby(f"{prefix}:starts", run, 1)
    await asyncio.sleep(seconds)
    client.hincrby(f"{prefix}:finishes", run, 1)
    return os.getpid()


worker = queue.worker(concurrency=50, on_startup=[open_redis], on_shutdown=[close_redis])
