"""The connection to Redis every part of the broker shares: the client, the scripts, the
shared clock, and the one place where redis-py errors become aioqueue errors.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript

from aioqueue.brokers.base import ServerFacts
from aioqueue.brokers.redis import scripts
from aioqueue.brokers.redis.keys import Keys
from aioqueue.brokers.redis.waiter import DoneWaiter
from aioqueue.errors import RedisUnavailable, UnsupportedRedis

MIN_REDIS = (7, 0)
# Jobs per script call: large enough to amortise the round trip, small enough that one
# script never blocks Redis for long.
CHUNK = 500
FINAL = frozenset({"complete", "failed", "dead", "aborted"})


def local_now_ms() -> int:
    """This machine's wall clock in ms (only for figures nobody compares across machines)."""
    return int(time.time() * 1000)


def text(value: Any) -> str:
    """A Redis reply value as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


class redis_errors:
    """Map redis-py's connection failures to :class:`RedisUnavailable`, chained.

    A plain class rather than a generator-based context manager: it wraps every command,
    and this is the cheapest way Python offers.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None or (isinstance(exc, TimeoutError) and not isinstance(exc, rexc.RedisError)):
            # A builtin TimeoutError (an OSError) is a caller's deadline, not an outage.
            return
        if isinstance(exc, rexc.OutOfMemoryError):
            message = (
                f"Redis is out of memory (maxmemory) while {self.what}: "
                "let workers drain the queue, or raise maxmemory"
            )
            raise RedisUnavailable(message) from exc
        if isinstance(exc, rexc.BusyLoadingError):
            raise RedisUnavailable(
                f"Redis is loading its dataset while {self.what}: {exc}"
            ) from exc
        if isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError)):
            raise RedisUnavailable(f"Redis unavailable while {self.what}: {exc}") from exc


def is_nogroup(exc: BaseException) -> bool:
    """True for the errors Redis returns when the stream or consumer group is missing (a
    blocked XREADGROUP whose stream was flushed gets UNBLOCKED)."""
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


Call = tuple[str, list[str], list[Any]]
"""One script call: script name, KEYS, ARGV."""


