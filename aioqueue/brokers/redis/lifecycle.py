"""The job lifecycle the worker drives on Redis: enqueue, fetch, begin, settle, renew,
take over, release, promote, heartbeats.

Every state change is one Lua script (see ``lua/``), batched over many jobs, so a job is
never half-settled and many jobs cost one round trip; every script is safe to repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple, cast

import redis.exceptions as rexc

from aioqueue.brokers.base import (
    ARRIVALS_KEPT_MS,
    Again,
    Delivery,
    Done,
    FetchIncomplete,
    FlowNode,
    Keyed,
    Limits,
    NewJob,
    Recorded,
    Settlement,
    counted,
)
from aioqueue.brokers.redis.connection import (
    CHUNK,
    Call,
    RedisConnection,
    is_nogroup,
    redis_errors,
    text,
)
from aioqueue.brokers.redis.keys import GROUP
from aioqueue.brokers.redis.refusals import is_refusal
from aioqueue.brokers.redis.waiter import shard_messages
from aioqueue.errors import EnqueueIncomplete, QueueFull, RedisUnavailable, WorkflowConflict
from aioqueue.serialization import TASK_NAME, ErrorInfo, encode

__all__ = ["Lifecycle"]

logger = logging.getLogger(__name__)

# A job id a worker accepts from the stream: what producers may choose (see JobOptions).
JOB_ID = re.compile(TASK_NAME)
# How much of a foreign stream entry is copied into its dead-letter record.
FOREIGN_PREVIEW = 512
# How often a worker looks again whether a paused queue was resumed, in seconds.
PAUSE_POLL = 0.5


def _describe(exc: Exception) -> str:
    if isinstance(exc, rexc.OutOfMemoryError):
        return "Redis is out of memory (maxmemory) while enqueuing"
    return f"Redis refused part of the enqueue: {exc}"


def _lines(edges: Sequence[tuple[str, int]]) -> str:
    """Edges as enqueue.lua reads them: ``<id>\t<slot>`` per line (ids hold no control
    characters, see JobOptions)."""
    return "\n".join(f"{job_id}\t{slot}" for job_id, slot in edges)


def _specs(jobs: Sequence[NewJob], priority: int) -> list[Any]:
    """The sparse specs enqueue.lua reads for a workflow (or a batch of mixed priorities
    written in one call): (index, spec) for each job that is more than a plain job of the
    call's ``priority``. An edge into a group node of the batch goes into the group's
    ``members`` runs instead of its member's spec, so a group's members need none."""
    groups = {job.job_id for job in jobs if job.flow is not None and job.flow.kind == "group"}
    members: dict[str, list[tuple[int, int]]] = {gid: [] for gid in groups}
    own_next: dict[int, list[tuple[str, int]]] = {}
    for index, job in enumerate(jobs, 1):
        for dependant, slot in job.flow.next if job.flow is not None else ():
            if dependant in groups:
                members[dependant].append((slot, index))
            else:
                own_next.setdefault(index, []).append((dependant, slot))
    plain = FlowNode()
    specs: list[Any] = []
    for index, job in enumerate(jobs, 1):
        node = job.flow or plain
        nxt = own_next.get(index, ())
        scheduled = job.run_at_ms or job.delay_ms
        default = node.kind == "job" and not (node.pending or node.after or node.feed)
        own = job.priority != priority
        if default and not nxt and not scheduled and not own and job.limit_keys is None:
            continue
        runs = _runs(sorted(members[job.job_id])) if job.job_id in members else ""
        specs += [
            index,
            f"{job.run_at_ms}\x1f{job.delay_ms}\x1f{node.kind}\x1f{node.policy}"
            f"\x1f{'1' if node.feed else ''}\x1f{node.pending}\x1f{_lines(nxt)}"
            f"\x1f{_lines(node.after)}\x1f{runs}\x1f{node.shape}"
            f"\x1f{'' if node.size is None else node.size}"
            f"\x1f{job.priority if own else ''}"
            f"\x1f{_limit_keys(job)}",
        ]
    return specs


def _limit_keys(job: NewJob) -> str:
    """A job's limit keys as two spec fields (empty: its task's name)."""
    rate, concurrency = job.limit_keys or ("", "")
    return f"{rate}\x1f{concurrency}"


def _field(value: int | None) -> str:
    return "" if value is None else str(value)


def _chunks(jobs: Sequence[NewJob]) -> list[list[NewJob]]:
    """Runs of jobs of one priority, at most CHUNK each, in order."""
    chunks: list[list[NewJob]] = []
    for job in jobs:
        last = chunks[-1] if chunks else None
        if last is None or len(last) >= CHUNK or last[0].priority != job.priority:
            chunks.append([job])
        else:
            last.append(job)
    return chunks


def _named_group(jobs: Sequence[NewJob]) -> str:
    """The id of the named group of a workflow batch (the one with a shape)."""
    return next((job.job_id for job in jobs if job.flow is not None and job.flow.shape), "?")


def _runs(slots: Sequence[tuple[int, int]]) -> str:
    """(slot, job index) pairs as runs ``<slot>:<index>:<count>`` where both go up by one."""
    runs: list[list[int]] = []
    for slot, index in slots:
        last = runs[-1] if runs else None
        if last is not None and slot == last[0] + last[2] and index == last[1] + last[2]:
            last[2] += 1
        else:
            runs.append([slot, index, 1])
    return ",".join(f"{s}:{i}:{c}" for s, i, c in runs)


class Read(NamedTuple):
    """What one blocking XREADGROUP got: entries by stream name; the lane streams it read,
    each with its queue's index and the suffix its entry tokens take; the wake streams."""

    entries: dict[str, list[Any]]
    owner: dict[str, tuple[int, str]]
    wakes: set[str]


