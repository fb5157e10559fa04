"""The Redis Streams implementation of the broker protocol.

Every state change is one Lua script (see ``lua/``), batched over many jobs, so a job is
never half-settled and many jobs cost one round trip. Redis errors are turned into aioqueue
errors here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript

from aioqueue.brokers.base import (
    Again,
    CronClaim,
    CronRun,
    Delivery,
    Done,
    Finished,
    JobRecord,
    NewJob,
    QueueCounts,
    Settlement,
)
from aioqueue.brokers.redis import scripts
from aioqueue.brokers.redis.keys import GROUP, Keys
from aioqueue.brokers.redis.waiter import DoneWaiter, pubsub_messages
from aioqueue.errors import QueueFull, RedisUnavailable, UnsupportedRedis
from aioqueue.serialization import ErrorInfo, encode

__all__ = ["RedisBroker"]

logger = logging.getLogger(__name__)

MIN_REDIS = (7, 0)
# Jobs per script call: large enough to amortise the round trip, small enough that one
# script never blocks Redis for long.
CHUNK = 500
FINAL = frozenset({"complete", "failed", "dead", "aborted"})


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
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


class RedisBroker:
    """A queue's storage on Redis >= 7.0: a stream with a consumer group, a delayed zset,
    a dead-letter zset and one hash per job. See ``docs/architecture.md``."""

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        result_ttl: float,
        block: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.keys = Keys(queue)
        self.result_ttl_ms = int(result_ttl * 1000)
        # A blocking read must never look like a dead connection: the socket timeout is
        # well above the longest BLOCK the worker issues.
        self._socket_timeout = block + 10.0
        # Bounds the connections concurrent callers use (the pool itself is unbounded, which
        # is measurably cheaper per command than redis-py's blocking pool): a burst of
        # thousands of enqueues or result waits queues here instead of opening sockets.
        self._slots = asyncio.Semaphore(max_connections)
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._waiter: DoneWaiter | None = None
        self._connect_lock = asyncio.Lock()
        self._reclaim_cursor = "0-0"

    # -- connection ------------------------------------------------------------------------

    @property
    def client(self) -> aioredis.Redis:
        """The connected redis-py client (connect() first)."""
        if self._client is None:
            raise RuntimeError("broker is not connected")
        return self._client

    async def connect(self) -> None:
        """Open the connection pool and check the server version; idempotent."""
        async with self._connect_lock:
            if self._client is not None:
                return
            pool = aioredis.ConnectionPool.from_url(
                self.url,
                socket_connect_timeout=5.0,
                socket_timeout=self._socket_timeout,
                socket_keepalive=True,
                health_check_interval=30,
                # A pooled connection that went stale (Redis restarted) is replaced and the
                # command resent: every script is safe to repeat (ids, ownership checks).
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
                retry_on_error=[rexc.ConnectionError],
            )
            client = aioredis.Redis.from_pool(pool)
            try:
                with redis_errors("connecting"):
                    info = await client.info("server")
            except BaseException:
                await client.aclose()
                raise
            version = tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
            if version < MIN_REDIS:
                await client.aclose()
                raise UnsupportedRedis(
                    f"aioqueue needs Redis >= 7.0, the server at {self.url} runs "
                    f"{info.get('redis_version')}: upgrade Redis"
                )
            self._scripts = {
                name: client.register_script(scripts.source(name)) for name in scripts.NAMES
            }
            self._waiter = DoneWaiter(client, self.keys.done_channel(uuid.uuid4().hex))
            self._client = client

    async def close(self) -> None:
        """Close the pub/sub listener and the connection pool."""
        if self._waiter is not None:
            await self._waiter.close()
            self._waiter = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

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

    async def _eval_many(self, calls: Sequence[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """Run several scripts in one round trip (a pipeline of EVALSHA)."""
        if len(calls) == 1:
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
            elif isinstance(result, Exception):
                raise result
        return results

    # -- producing -------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob], max_size: int) -> list[bool]:
        """Write jobs in chunks of one script call each, pipelined; see ``enqueue.lua``."""
        now = _now_ms()
        calls: list[tuple[str, list[str], list[Any]]] = []
        # With a max_size the whole batch is one script call, so QueueFull is all or nothing;
        # without one, chunks keep each call short.
        size = len(jobs) if max_size > 0 else CHUNK
        skip = len(self.keys.job_prefix.encode())  # Lua counts bytes
        for start in range(0, len(jobs), max(size, 1)):
            chunk = jobs[start : start + size]
            timed = any(job.run_at_ms for job in chunk)
            keys = [self.keys.stream, self.keys.delayed]
            args: list[Any] = [max_size, now, skip, "1" if timed else "0"]
            job_key = self.keys.job
            if timed:
                for job in chunk:
                    keys.append(job_key(job.job_id))
                    args += [job.envelope, job.run_at_ms]
            else:
                keys += [job_key(job.job_id) for job in chunk]
                args += [job.envelope for job in chunk]
            calls.append(("enqueue", keys, args))
        with redis_errors("enqueuing"):
            results = await self._eval_many(calls)
        created: list[bool] = []
        for result in results:
            if result == -1:
                raise QueueFull(self.keys.queue, max_size)
            created += [flag == 1 for flag in result]
        return created

    # -- consuming -------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (after a FLUSHALL too)."""
        with redis_errors("creating the consumer group"):
            try:
                await self.client.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def fetch(
        self, consumer: str, count: int, block: float, max_deliveries: int
    ) -> list[Delivery]:
        """Blocking XREADGROUP of up to ``count`` new entries, then ``begin.lua`` on them."""
        with redis_errors("reading the stream"):
            try:
                response = await self.client.xreadgroup(
                    GROUP,
                    consumer,
                    {self.keys.stream: ">"},
                    count=count,
                    # BLOCK 0 would mean "forever": never round a short wait down to it.
                    block=max(int(block * 1000), 1),
                )
            except rexc.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                logger.warning("consumer group of %s is missing; recreating it", self.keys.stream)
                await self.ensure_group()
                return []
            if not response:
                return []
            entries = cast(Any, response)[0][1]
            return await self._begin(consumer, entries, max_deliveries, check=False)

    async def reclaim(
        self, consumer: str, count: int, min_idle: float, max_deliveries: int
    ) -> list[Delivery]:
        """XAUTOCLAIM entries idle longer than ``min_idle`` (their lease expired)."""
        with redis_errors("reclaiming expired leases"):
            try:
                response = await self.client.xautoclaim(
                    self.keys.stream,
                    GROUP,
                    consumer,
                    min_idle_time=int(min_idle * 1000),
                    start_id=self._reclaim_cursor,
                    count=count,
                )
            except rexc.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                await self.ensure_group()
                return []
            self._reclaim_cursor = _text(response[0])
            entries = [entry for entry in response[1] if entry and entry[1] is not None]
            if not entries:
                return []
            return await self._begin(consumer, entries, max_deliveries, check=True)

    async def _begin(
        self, consumer: str, entries: Sequence[Any], max_deliveries: int, *, check: bool
    ) -> list[Delivery]:
        now = _now_ms()
        known: list[tuple[str, str]] = []
        for entry_id, fields in entries:
            entry = _text(entry_id)
            job_id = fields.get(b"j") if fields else None
            if job_id is None:
                await self._dead_letter_foreign(entry, fields)
            else:
                known.append((_text(job_id), entry))
        if not known:
            return []
        keys = [self.keys.stream, self.keys.dead]
        args: list[Any] = [GROUP, consumer, max_deliveries, now, "1" if check else "0"]
        for job_id, entry in known:
            keys.append(self.keys.job(job_id))
            args += [job_id, entry]
        results = await self._eval("begin", keys, args)
        deliveries: list[Delivery] = []
        for (job_id, entry), result in zip(known, results, strict=True):
            verdict = _text(result[0])
            if verdict == "run":
                envelope = result[1] if isinstance(result[1], bytes) else b""
                deliveries.append(Delivery(job_id, entry, envelope, int(result[2]), int(result[3])))
            elif verdict == "dead":
                logger.error(
                    "job %s dead-lettered: its worker was lost %d times",
                    job_id,
                    int(result[1]) - 1,
                    extra={"job_id": job_id},
                )
        return deliveries

    async def _dead_letter_foreign(self, entry: str, fields: dict[bytes, bytes] | None) -> None:
        """Keep a stream entry aioqueue did not write as a dead letter, and drop it from the
        stream, in one MULTI (the entry was just delivered to this consumer)."""
        job_id = f"foreign-{entry}"
        error = ErrorInfo("ForeignEntry", f"stream entry {entry} has no job id: {fields!r}")
        now = _now_ms()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            self.keys.job(job_id),
            mapping={
                "status": "dead",
                "reason": "foreign stream entry",
                "error": encode(error),
                "enqueued": now,
                "finished": now,
            },
        )
        pipe.zadd(self.keys.dead, {job_id: now})
        pipe.xack(self.keys.stream, GROUP, entry)
        pipe.xdel(self.keys.stream, entry)
        await pipe.execute()
        logger.error("dead-lettered foreign stream entry %s", entry)

    async def settle(self, consumer: str, settlements: Sequence[Settlement]) -> None:
        """Record every outcome and ack the entries: one script per kind, one round trip."""
        now = _now_ms()
        done: list[Done] = []
        again: list[Again] = []
        finished: list[Finished] = []
        for settlement in settlements:
            if isinstance(settlement, Done):
                done.append(settlement)
            elif isinstance(settlement, Again):
                again.append(settlement)
            else:
                finished.append(settlement)
        calls: list[tuple[str, list[str], list[Any]]] = []
        for start in range(0, len(done), CHUNK):
            keys = [self.keys.stream]
            args: list[Any] = [GROUP, consumer, now, self.result_ttl_ms]
            for item in done[start : start + CHUNK]:
                keys.append(self.keys.job(item.delivery.job_id))
                args += [item.delivery.job_id, item.delivery.entry_id, item.result]
            calls.append(("settle_done", keys, args))
        for start in range(0, len(again), CHUNK):
            keys = [self.keys.stream, self.keys.delayed]
            args = [GROUP, consumer, now]
            for retry in again[start : start + CHUNK]:
                keys.append(self.keys.job(retry.delivery.job_id))
                args += [
                    retry.delivery.job_id,
                    retry.delivery.entry_id,
                    retry.run_at_ms,
                    retry.error,
                    retry.reason,
                ]
            calls.append(("settle_retry", keys, args))
        for start in range(0, len(finished), CHUNK):
            keys = [self.keys.stream, self.keys.dead]
            args = [GROUP, consumer, now, self.result_ttl_ms]
            for end in finished[start : start + CHUNK]:
                keys.append(self.keys.job(end.delivery.job_id))
                args += [
                    end.delivery.job_id,
                    end.delivery.entry_id,
                    end.status,
                    end.error,
                    end.reason,
                ]
            calls.append(("settle_fail", keys, args))
        if not calls:
            return
        with redis_errors("settling jobs"):
            try:
                await self._eval_many(calls)
            except rexc.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                # The stream was flushed under us; the jobs went with it.
                logger.warning("stream %s vanished while settling; recreating it", self.keys.stream)
                await self.ensure_group()

    async def renew(
        self, consumer: str, deliveries: Sequence[Delivery]
    ) -> tuple[list[str], list[str]]:
        """Reset the idle time of every entry this consumer still owns.

        Returns the job ids it no longer owns and the ids of jobs aborted meanwhile.
        """
        lost: list[str] = []
        aborted: list[str] = []
        with redis_errors("renewing leases"):
            for start in range(0, len(deliveries), CHUNK):
                chunk = deliveries[start : start + CHUNK]
                by_entry = {d.entry_id: d.job_id for d in chunk}
                keys = [self.keys.stream, *(self.keys.job(d.job_id) for d in chunk)]
                try:
                    gone, stopped = await self._eval(
                        "renew", keys, [GROUP, consumer, *(d.entry_id for d in chunk)]
                    )
                except rexc.ResponseError as exc:
                    if not is_nogroup(exc):
                        raise
                    await self.ensure_group()
                    gone, stopped = list(by_entry), []
                lost += [by_entry[_text(entry)] for entry in gone]
                aborted += [by_entry[_text(entry)] for entry in stopped]
        return lost, aborted

    async def listen_aborts(
        self, on_abort: Callable[[str], None], on_ready: Callable[[], None]
    ) -> None:
        """Call ``on_abort(job_id)`` for every abort request; ``on_ready()`` once subscribed.

        Runs until cancelled. Messages sent while disconnected are lost; the lease renewal
        notices aborted jobs as a backstop.
        """
        pubsub = self.client.pubsub()
        try:
            with redis_errors("subscribing to abort requests"):
                await pubsub.subscribe(self.keys.abort_channel)
            ready = False
            async for message in pubsub_messages(pubsub, "abort listener"):
                if message["type"] == "subscribe" and not ready:
                    ready = True
                    on_ready()
                elif message["type"] == "message":
                    on_abort(_text(message["data"]))
        finally:
            with contextlib.suppress(rexc.RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def release(self, consumer: str) -> int:
        """Give back every entry this consumer still holds, as fresh stream entries.

        Sweeps the consumer's whole pending list, so entries delivered by a read that was cut
        short at shutdown are handed back too (see ``release.lua``).
        """
        released = 0
        with redis_errors("releasing jobs"):
            while True:
                try:
                    pending = await self.client.xpending_range(
                        self.keys.stream, GROUP, "-", "+", CHUNK, consumer
                    )
                except rexc.ResponseError as exc:
                    if is_nogroup(exc):
                        return released
                    raise
                if not pending:
                    return released
                pipe = self.client.pipeline(transaction=False)
                for row in pending:
                    entry = _text(row["message_id"])
                    pipe.xrange(self.keys.stream, entry, entry)
                ranges = await pipe.execute()
                keys = [self.keys.stream]
                args: list[Any] = [GROUP, consumer]
                orphans: list[str] = []
                for row, found in zip(pending, ranges, strict=True):
                    entry = _text(row["message_id"])
                    job_id = found[0][1].get(b"j") if found and found[0][1] else None
                    if job_id is None:
                        orphans.append(entry)
                        continue
                    keys.append(self.keys.job(_text(job_id)))
                    args += [_text(job_id), entry]
                if orphans:
                    # Entries already deleted from the stream: just drop them from the PEL.
                    await self.client.xack(self.keys.stream, GROUP, *orphans)
                if len(keys) > 1:
                    released += int(await self._eval("release", keys, args))
                if len(pending) < CHUNK:
                    return released

    async def heartbeat(
        self, worker_id: str, info: dict[str, str | int | float], ttl: float
    ) -> None:
        """Record that a worker is alive, with its description; expires after ``ttl``."""
        key = self.keys.worker(worker_id)
        with redis_errors("sending a heartbeat"):
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(key, mapping=cast(Any, info))
            pipe.pexpire(key, int(ttl * 1000))
            pipe.zadd(self.keys.workers, {worker_id: _now_ms()})
            await pipe.execute()

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a stopping worker's heartbeat."""
        with redis_errors("removing a heartbeat"):
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self.keys.worker(worker_id))
            pipe.zrem(self.keys.workers, worker_id)
            await pipe.execute()

    async def promote_due(self, now_ms: int, limit: int) -> int | None:
        """Promote up to ``limit`` due delayed jobs; return the next due time in ms."""
        with redis_errors("promoting delayed jobs"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zrangebyscore(self.keys.delayed, "-inf", now_ms, start=0, num=limit)
            pipe.zrange(self.keys.delayed, 0, 0, withscores=True)
            due, head = await pipe.execute()
            if not due:
                return int(head[0][1]) if head else None
            ids = [_text(job_id) for job_id in due]
            keys = [self.keys.stream, self.keys.delayed, *(self.keys.job(i) for i in ids)]
            nxt = await self._eval("promote", keys, [now_ms, *ids])
            return int(float(nxt)) if nxt else None

    # -- looking at jobs -------------------------------------------------------------------

    async def record(self, job_id: str) -> JobRecord | None:
        """Everything stored about one job, or None."""
        with redis_errors("reading a job"):
            async with self._slots:
                fields = cast(dict[bytes, bytes], await self.client.hgetall(self.keys.job(job_id)))
        if not fields:
            return None
        return _record(job_id, fields)

    async def wait_final(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """Wait until the job is final: check, then subscribe-and-watch, then wait for the
        notification; never a poll loop (see ``waiter.py``)."""
        record = await self.record(job_id)
        if record is None or record.status in FINAL:
            return record
        if self._waiter is None:
            raise RuntimeError("broker is not connected")
        key = self.keys.job(job_id)
        channel = self._waiter.channel

        async def watch() -> bool:
            status = await self._eval("watch", [key], [channel])
            return status is None or _text(status) in FINAL

        with redis_errors("waiting for a job"):
            await self._waiter.wait(job_id, watch, timeout)
        return await self.record(job_id)

    async def abort(self, job_id: str) -> str:
        """Abort one job; see ``abort.lua``."""
        keys = [self.keys.stream, self.keys.delayed, self.keys.job(job_id)]
        args = [
            job_id,
            GROUP,
            _now_ms(),
            self.result_ttl_ms,
            self.keys.abort_channel,
        ]
        with redis_errors("aborting a job"):
            return _text(await self._eval("abort", keys, args))

    async def counts(self) -> QueueCounts:
        """Ready, pending (delivered, unsettled), delayed and dead job counts."""
        with redis_errors("counting jobs"):
            pipe = self.client.pipeline(transaction=False)
            pipe.xlen(self.keys.stream)
            pipe.zcard(self.keys.delayed)
            pipe.zcard(self.keys.dead)
            pipe.xpending(self.keys.stream, GROUP)
            length, delayed, dead, pending = await pipe.execute(raise_on_error=False)
        pending_count = 0 if isinstance(pending, Exception) else int(pending["pending"])
        return QueueCounts(
            ready=int(length) - pending_count,
            pending=pending_count,
            delayed=int(delayed),
            dead=int(dead),
        )

    async def _unfetched(self, count: int) -> list[Any]:
        """The first ``count`` stream entries after the group's last-delivered id."""
        try:
            groups = await self.client.xinfo_groups(self.keys.stream)
        except rexc.ResponseError:
            return []  # no stream or group yet: nothing was ever enqueued
        last = next(
            (_text(g["last-delivered-id"]) for g in groups if _text(g["name"]) == GROUP), "0-0"
        )
        return cast(
            list[Any], await self.client.xrange(self.keys.stream, f"({last}", "+", count=count)
        )

    async def lag_ms(self) -> int | None:
        """Age in ms of the oldest job no worker has fetched yet (None when none waits)."""
        with redis_errors("measuring queue lag"):
            waiting = await self._unfetched(1)
        if not waiting:
            return None
        born = int(_text(waiting[0][0]).split("-")[0])
        return max(_now_ms() - born, 0)

    async def waiting(self, limit: int) -> list[JobRecord]:
        """Jobs not fetched by any worker yet: ready ones in order, then delayed ones by due
        time; at most ``limit`` of each."""
        if limit <= 0:
            return []
        with redis_errors("listing waiting jobs"):
            entries = await self._unfetched(limit)
            ids = [_text(fields[b"j"]) for _, fields in entries if fields and b"j" in fields]
            ids += [_text(i) for i in await self.client.zrange(self.keys.delayed, 0, limit - 1)]
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            rows = await pipe.execute()
        return [_record(i, row) for i, row in zip(ids, rows, strict=True) if row]

    async def workers(self) -> list[dict[str, str]]:
        """Live workers (those whose heartbeat has not expired), with their description."""
        with redis_errors("listing workers"):
            ids = [_text(i) for i in await self.client.zrange(self.keys.workers, 0, -1)]
            if not ids:
                return []
            pipe = self.client.pipeline(transaction=False)
            for worker_id in ids:
                pipe.hgetall(self.keys.worker(worker_id))
            rows = await pipe.execute()
            gone = [worker_id for worker_id, row in zip(ids, rows, strict=True) if not row]
            if gone:
                await self.client.zrem(self.keys.workers, *gone)
        return [
            {"id": worker_id, **{_text(k): _text(v) for k, v in row.items()}}
            for worker_id, row in zip(ids, rows, strict=True)
            if row
        ]

    async def purge_queue(self) -> int:
        """Delete every key of the queue (jobs, stream, delayed, dead, cron state)."""
        deleted = 0
        with redis_errors("purging the queue"):
            batch: list[Any] = []
            pattern = _glob_escape(self.keys.prefix) + ":*"
            async for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += int(await self.client.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(await self.client.unlink(*batch))
        return deleted

    # -- cron ------------------------------------------------------------------------------

    async def claim_tick(self, name: str, fire_ms: int, job: NewJob, unique: bool) -> CronClaim:
        """Claim one cron tick and enqueue its run, exactly once across workers."""
        with redis_errors("claiming a cron tick"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zscore(self.keys.cron, name)
            pipe.hget(self.keys.cron_runs, name)
            last_fire, last_job = await pipe.execute()
            new_key = self.keys.job(job.job_id)
            last_key = self.keys.job(_text(last_job)) if last_job else new_key
            last_worker = await self.client.hget(last_key, "worker") if last_job else None
            worker_key = self.keys.worker(_text(last_worker)) if last_worker else new_key
            keys = [self.keys.cron, self.keys.cron_runs, self.keys.stream, new_key, last_key]
            keys.append(worker_key)
            args = [
                name,
                fire_ms,
                "" if last_fire is None else int(last_fire),
                job.job_id,
                job.envelope,
                _now_ms(),
                "1" if unique else "0",
                _text(last_worker) if last_worker else "",
            ]
            result = int(await self._eval("cron_claim", keys, args))
        return {1: CronClaim.CLAIMED, 2: CronClaim.OVERLAP}.get(result, CronClaim.TAKEN)

    async def cron_runs(self, names: Sequence[str]) -> dict[str, CronRun]:
        """The last claimed tick and the record of its run, per cron job name."""
        if not names:
            return {}
        with redis_errors("reading cron state"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zmscore(self.keys.cron, list(names))
            pipe.hmget(self.keys.cron_runs, list(names))
            fires, job_ids = await pipe.execute()
            records = [await self.record(_text(i)) if i else None for i in job_ids]
        return {
            name: CronRun(
                None if fire is None else int(fire), _text(job_id) if job_id else None, record
            )
            for name, fire, job_id, record in zip(names, fires, job_ids, records, strict=True)
        }

    # -- dead letters ----------------------------------------------------------------------

    async def dead(self, offset: int, limit: int) -> list[JobRecord]:
        """Dead-lettered jobs, most recent first."""
        if limit <= 0:
            return []
        with redis_errors("listing dead letters"):
            ids = await self.client.zrevrange(self.keys.dead, offset, offset + limit - 1)
            if not ids:
                return []
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.keys.job(_text(job_id)))
            rows = await pipe.execute()
        return [_record(_text(job_id), row) for job_id, row in zip(ids, rows, strict=True) if row]

    async def dead_ids(self) -> list[str]:
        """Every dead-lettered job id, oldest first."""
        with redis_errors("listing dead letters"):
            return [_text(i) for i in await self.client.zrange(self.keys.dead, 0, -1)]

    async def requeue_dead(self, job_ids: Sequence[str]) -> int:
        """Put dead jobs back on the stream with fresh counters; returns how many."""
        requeued = 0
        with redis_errors("requeueing dead letters"):
            for start in range(0, len(job_ids), CHUNK):
                chunk = job_ids[start : start + CHUNK]
                keys = [self.keys.stream, self.keys.dead, *(self.keys.job(i) for i in chunk)]
                requeued += int(await self._eval("requeue", keys, [_now_ms(), *chunk]))
        return requeued

    async def purge_dead(self, job_ids: Sequence[str]) -> int:
        """Delete dead jobs and their records; ids that are not dead are left alone."""
        purged = 0
        with redis_errors("purging dead letters"):
            for start in range(0, len(job_ids), CHUNK):
                chunk = list(job_ids[start : start + CHUNK])
                keys = [self.keys.dead, *(self.keys.job(i) for i in chunk)]
                purged += int(await self._eval("purge_dead", keys, chunk))
        return purged


def _glob_escape(text: str) -> str:
    """Escape the characters SCAN MATCH treats as a pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _int(fields: dict[bytes, bytes], name: bytes) -> int | None:
    value = fields.get(name)
    return int(value) if value is not None else None


def _record(job_id: str, fields: dict[bytes, bytes]) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        status=_text(fields.get(b"status", b"unknown")),
        envelope=fields.get(b"env"),
        attempt=_int(fields, b"attempt") or 1,
        deliveries=_int(fields, b"deliveries") or 0,
        enqueued_ms=_int(fields, b"enqueued"),
        started_ms=_int(fields, b"started"),
        finished_ms=_int(fields, b"finished"),
        run_at_ms=_int(fields, b"run_at"),
        result=fields.get(b"result"),
        error=fields.get(b"error"),
        reason=_text(fields.get(b"reason", b"")),
        worker=_text(fields.get(b"worker", b"")),
    )
