"""Waiting for jobs to finish without polling: one pub/sub channel per client process.

The first wait subscribes this process to its own channel and waits for Redis to confirm.
Every wait then asks ``watch.lua`` whether the job is already final and, in the same step,
to publish the job id on this process's channel when it becomes final. Since the
subscription is confirmed before the check, no notification can fall in between; and a
process waiting on ten thousand jobs holds one subscription, not ten thousand. If the
pub/sub connection drops, waiters re-check their job when the wait times out, so a lost
notification costs a re-check, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.client import PubSub

logger = logging.getLogger(__name__)

# How long a waiter trusts the notification path before re-checking the job itself. Only
# matters when a notification was lost to a reconnect; it is not a polling interval.
RECHECK = 5.0


async def pubsub_messages(pubsub: PubSub, what: str) -> AsyncIterator[dict[str, Any]]:
    """Every message a pub/sub connection receives, forever, surviving reconnects (redis-py
    subscribes the channels again when it reconnects)."""
    while True:
        try:
            message = await pubsub.get_message(timeout=RECHECK)
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
            logger.warning("%s lost Redis (%s); reconnecting", what, exc)
            await asyncio.sleep(0.5)
            continue
        if message is not None:
            yield message


class DoneWaiter:
    """Routes "job finished" notifications on this process's channel to waiting coroutines."""

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        self.channel = channel
        self._pubsub = client.pubsub()
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._confirmed: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def wait(
        self, job_id: str, watch: Callable[[], Awaitable[bool]], timeout: float | None
    ) -> None:
        """Return once ``watch()`` reports the job final or its notification arrives.

        ``watch`` must register this process's channel on the job. Raises TimeoutError
        after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.setdefault(job_id, []).append(done)
        try:
            await self._subscribed(deadline)
            while True:
                if await watch():
                    return
                remaining = RECHECK if deadline is None else deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                try:
                    await asyncio.wait_for(asyncio.shield(done), min(remaining, RECHECK))
                    return
                except asyncio.TimeoutError:
                    continue
        finally:
            waiters = self._waiting.get(job_id, [])
            if done in waiters:
                waiters.remove(done)
            if not waiters:
                self._waiting.pop(job_id, None)

    async def _subscribed(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        if self._confirmed is None:
            self._confirmed = loop.create_future()
            await self._pubsub.subscribe(self.channel)
            self._reader = asyncio.create_task(self._read(), name="aioqueue-result-listener")
        timeout = None if deadline is None else max(deadline - loop.time(), 0.001)
        try:
            await asyncio.wait_for(asyncio.shield(self._confirmed), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError from None

    async def _read(self) -> None:
        """The single reader of the pub/sub connection; waiters re-check their jobs while it
        reconnects."""
        async for message in pubsub_messages(self._pubsub, "result listener"):
            if message["type"] == "subscribe":
                if self._confirmed is not None and not self._confirmed.done():
                    self._confirmed.set_result(None)
            elif message["type"] == "message":
                data = message["data"]
                job_id = data.decode() if isinstance(data, bytes) else str(data)
                for done in self._waiting.get(job_id, []):
                    if not done.done():
                        done.set_result(None)

    async def close(self) -> None:
        """Stop the reader and close the pub/sub connection."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        self._confirmed = None
        with contextlib.suppress(rexc.RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
