"""Waiting for jobs to finish without polling: one pub/sub channel per client process.

The first wait subscribes this process to its own channel and waits for Redis to confirm.
Every wait then asks ``watch.lua`` whether the job is already final and, in the same step,
to publish the job id on this process's channel when it becomes final. Since the
subscription is confirmed before the check, no notification can fall in between; and a
process waiting on ten thousand jobs holds one subscription, not ten thousand. If the
pub/sub connection drops, waiters re-check their job when the wait times out, so a lost
notification costs a re-check, never a hang.

A subscription that fails (Redis unreachable, or ``NOPERM`` for a user without rights on
the channel) or a reader that stops on any other error ends that subscription: every
current waiter gets the error, and the next wait subscribes afresh on a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub

logger = logging.getLogger(__name__)

# How long a waiter trusts the notification path before re-checking the job itself. Only
# matters when a notification was lost to a reconnect; it is not a polling interval.
RECHECK = 5.0


async def shard_messages(
    client: aioredis.Redis, channel: str, what: str
) -> AsyncGenerator[dict[str, Any], None]:
    """Subscribe to the sharded channel ``channel`` (``SSUBSCRIBE``: in a cluster only the
    node of its slot carries it) and yield every message, the confirmation first, forever.

    The first subscription's errors are raised. After that it survives reconnects (redis-py
    subscribes again), a failover and the channel's slot moving to another node (a MOVED
    reply, or the node dropping the subscription): it subscribes afresh where the slot is
    now. An outage is logged once, when it starts, and once more when it is over."""
    first = client.pubsub()
    try:
        await first.ssubscribe(channel)
    except BaseException:
        await _close(first)
        raise
    pubsub: PubSub | None = first
    failures = 0
    try:
        while True:
            try:
                if pubsub is None:
                    pubsub = client.pubsub()
                    await pubsub.ssubscribe(channel)
                if isinstance(pubsub, ClusterPubSub):
                    message = await pubsub.get_sharded_message(timeout=RECHECK)
                else:
                    message = await pubsub.get_message(timeout=RECHECK)
            except (
                rexc.ConnectionError,
                rexc.TimeoutError,
                OSError,
                rexc.AskError,
                rexc.ClusterError,
                rexc.RedisClusterException,
                AttributeError,
            ) as exc:
                if isinstance(exc, AttributeError) and not raised_in_redis_py(exc):
                    raise
                failures += 1
                if failures == 1:
                    logger.warning("%s lost Redis (%s); reconnecting", what, exc)
                if not isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError)):
                    # The slot moved: subscribe again on the node that has it now.
                    await _close(pubsub)
                    pubsub = None
                await asyncio.sleep(0.5)
                continue
            if failures:
                logger.info("%s reconnected after %d attempts", what, failures)
                failures = 0
            if message is None:
                continue
            if message["type"] == "sunsubscribe":
                # Never asked for: the node gave the channel's slot away.
                await _close(pubsub)
                pubsub = None
                continue
            yield message
    finally:
        await _close(pubsub)


def raised_in_redis_py(exc: BaseException) -> bool:
    """True if ``exc`` was raised inside redis-py (a connection torn down under a read, seen
    in its cluster pub/sub during a failover)."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and f"{os.sep}redis{os.sep}" in last.tb_frame.f_code.co_filename


async def _close(pubsub: PubSub | None) -> None:
    if pubsub is not None:
        with contextlib.suppress(rexc.RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]


class DoneWaiter:
    """Routes "job finished" notifications on this process's channel to waiting coroutines.

    One subscription at a time: a reader task that subscribes, confirms and then routes
    messages. When it stops (an error, or :meth:`close`) it wakes every current waiter with
    the reason and forgets itself, so the next wait starts a new one.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        channel: str,
        translate: Callable[[Exception], Exception] | None = None,
    ) -> None:
        self.channel = channel
        self._client = client
        # Turns the error that stopped a subscription into the one waiters get (a refused
        # SUBSCRIBE into aioqueue's PermissionDenied).
        self._translate = translate
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        # The current subscription: its reader task and the future it resolves once Redis
        # confirms the SUBSCRIBE. Both None when there is none (not started yet, or stopped).
        self._confirmed: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def wait(
        self, job_id: str, watch: Callable[[], Awaitable[bool]], timeout: float | None
    ) -> None:
        """Return once ``watch()`` reports the job final or its notification arrives.

        ``watch`` must register this process's channel on the job. Raises TimeoutError
        after ``timeout`` seconds, and the subscription's error if it fails or stops.
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
            if done.done() and not done.cancelled():
                done.exception()  # woken with an error after this wait ended: seen, not logged

    async def _subscribed(self, deadline: float | None) -> None:
        """Start a subscription unless one is running; wait until Redis confirms it."""
        loop = asyncio.get_running_loop()
        confirmed = self._confirmed
        if confirmed is None:
            confirmed = loop.create_future()
            self._confirmed = confirmed
            self._reader = asyncio.create_task(
                self._read(confirmed), name="aioqueue-result-listener"
            )
        if confirmed.done():
            return
        timeout = None if deadline is None else max(deadline - loop.time(), 0.001)
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError from None

    async def _read(self, confirmed: asyncio.Future[None]) -> None:
        """The single reader of one pub/sub connection: subscribe, confirm, route messages.

        Connection drops and moves are survived inside ``shard_messages`` (waiters re-check
        their jobs meanwhile). Anything else ends this subscription and wakes every waiter.
        """
        error: BaseException = RuntimeError("the result listener stopped")
        messages = shard_messages(self._client, self.channel, "result listener")
        try:
            async for message in messages:
                if message["type"] == "ssubscribe":
                    if not confirmed.done():
                        confirmed.set_result(None)
                elif message["type"] == "smessage":
                    data = message["data"]
                    job_id = data.decode() if isinstance(data, bytes) else str(data)
                    for done in self._waiting.get(job_id, []):
                        if not done.done():
                            done.set_result(None)
        except asyncio.CancelledError:
            error = RuntimeError("the result listener was closed")
            raise
        except Exception as exc:
            logger.warning(
                "result listener failed (%s: %s); the next wait subscribes again",
                type(exc).__name__,
                exc,
            )
            error = self._translate(exc) if self._translate is not None else exc
        finally:
            # Wake the waiters before the await below, so that no new wait joins a
            # subscription that is already over.
            self._stopped(confirmed, error)
            await messages.aclose()

    def _stopped(self, confirmed: asyncio.Future[None], error: BaseException) -> None:
        """Forget the subscription ``confirmed`` belongs to and wake its waiters with
        ``error``. Waiters already registered are the ones it served; later waits start a
        new subscription."""
        if self._confirmed is not confirmed:
            return
        self._confirmed = None
        self._reader = None
        if not confirmed.done():
            confirmed.set_exception(error)
            confirmed.exception()  # the waiters awaiting it raise it; nobody else must
        for waiters in self._waiting.values():
            for done in waiters:
                if not done.done():
                    done.set_exception(error)

    async def close(self) -> None:
        """Stop the reader and close the pub/sub connection; current waiters get an error."""
        reader, confirmed = self._reader, self._confirmed
        if reader is None or confirmed is None:
            return
        reader.cancel()
        # Here rather than in the reader alone: a reader cancelled before its first step
        # never runs its cleanup, and its waiters must not wait on it.
        self._stopped(confirmed, RuntimeError("the result listener was closed"))
        await asyncio.wait((reader,))  # it closes its connection; nothing to raise here
