"""Looking at a queue and administering it on Redis: job records, result waits, abort,
counts, workers, dead letters, purges.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any, cast

import redis.exceptions as rexc

from aioqueue.brokers.base import ArrivalSample, CronRun, JobRecord, QueueCounts, StoredEvent
from aioqueue.brokers.redis.connection import (
    CHUNK,
    FINAL,
    Call,
    RedisConnection,
    is_nogroup,
    redis_errors,
    text,
)
from aioqueue.brokers.redis.keys import GROUP, Keys
from aioqueue.brokers.redis.refusals import is_refusal
from aioqueue.errors import PermissionDenied, SerializationError
from aioqueue.serialization import decode

__all__ = ["Admin"]


class Admin(RedisConnection):
    """What the queue's handles, the CLI and the operations API ask of Redis."""

    # -- looking at jobs -------------------------------------------------------------------

    async def claim_partitions(self, queue: str, wanted: int) -> int:
        """How many partitions queue ``queue`` has on record; with none on record yet,
        record ``wanted`` (unless it is more than 1 and the queue holds jobs as one
        partition): a process that gives another number later is refused."""
        keys = Keys(queue)
        with self._errors("reading the queue's partitions"):
            stored = await self.client.get(keys.partitions)
            if stored is not None:
                return int(stored)
            held = [keys.stream, keys.lanes, keys.delayed, keys.dead]
            try:
                return int(await self._eval("partitions", [keys.partitions, *held], [wanted]))
            except PermissionDenied:
                if wanted > 1:
                    raise
                return 1  # a monitor (no scripts) of a queue of one partition records nothing

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
            return status is None or text(status) in FINAL

        with redis_errors("waiting for a job"):
            await self._waiter.wait(job_id, watch, timeout)
        return await self.record(job_id)

    async def abort(self, job_id: str) -> str:
        """Abort one job; see ``abort.lua``."""
        (found,) = await self.abort_many([job_id])
        return found

    async def abort_many(self, job_ids: Sequence[str]) -> list[str]:
        """Abort jobs, one ``abort.lua`` call each, pipelined; returns the status each had."""
        calls: list[Call] = []
        for job_id in job_ids:
            keys = [self.keys.stream, self.keys.delayed, self.keys.job(job_id), self.keys.events]
            # The token lets a re-sent request (lost reply) answer what it answered first.
            token = uuid.uuid4().hex
            args = [
                job_id,
                GROUP,
                self.result_ttl_ms,
                self.keys.abort_channel,
                token,
                self.events_cap,
            ]
            calls.append(("abort", keys, args))
        if not calls:
            return []
        with redis_errors("aborting jobs"):
            return [text(found) for found in await self._eval_many(calls)]

    async def events_tail(self) -> str:
        """The cursor after the newest event kept."""
        with redis_errors("reading job events"):
            newest = await self.client.xrevrange(self.keys.events, "+", "-", count=1)
        return f"{text(newest[0][0])}/*" if newest else "0-0/*"

    async def events(self, after: str, count: int, block: float | None) -> list[StoredEvent]:
        """Events after cursor ``after``: the rest of its entry, then XREAD (blocking up to
        ``block`` seconds when there is nothing newer)."""
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        entry, _, index = after.partition("/")
        if not STREAM_ID.fullmatch(entry) or not (index == "*" or index.isdigit()):
            raise ValueError(f"not an event cursor: {after!r}")
        found: list[StoredEvent] = []
        with redis_errors("reading job events"):
            if index != "*":
                rows = await self.client.xrange(self.keys.events, entry, entry)
                for entry_id, fields in cast(Any, rows):
                    found += _events(entry_id, fields, int(index) + 1)
            if found:
                return found
            streams: dict[Any, Any] = {self.keys.events: entry}
            if block is None:
                reply = await self.client.xread(streams, count=count)
            else:
                reply = await self.reader.xread(
                    streams, count=count, block=max(int(block * 1000), 1)
                )
        for _, entries in cast(Any, reply) or []:
            for entry_id, fields in entries:
                events = _events(entry_id, fields, 0)
                # An entry with no readable event (written by something else) still moves
                # the reader past it: a marker with no kind.
                found += events or [StoredEvent(f"{text(entry_id)}/*", 0, "", "", ())]
        return found

    async def dependants(self, job_id: str) -> list[str]:
        """The jobs named in this job's ``next`` field (see ``_prelude.lua``)."""
        with redis_errors("reading a job's dependants"):
            raw = await self.client.hget(self.keys.job(job_id), "next")
        lines = text(raw).split("\n") if isinstance(raw, bytes) else []
        return [line.split("\t", 1)[0] for line in lines if "\t" in line]

    async def statuses(self, job_ids: Sequence[str]) -> list[str | None]:
        """The status of each job (None: no such job), in one round trip."""
        with redis_errors("reading job statuses"):
            pipe = self.client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(self.keys.job(job_id), "status")
            replies = await pipe.execute(raise_on_error=False)
        return [text(r) if isinstance(r, bytes) else None for r in replies]

    async def pause(self, paused: bool) -> bool:
        """Set or remove the queue's paused flag (``fetch.lua`` and ``begin.lua`` read it);
        a second pause keeps the first one's time."""
        with redis_errors("pausing the queue" if paused else "resuming the queue"):
            if paused:
                now = self.server_now_ms()
                return not await self.client.set(self.keys.paused, now, nx=True)
            return bool(await self.client.delete(self.keys.paused))

    async def paused_since(self) -> int | None:
        """When the queue was paused (ms), None while it runs."""
        with redis_errors("reading the paused flag"):
            value = await self.client.get(self.keys.paused)
        return None if value is None else int(text(value))

    async def counts(self) -> QueueCounts:
        """Ready, pending (delivered, unsettled), delayed and dead job counts."""
        with redis_errors("counting jobs"):
            lanes = await self._lanes()
            pipe = self.client.pipeline(transaction=False)
            pipe.zcard(self.keys.delayed)
            pipe.zcard(self.keys.dead)
            for level in lanes:
                pipe.xlen(self.keys.lane(level))
                pipe.xpending(self.keys.lane(level), GROUP)
            delayed, dead, *streams = await pipe.execute(raise_on_error=False)
            length = pending_count = 0
            for reply in (delayed, dead, *streams[::2]):
                if isinstance(reply, Exception):
                    raise reply
            for size, pending in zip(streams[::2], streams[1::2], strict=True):
                # No group yet (no worker read the lane) means nothing is pending; anything
                # else, such as a refused XPENDING, is an error, not a zero.
                if isinstance(pending, Exception) and not is_nogroup(pending):
                    raise pending
                length += int(size)
                pending_count += 0 if isinstance(pending, Exception) else int(pending["pending"])
        return QueueCounts(
            ready=length - pending_count,
            pending=pending_count,
            delayed=int(delayed),
            dead=int(dead),
        )

    async def _unfetched(self, count: int) -> list[Any]:
        """Up to ``count`` stream entries no worker was handed yet (after each lane's
        last-delivered id), highest priority first."""
        found: list[Any] = []
        for level in await self._lanes():
            if len(found) >= count:
                break
            found += await self._unfetched_in(level, count - len(found))
        return found

    async def _unfetched_in(self, level: str, count: int) -> list[Any]:
        """The first ``count`` entries of one lane after its last-delivered id."""
        name = self.keys.lane(level)
        try:
            groups = await self.client.xinfo_groups(name)
        except rexc.ResponseError as exc:
            if is_refusal(exc):
                raise
            groups = []  # no stream or group yet: every entry is unfetched
        last = next(
            (text(g["last-delivered-id"]) for g in groups if text(g["name"]) == GROUP), "0-0"
        )
        return cast(list[Any], await self.client.xrange(name, f"({last}", "+", count=count))

    async def lag_ms(self) -> int | None:
        """Age in ms of the oldest job no worker has fetched yet (None when none waits)."""
        with redis_errors("measuring queue lag"):
            heads = [await self._unfetched_in(level, 1) for level in await self._lanes()]
        born = [int(text(head[0][0]).split("-")[0]) for head in heads if head]
        if not born:
            return None
        return max(self.server_now_ms() - min(born), 0)

    async def waiting(self, limit: int) -> list[JobRecord]:
        """Jobs not fetched by any worker yet: ready ones in order, then delayed ones by due
        time; at most ``limit`` of each."""
        if limit <= 0:
            return []
        with redis_errors("listing waiting jobs"):
            entries = await self._unfetched(limit)
            ids = [text(fields[b"j"]) for _, fields in entries if fields and b"j" in fields]
            ids += [text(i) for i in await self.client.zrange(self.keys.delayed, 0, limit - 1)]
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            rows = await pipe.execute()
        return [_record(i, row) for i, row in zip(ids, rows, strict=True) if row]

    async def workers(self) -> list[dict[str, str]]:
        """Live workers (those whose heartbeat has not expired), with their description.

        Read-only: workers' own heartbeats prune the set of those long gone."""
        with redis_errors("listing workers"):
            ids = [text(i) for i in await self.client.zrange(self.keys.workers, 0, -1)]
            if not ids:
                return []
            pipe = self.client.pipeline(transaction=False)
            for worker_id in ids:
                pipe.hgetall(self.keys.worker(worker_id))
            rows = await pipe.execute()
        return [
            {"id": worker_id, **{text(k): text(v) for k, v in row.items()}}
            for worker_id, row in zip(ids, rows, strict=True)
            if row
        ]

    async def arrivals(self) -> list[ArrivalSample]:
        """The arrival samples heartbeats wrote (see ``Lifecycle.heartbeat``); an entry that
        is not a sample (written by something else) is left out."""
        with redis_errors("reading arrival samples"):
            entries = await self.client.xrange(self.keys.arrivals, "-", "+")
        samples: list[ArrivalSample] = []
        for _, fields in cast(Any, entries):
            try:
                samples.append(ArrivalSample(int(fields[b"t"]), int(fields[b"n"])))
            except (KeyError, TypeError, ValueError):
                continue
        return samples

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

    async def cron_runs(self, names: Sequence[str]) -> dict[str, CronRun]:
        """The last claimed tick and the record of its run, per cron job name."""
        if not names:
            return {}
        with redis_errors("reading cron state"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zmscore(self.keys.cron, list(names))
            pipe.hmget(self.keys.cron_runs, list(names))
            fires, job_ids = await pipe.execute()
            records = [await self.record(text(i)) if i else None for i in job_ids]
        return {
            name: CronRun(
                None if fire is None else int(fire), text(job_id) if job_id else None, record
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
                pipe.hgetall(self.keys.job(text(job_id)))
            rows = await pipe.execute()
        return [_record(text(job_id), row) for job_id, row in zip(ids, rows, strict=True) if row]

    async def dead_ids(self) -> list[str]:
        """Every dead-lettered job id, oldest first."""
        with redis_errors("listing dead letters"):
            return [text(i) for i in await self.client.zrange(self.keys.dead, 0, -1)]

    async def requeue_dead(self, job_ids: Sequence[str]) -> int:
        """Put dead jobs back on the stream with fresh counters; returns how many."""
        requeued = 0
        token = uuid.uuid4().hex
        job_ids = list(dict.fromkeys(job_ids))  # an id named twice is one job
        with redis_errors("requeueing dead letters"):
            for start in range(0, len(job_ids), CHUNK):
                chunk = job_ids[start : start + CHUNK]
                keys = [
                    self.keys.stream,
                    self.keys.dead,
                    self.keys.events,
                    *(self.keys.job(i) for i in chunk),
                ]
                args = [token, self.events_cap, *chunk]
                requeued += int(await self._eval("requeue", keys, args))
        return requeued

    async def purge_dead(self, job_ids: Sequence[str]) -> int:
        """Delete dead jobs and their records; ids that are not dead are left alone."""
        purged = 0
        with redis_errors("purging dead letters"):
            for start in range(0, len(job_ids), CHUNK):
                chunk = list(job_ids[start : start + CHUNK])
                memo = self.keys.memo(uuid.uuid4().hex)
                keys = [self.keys.dead, memo, *(self.keys.job(i) for i in chunk)]
                purged += int(await self._eval("purge_dead", keys, chunk))
        return purged


def _glob_escape(text: str) -> str:
    """Escape the characters SCAN MATCH treats as a pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _int(fields: dict[bytes, bytes], name: bytes) -> int | None:
    """A number field of a job hash; None when missing, or garbage some other writer left."""
    value = fields.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


def _events(entry_id: Any, fields: dict[bytes, bytes] | None, start: int) -> list[StoredEvent]:
    """The events of one entry from index ``start``; an entry aioqueue did not write (or
    cannot read) holds none."""
    entry = text(entry_id)
    try:
        batch = decode(fields[b"e"]) if fields and b"e" in fields else []
    except SerializationError:
        return []
    at_ms = int(entry.partition("-")[0])
    flat: list[tuple[str, str, tuple[Any, ...]]] = []
    for item in batch if isinstance(batch, list) else []:
        if not isinstance(item, list) or len(item) < 2 or not isinstance(item[1], str):
            continue
        # One item may name many jobs that share the event (a bulk enqueue).
        for job_id in item[0] if isinstance(item[0], list) else [item[0]]:
            if isinstance(job_id, str):
                flat.append((job_id, item[1], tuple(item[2:])))
    return [
        StoredEvent(f"{entry}/{index}", at_ms, job_id, kind, details)
        for index, (job_id, kind, details) in enumerate(flat)
        if index >= start
    ]


def _float(fields: dict[bytes, bytes], name: bytes) -> float | None:
    value = fields.get(name)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _record(job_id: str, fields: dict[bytes, bytes]) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        status=text(fields.get(b"status", b"unknown")),
        envelope=fields.get(b"env"),
        attempt=_int(fields, b"attempt") or 1,
        deliveries=_int(fields, b"deliveries") or 0,
        enqueued_ms=_int(fields, b"enqueued"),
        started_ms=_int(fields, b"started"),
        finished_ms=_int(fields, b"finished"),
        run_at_ms=_int(fields, b"run_at"),
        result=fields.get(b"result"),
        error=fields.get(b"error"),
        reason=text(fields.get(b"reason", b"")),
        worker=text(fields.get(b"worker", b"")),
        progress=_float(fields, b"progress"),
        progress_message=text(fields.get(b"progress_message", b"")),
        progress_ms=_int(fields, b"progress_at"),
        replaced_by=text(fields.get(b"replaced_by", b"")),
    )