class RedisConnection:
    """A queue's connection to Redis >= 7.0: the redis-py client, the loaded scripts and the
    clock every worker shares (Redis ``TIME``)."""

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        result_ttl: float,
        block: float = 5.0,
        max_connections: int = 64,
        max_payload_bytes: int = 1_048_576,
    ) -> None:
        self.url = url
        self.keys = Keys(queue)
        self.result_ttl_ms = int(result_ttl * 1000)
        # A worker refuses larger jobs itself: anyone who can write to Redis can write one.
        self.max_payload_bytes = max_payload_bytes
        # A blocking read must never look like a dead connection: the socket timeout is
        # well above the longest BLOCK the worker issues.
        self._socket_timeout = block + 10.0
        # Bounds the connections concurrent callers use (the pool itself is unbounded, which
        # is measurably cheaper per command than redis-py's blocking pool): a burst of
        # thousands of enqueues or result waits queues here instead of opening sockets.
        self._slots = asyncio.Semaphore(max_connections)
        self._client: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._waiter: DoneWaiter | None = None
        self._connect_lock = asyncio.Lock()
        # Redis TIME minus this machine's clock, in ms: lets this process estimate the shared
        # clock without a round trip (scripts that decide anything read TIME themselves).
        self._clock_offset_ms = 0

    @property
    def client(self) -> aioredis.Redis:
        """The connected redis-py client (connect() first)."""
        if self._client is None:
            raise RuntimeError("broker is not connected")
        return self._client

    @property
    def reader(self) -> aioredis.Redis:
        """A client that never re-sends a command: for the reads that hand entries over
        (``XREADGROUP``, ``XAUTOCLAIM``). Re-sending one whose reply was lost would leave
        the entries it handed over unseen in this consumer's pending list for a whole lease;
        the caller gets :class:`RedisUnavailable` instead and adopts them."""
        if self._reader is None:
            raise RuntimeError("broker is not connected")
        return self._reader

    async def connect(self) -> None:
        """Open the connection pool and check the server version; idempotent."""
        async with self._connect_lock:
            if self._client is not None:
                return
            options: dict[str, Any] = {
                "socket_connect_timeout": 5.0,
                "socket_timeout": self._socket_timeout,
                "socket_keepalive": True,
                "health_check_interval": 30,
            }
            pool = aioredis.ConnectionPool.from_url(
                self.url,
                # A pooled connection that went stale (Redis restarted), or one that dropped
                # after Redis ran a command, is replaced and the command re-sent: every script
                # is safe to repeat (each recognises the event it records).
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
                retry_on_error=[rexc.ConnectionError],
                **options,
            )
            client = aioredis.Redis.from_pool(pool)
            reader_pool = aioredis.ConnectionPool.from_url(
                self.url, retry=Retry(ExponentialWithJitterBackoff(), 0), **options
            )
            try:
                with redis_errors("connecting"):
                    info = await client.info("server")
                    self._set_offset(await client.time())
            except BaseException:
                await client.aclose()
                await reader_pool.aclose()
                raise
            version = tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
            if version < MIN_REDIS:
                await client.aclose()
                await reader_pool.aclose()
                raise UnsupportedRedis(
                    f"aioqueue needs Redis >= 7.0, the server at {self.url} runs "
                    f"{info.get('redis_version')}: upgrade Redis"
                )
            self._scripts = {
                name: client.register_script(scripts.source(name)) for name in scripts.NAMES
            }
            self._waiter = DoneWaiter(client, self.keys.done_channel(uuid.uuid4().hex))
            self._client = client
            self._reader = aioredis.Redis.from_pool(reader_pool)

    async def close(self) -> None:
        """Close the pub/sub listener and the connection pool."""
        if self._waiter is not None:
            await self._waiter.close()
            self._waiter = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._reader is not None:
            await self._reader.aclose()
            self._reader = None

    def _set_offset(self, reply: tuple[int, int]) -> None:
        seconds, micros = reply
        self._observe_clock(seconds * 1000 + micros // 1000)

    def _observe_clock(self, redis_ms: int) -> None:
        """Remember how far Redis's clock (read just now) is from this machine's."""
        self._clock_offset_ms = redis_ms - local_now_ms()

    def server_now_ms(self) -> int:
        """Redis's clock as estimated from the last reading, without a round trip."""
        return local_now_ms() + self._clock_offset_ms

    async def now_ms(self) -> int:
        """Redis's clock (``TIME``): the one clock every worker agrees on."""
        with redis_errors("reading the Redis clock"):
            self._set_offset(await self.client.time())
        return self.server_now_ms()

    async def server_facts(self) -> ServerFacts:
        """``maxmemory-policy`` and append-only persistence, from ``INFO`` (which needs no
        CONFIG permission)."""
        with redis_errors("reading the Redis configuration"):
            memory = await self.client.info("memory")
            persistence = await self.client.info("persistence")
        policy = str(memory.get("maxmemory_policy", "noeviction"))
        return ServerFacts(
            evicting_policy=None if policy == "noeviction" else policy,
            persistent=bool(int(persistence.get("aof_enabled", 0))),
        )

    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA one script; on NOSCRIPT (Redis restarted and lost its cache) load it and
        run it again."""
        if self._client is None:
            await self.connect()
        script = self._scripts[name]
        async with self._slots:
            try:
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
            except rexc.NoScriptError:
                script.sha = await self.client.script_load(script.script)
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)

    async def _eval_many(self, calls: Sequence[Call], *, errors: bool = False) -> list[Any]:
        """Run several scripts in one round trip (a pipeline of EVALSHA). With ``errors``,
        a call that failed has its exception in its place instead of raising it."""
        if len(calls) == 1 and not errors:
            name, keys, args = calls[0]
            return [await self._eval(name, keys, args)]
        pipe = self.client.pipeline(transaction=False)
        for name, keys, args in calls:
            pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if isinstance(result, rexc.NoScriptError):
                # Redis restarted and lost its script cache: load and run just that call.
                name, keys, args = calls[i]
                results[i] = await self._eval(name, keys, args)
            elif isinstance(result, Exception) and not errors:
                raise result
        return results
