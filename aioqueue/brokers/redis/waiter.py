"""Waiting for jobs to finish without polling: one pub/sub connection per broker.

A waiter subscribes to the job's done channel, waits for Redis to confirm the subscription,
and only then asks (``watch.lua``) whether the job is already final and to be told when it
becomes so. A notification can therefore never slip in between the check and the wait. If
the pub/sub connection drops, waiters re-check the job's state when it comes back, so a lost
notification costs a re-check, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc

logger = logging.getLogger(__name__)

# How long a waiter trusts the notification path before re-checking the job itself. Only
# matters when a notification was lost to a reconnect; it is not a polling interval.
RECHECK = 5.0


class DoneWaiter:
    """Shares one pub/sub connection among every coroutine waiting for a job to finish."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._pubsub = client.pubsub()
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._done: dict[str, list[asyncio.Future[None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def wait(
        self, channel: str, is_final: Callable[[], Awaitable[bool]], timeout: float | None
    ) -> None:
        """Return once ``is_final()`` holds or a done message arrives; TimeoutError after
        ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        done: asyncio.Future[None] = loop.create_future()
        self._done.setdefault(channel, []).append(done)
        try:
            await self._subscribe(channel, deadline)
            while True:
                if await is_final():
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
            waiters = self._done.get(channel, [])
            if done in waiters:
                waiters.remove(done)
            if not waiters:
                self._done.pop(channel, None)
                await self._unsubscribe(channel)

    async def _subscribe(self, channel: str, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        async with self._lock:
            confirmed = self._subscribed.get(channel)
            if confirmed is None:
                confirmed = loop.create_future()
                self._subscribed[channel] = confirmed
                await self._pubsub.subscribe(channel)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read(), name="aioqueue-result-listener")
        timeout = None if deadline is None else max(deadline - loop.time(), 0.001)
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError from None

    async def _unsubscribe(self, channel: str) -> None:
        async with self._lock:
            self._subscribed.pop(channel, None)
            with contextlib.suppress(rexc.RedisError, OSError):
                await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        """The single reader: routes confirmations and done messages to their waiters."""
        while self._subscribed or self._done:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
                logger.warning("result listener lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                # redis-py re-subscribes every channel on reconnect; waiters re-check state.
                continue
            if message is not None:
                self._route(message)

    def _route(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        if message["type"] == "subscribe":
            confirmed = self._subscribed.get(name)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        elif message["type"] == "message":
            for done in self._done.get(name, []):
                if not done.done():
                    done.set_result(None)

    async def close(self) -> None:
        """Stop the reader and close the pub/sub connection."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        with contextlib.suppress(rexc.RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