class Lifecycle(RedisConnection):
    """What producers and workers do to jobs."""

    # In a cluster, this queue's blocking read still waiting from an earlier fetch (see
    # _fetch_apart).
    _reading: asyncio.Task[Read] | None = None

    # -- producing -------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob], max_size: int) -> list[bool]:
        """Write jobs in chunks of one script call each, pipelined; see ``enqueue.lua``."""
        calls: list[Call] = []
        flow = any(job.flow is not None for job in jobs)
        # With a max_size the whole batch is one script call, so QueueFull is all or nothing;
        # a workflow is one call too, so it is written all or nothing; otherwise chunks of
        # one priority each keep each call short. A single call of mixed priorities names
        # them in specs, like a workflow.
        single = max_size > 0 or flow
        skip = len(self.keys.job_prefix.encode())  # Lua counts bytes
        first = jobs[0].priority if jobs else 0
        uniform = all(job.priority == first and job.limit_keys is None for job in jobs)
        if single:
            chunks = [list(jobs)]
        elif uniform:
            chunks = [list(jobs[start : start + CHUNK]) for start in range(0, len(jobs), CHUNK)]
        else:
            chunks = _chunks(jobs)
        for chunk in chunks:
            priority = chunk[0].priority
            specs = flow or (
                not uniform
                and any(job.priority != priority or job.limit_keys is not None for job in chunk)
            )
            timed = any(job.run_at_ms or job.delay_ms for job in chunk)
            keys = [self.keys.stream, self.keys.delayed, self.keys.events]
            mode = "2" if specs else "1" if timed else "0"
            args: list[Any] = [max_size, skip, mode, self.result_ttl_ms, self.events_cap]
            args.append(priority)
            job_key = self.keys.job
            if specs:
                keys += [job_key(job.job_id) for job in chunk]
                args += [job.envelope for job in chunk]
                args += _specs(chunk, priority)
            elif timed:
                for job in chunk:
                    keys.append(job_key(job.job_id))
                    args += [job.envelope, job.run_at_ms, job.delay_ms]
            else:
                keys += [job_key(job.job_id) for job in chunk]
                args += [job.envelope for job in chunk]
            calls.append(("enqueue", keys, args))
        with redis_errors("enqueuing"):
            results = await self._eval_many(calls, errors=len(calls) > 1, durable=True)
        created: list[bool] = []
        failed: list[str] = []
        cause = ""
        for (_, keys, _), result in zip(calls, results, strict=True):
            if result == -1:
                raise QueueFull(self.keys.queue, max_size, counted(jobs))
            if result == -2:
                raise WorkflowConflict(_named_group(jobs))
            if isinstance(result, Exception):
                # Chunks are separate script calls: the ones before and after a failed one
                # may have been written. Say exactly which jobs are stored.
                cause = cause or _describe(result)
                failed += [key[len(self.keys.job_prefix) :] for key in keys[3:]]
                created += [False] * (len(keys) - 3)
            else:
                created += [flag == 1 for flag in result]
        if failed:
            not_written = set(failed)
            written = [job.job_id for job in jobs if job.job_id not in not_written]
            raise EnqueueIncomplete(cause, written, failed)
        return created

    async def enqueue_keyed(self, job: NewJob, keyed: Keyed, max_size: int) -> str:
        """Write one job under a debounce or throttle key; see ``keyed.lua``."""
        keys = [
            self.keys.stream,
            self.keys.delayed,
            self.keys.events,
            self.keys.keyed(keyed.mode, keyed.task, keyed.key),
            self.keys.job(job.job_id),
            self.keys.memo(job.job_id),
        ]
        args: list[Any] = [
            keyed.mode,
            job.job_id,
            job.envelope,
            keyed.window_ms,
            max_size,
            self.result_ttl_ms,
            self.events_cap,
        ]
        with redis_errors("enqueuing"):
            [answer] = await self._eval_many([("keyed", keys, args)], durable=True)
        if answer == -1:
            raise QueueFull(self.keys.queue, max_size, 1)
        return text(answer)

    # -- consuming -------------------------------------------------------------------------

    def configure(
        self, limits: Mapping[str, Limits], lease_ms: int, on_deferred: Callable[[], None]
    ) -> None:
        """Hand begin.lua the worker's limits (see parse_limits in ``_prelude.lua``)."""
        self._limits = "\x1e".join(
            f"{task}\x1f{_field(limit.interval_us)}\x1f{limit.burst_us}"
            f"\x1f{_field(limit.concurrency)}"
            for task, limit in sorted(limits.items())
        )
        self._lease_ms = lease_ms
        self._on_deferred = on_deferred

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (after a FLUSHALL too, and
        when Redis is over maxmemory: see ``ensure_group.lua``)."""
        with redis_errors("creating the consumer group"):
            await self._eval("ensure_group", [self.keys.stream], [GROUP])

    async def fetch(
        self, consumer: str, count: int, block: float, max_deliveries: int
    ) -> list[Delivery]:
        """Read and begin up to ``count`` new entries, highest priority first, in one step
        (``fetch.lua``); when there are none, a blocking XREADGROUP on every lane wakes for
        the first new entry of any priority, and ``begin.lua`` begins what it read.

        A paused queue answers nothing: the call waits up to ``block`` seconds (at most
        PAUSE_POLL at a time) so that resuming is noticed soon.
        """
        fetched = await self.fetch_many([self], consumer, count, None, block, max_deliveries)
        return [delivery for _, delivery in fetched]

    async def fetch_many(
        self,
        queues: Sequence[Lifecycle],
        consumer: str,
        count: int,
        shares: Sequence[int] | None,
        block: float,
        max_deliveries: int,
    ) -> list[tuple[int, Delivery]]:
        """Fetch from several queues of this Redis in one step: in their order (strict),
        or each up to its share of ``count`` first (weighted, ``shares`` given). Returns
        (index of the queue, delivery) pairs. See ``fetch``.

        In a Redis Cluster the queues' keys lie in different slots, which no single script
        call or read may span: each queue is fetched on its own, and when none has work
        each gets a blocking read of its own (see ``_fetch_apart``)."""
        if self.cluster and len(queues) > 1:
            return await self._fetch_apart(queues, consumer, count, shares, block, max_deliveries)
        with redis_errors("reading the stream"):
            fetched, lanes, count, foreign = await self._fetch_ready(
                queues, consumer, count, shares, max_deliveries
            )
            if fetched or count <= 0 or foreign:
                return fetched  # foreign entries were found: go round again, not block
            if not lanes:
                # Every queue is paused (or its group was just made again).
                await asyncio.sleep(min(block, PAUSE_POLL))
                return []
            # A paused queue is left out of the read; wake up to look again soon.
            paused = len({index for index, _ in lanes}) < len(queues)
            wait = min(block, PAUSE_POLL) if paused else block
            read = await self._read_blocking(queues, consumer, lanes, count, wait)
            return await self._take(queues, consumer, read, count, max_deliveries)

    async def _fetch_ready(
        self,
        queues: Sequence[Lifecycle],
        consumer: str,
        count: int,
        shares: Sequence[int] | None,
        max_deliveries: int,
    ) -> tuple[list[tuple[int, Delivery]], list[tuple[int, str]], int, bool]:
        """One fetch.lua call over ``queues``: what it began, the lanes of the queues not
        paused (index, priority), how many of ``count`` are still wanted, and whether it
        found foreign entries (the caller goes round again rather than block)."""
        fetched: list[tuple[int, Delivery]] = []
        keys: list[str] = []
        args: list[Any] = [
            GROUP,
            consumer,
            count,
            max_deliveries,
            self.max_payload_bytes,
            self.result_ttl_ms,
            self.events_cap,
            self._lease_ms,
            "strict" if shares is None else "weighted",
        ]
        for index, queue in enumerate(queues):
            k = queue.keys
            keys += [k.stream, k.dead, k.delayed, k.events, k.paused]
            args += [k.job_prefix, queue._limits, 0 if shares is None else shares[index]]
        lanes: list[tuple[int, str]] = []
        foreign = False
        # A lost reply must not be re-sent: the entries the first run began would sit in
        # this consumer's pending list, unknown to the worker, for a whole lease. Raised
        # instead, it makes the worker adopt them at once.
        replies = await self._eval("fetch", keys, args, once=True)
        for index, (queue, reply) in enumerate(zip(queues, replies, strict=True)):
            verdict = text(reply[0])
            if verdict == "nogroup":
                logger.warning("consumer group of %s is missing; recreating it", queue.keys.stream)
                await queue.ensure_group()
                continue
            if verdict != "ok":
                continue
            lanes += [(index, text(level)) for level in reply[1]]
            taken = [(text(job_id), text(token)) for job_id, token in reply[2]]
            fetched += [(index, d) for d in queue._deliveries(taken, reply[3])]
            for token, fields in reply[4]:
                pairs = dict(zip(fields[::2], fields[1::2], strict=True))
                await queue._dead_letter_foreign(text(token), pairs)
                foreign = True
            count -= len(taken)
        return fetched, lanes, count, foreign

    async def _fetch_apart(
        self,
        queues: Sequence[Lifecycle],
        consumer: str,
        count: int,
        shares: Sequence[int] | None,
        block: float,
        max_deliveries: int,
    ) -> list[tuple[int, Delivery]]:
        """``fetch_many`` for queues in different cluster slots: first what blocking reads
        left from earlier calls brought, then fetch.lua on each queue (up to its share,
        then in order for what is left); with nothing ready, one blocking read per queue,
        returning when the first answers.

        A read that has not answered is left running for the next call, never cancelled:
        cancelling it could lose the reply after Redis handed it entries (they would sit in
        this consumer's pending list for a lease). Each queue keeps one read at most
        (``_reading``), and ``release`` at shutdown stops it before handing back.

        A queue that cannot be reached (its master failing) does not hold up the others:
        what they gave is raised in :class:`FetchIncomplete`, naming the failed ones."""
        fetched: list[tuple[int, Delivery]] = []
        failed: dict[int, RedisUnavailable] = {}

        async def attempt(index: int, step: Awaitable[Any]) -> Any:
            try:
                with redis_errors("reading the stream"):
                    return await step
            except RedisUnavailable as exc:
                failed.setdefault(index, exc)
                return None

        for index, queue in enumerate(queues):
            got = await attempt(index, queue._answered(index, consumer, count, max_deliveries))
            fetched += got or []
            count -= len(got or [])
        lanes: dict[int, list[str]] = {}
        drained: set[int] = set()
        foreign = False
        asks = [min(share, count) for share in shares] if shares is not None else []
        for rounds in (asks, [count] * len(queues)):
            for index, ask in enumerate(rounds):
                want = min(ask, count)
                if want <= 0 or index in drained or index in failed:
                    continue
                queue = queues[index]
                answer = await attempt(
                    index, queue._fetch_ready([queue], consumer, want, None, max_deliveries)
                )
                if answer is None:
                    continue
                ready, live, _, found = answer
                lanes[index] = [level for _, level in live]
                fetched += [(index, delivery) for _, delivery in ready]
                count -= len(ready)
                foreign = foreign or found
                if len(ready) < want:
                    drained.add(index)
        if not (fetched or count <= 0 or foreign):
            fetched += await self._wait_apart(
                queues, consumer, lanes, count, block, max_deliveries, attempt
            )
        return self._apart(fetched, failed, len(queues))

    async def _wait_apart(
        self,
        queues: Sequence[Lifecycle],
        consumer: str,
        lanes: dict[int, list[str]],
        count: int,
        block: float,
        max_deliveries: int,
        attempt: Callable[[int, Awaitable[list[tuple[int, Delivery]]]], Awaitable[Any]],
    ) -> list[tuple[int, Delivery]]:
        """Block until one of the queues' reads answers (see ``_fetch_apart``); begin what
        the answered reads brought."""
        readers = []
        for index, levels in lanes.items():
            queue = queues[index]
            if levels and queue._reading is None:
                queue._reading = asyncio.create_task(
                    queue._read_blocking(
                        [queue], consumer, [(0, level) for level in levels], count, block
                    ),
                    name=f"aioqueue-read-{queue.keys.queue}",
                )
            if queue._reading is not None:
                readers.append(queue._reading)
        if not readers:
            await asyncio.sleep(min(block, PAUSE_POLL))  # every queue is paused or failed
            return []
        paused = len(readers) < len(queues)
        await asyncio.wait(
            readers,
            timeout=min(block, PAUSE_POLL) if paused else block,
            return_when=asyncio.FIRST_COMPLETED,
        )
        fetched: list[tuple[int, Delivery]] = []
        for index, queue in enumerate(queues):
            got = await attempt(index, queue._answered(index, consumer, count, max_deliveries))
            fetched += got or []
            count -= len(got or [])
        return fetched

    @staticmethod
    def _apart(
        fetched: list[tuple[int, Delivery]], failed: dict[int, RedisUnavailable], queues: int
    ) -> list[tuple[int, Delivery]]:
        """What ``_fetch_apart`` returns: the deliveries, or the error of every queue
        failing, or FetchIncomplete when some did."""
        if not failed:
            return fetched
        first = next(iter(failed.values()))
        if len(failed) == queues:
            raise first
        raise FetchIncomplete(str(first), fetched, sorted(failed))

    async def _answered(
        self, index: int, consumer: str, count: int, max_deliveries: int
    ) -> list[tuple[int, Delivery]]:
        """Begin what this queue's blocking read (if it has answered) brought, as the
        deliveries of queue ``index``; up to ``count``, handing the rest back."""
        reading = self._reading
        if reading is None or not reading.done():
            return []
        self._reading = None
        # The read may have answered long ago (this worker was full): begin only what it
        # still holds, never an entry another worker took over meanwhile.
        got = await self._take(
            [self], consumer, reading.result(), max(count, 0), max_deliveries, check=True
        )
        return [(index, delivery) for _, delivery in got]

    async def _read_blocking(
        self,
        queues: Sequence[Lifecycle],
        consumer: str,
        lanes: Sequence[tuple[int, str]],
        count: int,
        wait: float,
    ) -> Read:
        """One blocking XREADGROUP on every lane of every queue (in order) and on their
        wake streams. Returns what it read, by stream, and the queues' wake streams."""
        streams: dict[Any, Any] = {}
        owner: dict[str, tuple[int, str]] = {}
        for index, level in lanes:
            name = queues[index].keys.lane(level)
            streams[name] = ">"
            owner[name] = (index, "" if level == "0" else f"@{level}")
        wakes = {queues[index].keys.wake for index, _ in lanes}
        for name in wakes:
            streams[name] = ">"
        try:
            response = await self.reader.xreadgroup(
                GROUP,
                consumer,
                streams,
                count=count,
                # BLOCK 0 would mean "forever": never round a short wait down to it.
                block=max(int(wait * 1000), 1),
            )
        except rexc.ResponseError as exc:
            if not is_nogroup(exc):
                raise
            logger.warning("a consumer group is missing; recreating it")
            for queue in queues:
                await queue.ensure_group()
            return Read({}, owner, wakes)
        rows = cast(Any, response) or []
        return Read({text(row[0]): row[1] for row in rows}, owner, wakes)

    async def _take(
        self,
        queues: Sequence[Lifecycle],
        consumer: str,
        read: Read,
        count: int,
        max_deliveries: int,
        *,
        check: bool = False,
    ) -> list[tuple[int, Delivery]]:
        """Begin at most ``count`` of what a blocking read got (several lanes can answer
        at once: COUNT is per stream) and hand the rest straight back. ``check``: begin
        only entries this consumer still holds (a read that answered a while ago: another
        worker may have taken its entries over since)."""
        for name in read.wakes & set(read.entries):
            # A job went to a lane new to its queue: fetch.lua reads it next time round.
            woken = [text(entry_id) for entry_id, _ in read.entries[name]]
            pipe = self.client.pipeline(transaction=False)
            pipe.xack(name, GROUP, *woken)
            pipe.xdel(name, *woken)
            await pipe.execute()
        entries = [
            (read.owner[name][0], (text(entry_id) + read.owner[name][1], fields))
            for name in read.owner
            for entry_id, fields in read.entries.get(name, ())
        ]
        for index, queue in enumerate(queues):
            extra = [entry for i, entry in entries[count:] if i == index]
            if extra:
                await queue._hand_back(consumer, extra)
        fetched: list[tuple[int, Delivery]] = []
        for index, queue in enumerate(queues):
            mine = [entry for i, entry in entries[:count] if i == index]
            if mine:
                got = await queue._begin(consumer, mine, max_deliveries, check=check)
                fetched += [(index, delivery) for delivery in got]
        return fetched

    async def reclaim(
        self, consumer: str, count: int, min_idle: float, max_deliveries: int
    ) -> list[Delivery]:
        """XAUTOCLAIM entries idle longer than ``min_idle`` (their lease expired), lane by
        lane.

        The sweep can return this consumer's own entries too (idle after an outage); begin
        hands those back unchanged, and the worker keeps running the copy it has.
        """
        taken: list[Delivery] = []
        with redis_errors("reclaiming expired leases"):
            for level in await self._lanes():
                if len(taken) >= count:
                    break
                name = self.keys.lane(level)
                try:
                    response = await self.reader.xautoclaim(
                        name,
                        GROUP,
                        consumer,
                        min_idle_time=int(min_idle * 1000),
                        start_id=self._reclaim_cursors.get(name, "0-0"),
                        count=count - len(taken),
                    )
                except rexc.ResponseError as exc:
                    if not is_nogroup(exc):
                        raise
                    if level == "0":
                        await self.ensure_group()
                    continue
                self._reclaim_cursors[name] = text(response[0])
                tag = "" if level == "0" else f"@{level}"
                entries = [
                    (text(entry[0]) + tag, entry[1])
                    for entry in response[1]
                    if entry and entry[1] is not None
                ]
                if entries:
                    taken += await self._begin(consumer, entries, max_deliveries, check=True)
        return taken

    async def adopt(
        self, consumer: str, known: Collection[str], count: int, max_deliveries: int
    ) -> list[Delivery]:
        """Take up at once entries this consumer holds but does not know of (``known`` are
        the entry ids it runs): a read or a begin whose reply was lost in an outage.

        Without this they would sit out a whole lease before anyone took them over.
        """
        adopted: list[Delivery] = []
        with redis_errors("adopting pending entries"):
            async for page in self._own_pending(consumer):
                entries = [(e, {b"j": j.encode()}) for e, j in page if e not in known and j]
                # Begin may skip some (aborted or finished meanwhile): go on through the
                # page until count jobs are taken up or it is used up.
                while entries and len(adopted) < count:
                    wanted = count - len(adopted)
                    batch, entries = entries[:wanted], entries[wanted:]
                    adopted += await self._begin(consumer, batch, max_deliveries, check=True)
                if len(adopted) >= count:
                    break
        return adopted

    async def _own_pending(self, consumer: str) -> AsyncIterator[list[tuple[str, str | None]]]:
        """Pages of (entry token, job id) this consumer holds in its pending lists, lane by
        lane. Entries that are pending but gone from the stream (deleted under it) are acked
        and left out."""
        for level in await self._lanes():
            name = self.keys.lane(level)
            tag = "" if level == "0" else f"@{level}"
            start = "-"
            while True:
                try:
                    pending = await self.client.xpending_range(
                        name, GROUP, start, "+", CHUNK, consumer
                    )
                except rexc.ResponseError as exc:
                    if is_nogroup(exc):
                        break
                    raise
                if not pending:
                    break
                pipe = self.client.pipeline(transaction=False)
                for row in pending:
                    entry = text(row["message_id"])
                    pipe.xrange(name, entry, entry)
                ranges = await pipe.execute()
                page: list[tuple[str, str | None]] = []
                orphans: list[str] = []
                for row, found in zip(pending, ranges, strict=True):
                    entry = text(row["message_id"])
                    fields = found[0][1] if found else None
                    if not fields:
                        orphans.append(entry)
                    else:
                        job_id = fields.get(b"j")
                        page.append((entry + tag, None if job_id is None else text(job_id)))
                if orphans:
                    await self.client.xack(name, GROUP, *orphans)
                yield page
                if len(pending) < CHUNK:
                    break
                start = "(" + text(pending[-1]["message_id"])

    async def _begin(
        self, consumer: str, entries: Sequence[Any], max_deliveries: int, *, check: bool
    ) -> list[Delivery]:
        """Begin entries (token, fields) with ``begin.lua``; dead-letter those that name no
        valid job id, hold those the paused queue refused."""
        known: list[tuple[str, str]] = []
        for entry_id, fields in entries:
            entry = text(entry_id)
            job_id = fields.get(b"j") if fields else None
            # An id with control characters or of any length would forge or flood log lines.
            if job_id is None or not JOB_ID.fullmatch(text(job_id)):
                await self._dead_letter_foreign(entry, fields)
            else:
                known.append((text(job_id), entry))
        if not known:
            return []
        keys = [
            self.keys.stream,
            self.keys.dead,
            self.keys.delayed,
            self.keys.events,
            self.keys.paused,
        ]
        args: list[Any] = [
            GROUP,
            consumer,
            max_deliveries,
            "1" if check else "0",
            self.max_payload_bytes,
            self.result_ttl_ms,
            self.events_cap,
            self._limits,
            self._lease_ms,
        ]
        for job_id, entry in known:
            keys.append(self.keys.job(job_id))
            args += [job_id, entry]
        results = await self._eval("begin", keys, args)
        paused = [
            (entry, {b"j": job_id.encode()})
            for (job_id, entry), result in zip(known, results, strict=True)
            if text(result[0]) == "paused"
        ]
        if paused:
            # The queue was paused meanwhile: they go back to wait at once, not in this
            # consumer's pending list.
            await self._hand_back(consumer, paused)
        return self._deliveries(known, results)

    async def _hand_back(self, consumer: str, entries: Sequence[Any]) -> int:
        """Give entries (token, fields) this consumer holds but did not begin back to their
        lanes as fresh entries (``release.lua``)."""
        jobs = [
            (text(token), text(fields[b"j"]))
            for token, fields in entries
            if fields and fields.get(b"j") is not None
        ]
        if not jobs:
            return 0
        memo = self.keys.memo(uuid.uuid4().hex)
        keys = [self.keys.stream, memo, *(self.keys.job(j) for _, j in jobs)]
        args: list[Any] = [GROUP, consumer]
        for entry, job_id in jobs:
            args += [job_id, entry]
        return int(await self._eval("release", keys, args))

    def _deliveries(
        self, known: Sequence[tuple[str, str]], results: Sequence[Any]
    ) -> list[Delivery]:
        """The jobs begin_batch (see ``_prelude.lua``) began, from its answers; logs the
        others."""
        deliveries: list[Delivery] = []
        deferred = False
        for (job_id, entry), result in zip(known, results, strict=True):
            verdict = text(result[0])
            deferred = deferred or verdict == "deferred"
            if verdict == "run":
                envelope = result[1] if isinstance(result[1], bytes) else b""
                fed = result[4] if len(result) > 4 and isinstance(result[4], bytes) else None
                deliveries.append(
                    Delivery(job_id, entry, envelope, int(result[2]), int(result[3]), fed)
                )
            elif verdict == "dead":
                logger.error(
                    "job %s dead-lettered: its worker was lost %d times",
                    job_id,
                    int(result[1]) - 1,
                    extra={"job_id": job_id},
                )
            elif verdict == "big":
                logger.error(
                    "job %s dead-lettered: %d bytes, more than max_payload_bytes (%d)",
                    job_id,
                    int(result[1]),
                    self.max_payload_bytes,
                    extra={"job_id": job_id},
                )
            elif verdict == "corrupt":
                logger.error(
                    "job %s dead-lettered: its record is corrupt (written by something else)",
                    job_id,
                    extra={"job_id": job_id},
                )
            elif verdict == "skip" and text(result[1]) == "corrupt":
                logger.error(
                    "stream entry %s names job %s, whose key is not a job record: skipped",
                    entry,
                    job_id,
                    extra={"job_id": job_id},
                )
            elif verdict == "skip" and text(result[1]) == "missing":
                # Only a deleted or evicted record does this: say so, never skip silently.
                logger.warning(
                    "stream entry %s names job %s, which has no record (deleted, or evicted "
                    "by Redis's maxmemory-policy): skipped",
                    entry,
                    job_id,
                    extra={"job_id": job_id},
                )
        if deferred and self._on_deferred is not None:
            self._on_deferred()
        return deliveries

    async def _dead_letter_foreign(self, token: str, fields: dict[bytes, bytes] | None) -> None:
        """Keep a stream entry aioqueue did not write as a dead letter, and drop it from the
        stream, in one MULTI (the entry was just delivered to this consumer). A repeat
        writes the same record under the same id."""
        job_id = f"foreign-{token}"
        name, entry = self._untoken(token)
        preview = repr(fields)[:FOREIGN_PREVIEW]
        error = ErrorInfo("ForeignEntry", f"stream entry {token} has no job id: {preview}")
        now = self.server_now_ms()
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
        pipe.xack(name, GROUP, entry)
        pipe.xdel(name, entry)
        await pipe.execute()
        logger.error("dead-lettered foreign stream entry %s", token)

    async def settle(self, consumer: str, settlements: Sequence[Settlement]) -> list[Recorded]:
        """Record every outcome and ack the entries: one script call per chunk, one round
        trip. Returns what became of each (see ``settle.lua``)."""
        calls: list[Call] = []
        for start in range(0, len(settlements), CHUNK):
            keys = [self.keys.stream, self.keys.delayed, self.keys.dead, self.keys.events]
            args: list[Any] = [GROUP, consumer, self.result_ttl_ms, self.events_cap]
            for item in settlements[start : start + CHUNK]:
                delivery = item.delivery
                keys.append(self.keys.job(delivery.job_id))
                args += [delivery.job_id, delivery.entry_id]
                # Variable width (see settle.lua): a completion sends only its result.
                if isinstance(item, Done):
                    args += ["complete", item.result]
                elif isinstance(item, Again):
                    args += ["retry", item.error, item.reason, item.delay_ms]
                else:
                    args += [item.status, item.error, item.reason]
            calls.append(("settle", keys, args))
        if not calls:
            return []
        with redis_errors("settling jobs"):
            try:
                results = await self._eval_many(calls, durable=True)
            except rexc.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                # The stream was flushed under us; the jobs went with it.
                logger.warning("stream %s vanished while settling; recreating it", self.keys.stream)
                await self.ensure_group()
                return [Recorded.LOST] * len(settlements)
        answers = {1: Recorded.YES, 2: Recorded.ABORTED}
        return [answers.get(flag, Recorded.LOST) for result in results for flag in result]

    async def renew(
        self, consumer: str, deliveries: Sequence[Delivery]
    ) -> tuple[list[str], list[str]]:
        """Reset the idle time of every entry this consumer still owns.

        Returns the entry ids it no longer owns and the entry ids of jobs aborted meanwhile.
        """
        lost: list[str] = []
        aborted: list[str] = []
        with redis_errors("renewing leases"):
            for start in range(0, len(deliveries), CHUNK):
                chunk = deliveries[start : start + CHUNK]
                keys = [self.keys.stream, *(self.keys.job(d.job_id) for d in chunk)]
                try:
                    gone, stopped = await self._eval(
                        "renew",
                        keys,
                        [GROUP, consumer, self._lease_ms, *(d.entry_id for d in chunk)],
                    )
                except rexc.ResponseError as exc:
                    if not is_nogroup(exc):
                        raise
                    await self.ensure_group()
                    gone, stopped = [d.entry_id for d in chunk], []
                lost += [text(entry) for entry in gone]
                aborted += [text(entry) for entry in stopped]
        return lost, aborted

    async def progress(
        self, consumer: str, delivery: Delivery, fraction: float, message: str, seq: int
    ) -> bool:
        """Store and announce progress; see ``progress.lua``."""
        keys = [self.keys.job(delivery.job_id), self.keys.events]
        args: list[Any] = [
            delivery.job_id,
            consumer,
            delivery.entry_id,
            repr(float(fraction)),
            message,
            seq,
            self.events_cap,
        ]
        with redis_errors("reporting progress"):
            return int(await self._eval("progress", keys, args)) == 1

    async def listen_aborts(
        self, on_abort: Callable[[str], None], on_ready: Callable[[], None]
    ) -> None:
        """Call ``on_abort(job_id)`` for every abort request; ``on_ready()`` once subscribed.

        Runs until cancelled. Messages sent while disconnected are lost; the lease renewal
        notices aborted jobs as a backstop.
        """
        messages = shard_messages(self.client, self.keys.abort_channel, "abort listener")
        try:
            ready = False
            with redis_errors("subscribing to abort requests"):
                async for message in messages:
                    if message["type"] == "ssubscribe" and not ready:
                        ready = True
                        on_ready()
                    elif message["type"] == "smessage":
                        on_abort(text(message["data"]))
        finally:
            await messages.aclose()

    async def release(self, consumer: str, keep: Collection[str] = ()) -> int:
        """Give back every entry this consumer still holds, as fresh stream entries, except
        the entries in ``keep`` (their outcome is known but not yet written, or their job
        would not stop).

        Sweeps the consumer's whole pending list, so entries delivered by a read that was cut
        short at shutdown are handed back too (see ``release.lua``).
        """
        released = 0
        await self._stop_reading()
        with redis_errors("releasing jobs"):
            async for page in self._own_pending(consumer):
                entries = [(e, {b"j": j.encode()}) for e, j in page if j and e not in keep]
                released += await self._hand_back(consumer, entries)
        return released

    async def _stop_reading(self) -> None:
        """Stop a blocking read left waiting (``_fetch_apart``), so that what it got is in
        this consumer's pending list before that is swept."""
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading

    async def close(self) -> None:
        """Stop a waiting blocking read, then close the connections."""
        await self._stop_reading()
        await super().close()

    async def heartbeat(
        self, worker_id: str, info: dict[str, str | int | float], ttl: float
    ) -> None:
        """Record that a worker is alive, with its description; expires after ``ttl``.
        Workers whose heartbeat stopped long ago (killed) leave the workers set here.

        The same round trip reads the ready streams' ``entries-added`` (every priority
        lane's, summed) and Redis's clock; a second one appends that sample to the arrivals
        stream, trimmed by entry id to ``ARRIVALS_KEPT_MS``. Arrival rates come from these
        samples, so enqueueing pays nothing for them."""
        key = self.keys.worker(worker_id)
        now = self.server_now_ms()
        with redis_errors("sending a heartbeat"):
            lanes = await self._lanes()
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(key, mapping=cast(Any, info))
            pipe.pexpire(key, int(ttl * 1000))
            pipe.zadd(self.keys.workers, {worker_id: now})
            pipe.zremrangebyscore(self.keys.workers, "-inf", now - int(ttl * 3000))
            self._time_in(pipe)
            for level in lanes:
                pipe.xinfo_stream(self.keys.lane(level))
            answers = await pipe.execute(raise_on_error=False)
            for reply in answers[:5]:
                if isinstance(reply, Exception):
                    raise reply
            self._set_offset(answers[4])
            added = 0
            for level, stream in zip(lanes, answers[5:], strict=True):
                if isinstance(stream, Exception):
                    if not isinstance(stream, rexc.ResponseError) or is_refusal(stream):
                        raise stream
                    if level == "0":
                        return  # no stream (a purge or FLUSHALL just now): no sample now
                else:
                    added += int(stream["entries-added"])
            read_ms = self.server_now_ms()
            await self.client.xadd(
                self.keys.arrivals,
                {"t": read_ms, "n": added},
                minid=read_ms - ARRIVALS_KEPT_MS,
                approximate=False,
            )

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a stopping worker's heartbeat, and its consumer if it holds no entries."""
        with redis_errors("removing a heartbeat"):
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self.keys.worker(worker_id))
            pipe.zrem(self.keys.workers, worker_id)
            await pipe.execute()
            await self._forget_consumers([worker_id])

    async def forget_dead_consumers(self, min_idle: float) -> int:
        """Remove from the consumer group the consumers of workers that are gone (heartbeat
        expired), idle for ``min_idle`` seconds, holding no entries. Returns how many."""
        with redis_errors("removing dead consumers"):
            try:
                consumers = await self.client.xinfo_consumers(self.keys.stream, GROUP)
            except rexc.ResponseError as exc:
                if is_refusal(exc):
                    raise
                return 0  # no stream or group yet
            names = [
                text(c["name"])
                for c in consumers
                if int(c["pending"]) == 0 and int(c["idle"]) >= min_idle * 1000
            ]
            return await self._forget_consumers(names)

    async def _forget_consumers(self, names: Sequence[str]) -> int:
        removed = 0
        for start in range(0, len(names), CHUNK):
            chunk = names[start : start + CHUNK]
            memo = self.keys.memo(uuid.uuid4().hex)
            keys = [self.keys.stream, memo, *(self.keys.worker(name) for name in chunk)]
            try:
                removed += int(await self._eval("forget_consumers", keys, [GROUP, *chunk]))
            except rexc.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
        return removed

    async def promote_due(self, limit: int, *, early: bool = False) -> float | None:
        """Promote up to ``limit`` jobs due by Redis's clock (``early``: whether due or not);
        return the seconds until the next delayed job is due (None if nothing is delayed)."""
        with redis_errors("promoting delayed jobs"):
            pipe = self.client.pipeline(transaction=False)
            until = "+inf" if early else self.server_now_ms()
            pipe.zrangebyscore(self.keys.delayed, "-inf", until, start=0, num=limit)
            pipe.zrange(self.keys.delayed, 0, 0, withscores=True)
            # Refresh the estimate of Redis's clock on every call: this machine's clock may
            # step (NTP) at any time, and a stale estimate would never find a job due.
            self._time_in(pipe)
            due, head, clock = await pipe.execute()
            self._set_offset(clock)
            if not due:
                return self._until(float(head[0][1])) if head else None
            ids = [text(job_id) for job_id in due]
            keys = [self.keys.stream, self.keys.delayed, *(self.keys.job(i) for i in ids)]
            nxt, now = await self._eval("promote", keys, ["1" if early else "0", *ids])
            self._observe_clock(int(now))
            return self._until(float(nxt)) if nxt else None

    def _until(self, due_ms: float) -> float:
        return max(due_ms - self.server_now_ms(), 0) / 1000
