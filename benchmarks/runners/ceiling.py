"""W5 ceiling: a bare redis-py asyncio loop doing what a Streams job queue must do at minimum.

Producer: XADD (pipelined). Consumer: XREADGROUP COUNT 100, run each job inline, then one
pipeline per batch with XACK + XDEL + SET (the result, with a TTL) per job. No retries, leases,
heartbeats or concurrency control: an upper bound for any queue built on this client.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from runners import _base

STREAM = "ceiling:stream"
GROUP = "ceiling"
BATCH = 100


async def noop() -> None:
    _base.hit()


TASKS: dict[str, Callable[..., Awaitable[None]]] = {"noop": noop}


def _payload(kind: str, args: tuple[Any, ...] = ()) -> dict[str, bytes]:
    return {"d": json.dumps({"id": uuid.uuid4().hex, "fn": kind, "args": list(args)}).encode()}


class _Producer:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def one(self, kind: str, *args: Any) -> None:
        await self.redis.xadd(STREAM, _payload(kind, args))

    async def many(self, kind: str, n: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for _ in range(n):
                pipe.xadd(STREAM, _payload(kind))
            await pipe.execute()


@asynccontextmanager
async def producer(url: str) -> AsyncIterator[_Producer]:
    redis = Redis.from_url(url)
    try:
        yield _Producer(redis)
    finally:
        await redis.aclose()


async def worker(url: str, concurrency: int, result_ttl: int) -> None:
    redis = Redis.from_url(url)
    try:
        await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    while True:
        resp = await redis.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=BATCH, block=1000)
        if not resp:
            continue
        entries = resp[0][1]
        async with redis.pipeline(transaction=False) as pipe:
            for entry_id, fields in entries:
                job = json.loads(fields[b"d"])
                await TASKS[job["fn"]](*job["args"])
                pipe.xack(STREAM, GROUP, entry_id)
                pipe.xdel(STREAM, entry_id)
                pipe.set(f"ceiling:result:{job['id']}", b"null", ex=result_ttl)
            await pipe.execute()


if __name__ == "__main__":
    _base.main(sys.modules[__name__])
