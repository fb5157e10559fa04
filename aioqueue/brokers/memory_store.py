"""The state behind the ``memory://`` broker: what Redis holds for a queue, in process memory.

Each Redis structure has a counterpart here, so the broker can follow the Lua scripts line by
line:

==========================  ========================================================
Redis                       here
==========================  ========================================================
job hash (with TTL)         :class:`StoredJob` in :attr:`QueueState.jobs`, ``expires_at``
stream + consumer group,    :attr:`QueueState.ready` (entries not yet delivered, one
its priority lanes          :class:`ReadyLanes` lane per priority),
                            :attr:`QueueState.pending` (the pending list: owner and
                            last delivery or claim, hence idle time) and
                            :attr:`QueueState.consumers` (the group's consumers)
delayed / dead zsets        :class:`ScoredSet`
cron zset / cron-runs hash  :attr:`QueueState.cron` / :attr:`QueueState.cron_runs`
cron-claims hash            :attr:`QueueState.cron_claims`
worker heartbeat keys       :attr:`QueueState.workers`, each with an expiry
pub/sub channels            :class:`Waiters` (result waits, blocked fetches) and one
                            :class:`asyncio.Queue` per abort listener
workflow fields of a job    :attr:`StoredJob.next`, ``pending``, ``policy``, ``feed``,
(``next``, ``in:<slot>``)   ``kind``, ``size`` and :attr:`StoredJob.inputs`
progress fields of a job    :attr:`StoredJob.progress`, ``progress_message``,
                            ``progress_ms``, ``progress_seq``
events stream               :class:`EventLog` (:attr:`QueueState.events`)
arrivals stream, the        :attr:`QueueState.arrivals`,
stream's ``entries-added``  :attr:`QueueState.entries_added`
debounce / throttle keys,   :class:`Strings` (:attr:`QueueState.keyed`,
memo keys                   :attr:`QueueState.memos`)
==========================  ========================================================

Workflows follow the flow functions of ``_prelude.lua`` (``resolve_edge``, ``release``,
``complete_group``, ``flow_drain``) as methods of :class:`QueueState`, with the same values
byte for byte: an edge's stored outcome, a group's result (one msgpack array, members that
did not complete as extension 42) and the errors dependants fail with are built here as the
scripts build them with ``cmsgpack``.

Job events follow ``event`` and ``flush_events`` of ``_prelude.lua``: each step that the
scripts do in one call collects its events in a list (:attr:`FlowContext.events`) and
appends it as ONE entry to the queue's :class:`EventLog`, with the same kinds and details in
the same order, as ``cmsgpack`` would hand them back (a Lua number that is whole comes back
as an int, see :func:`lua_number`).

Stores are shared per URL: every broker on ``memory://name`` in this process sees the same
:class:`MemoryStore` (``memory://`` is the store named ``""``), so a producer's ``Queue`` and
the worker built from it share their jobs.

A store belongs to one event loop, because its waiters are futures of that loop. It binds to
the loop that first uses it; once that loop has stopped or closed, the next loop to use the
store takes it over (the data stays, the old loop's waiters are dropped). Using one store
from two running loops at once raises :class:`RuntimeError`. Stores are not thread-safe.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import math
import re
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aioqueue.brokers.base import (
    ARRIVALS_KEPT_MS,
    ArrivalSample,
    CronClaim,
    Delivery,
    JobRecord,
    Limits,
    StoredEvent,
)

__all__ = [
    "FINAL",
    "SCHEME",
    "Event",
    "EventEntry",
    "EventLog",
    "FlowContext",
    "Heartbeat",
    "MemoryStore",
    "Outcome",
    "PendingEntry",
    "QueueState",
    "ScoredSet",
    "StoredJob",
    "Strings",
    "Waiters",
    "array_header",
    "clip",
    "dependency_error",
    "error_parts",
    "lua_number",
    "member_error",
    "now_ms",
    "outcome_error",
    "pack_texts",
    "reset_stores",
    "store_for",
]

logger = logging.getLogger("aioqueue.brokers.memory")

SCHEME = "memory://"
FINAL = frozenset({"complete", "failed", "dead", "aborted"})


def now_ms() -> int:
    """Wall-clock time in Unix ms: the clock every stored timestamp and delay uses."""
    return int(time.time() * 1000)


Outcome = tuple[str | None, bytes | None, bytes | None]
"""A dependency's ``status``, ``result`` and ``error`` as ``flow_drain`` reads them (status
None: there is no such job)."""

Event = tuple[object, ...]
"""One job event as ``event()`` records it: ``(job id, kind, details...)``."""


def lua_number(value: float) -> int | float:
    """A number as ``cmsgpack`` packs a Lua number: a whole one as an integer."""
    number = float(value)
    return int(number) if number.is_integer() else number


@dataclass(slots=True)
class FlowContext:
    """The flow context of the scripts (``{stream, delayed, ttl, prefix, now, events}``)
    and their ``work`` list: ids of jobs that just became final, whose edges are still to
    settle."""

    now: int
    """The step's time in Unix ms."""
    ttl: float
    """The result TTL in seconds: a workflow node that ends expires after it."""
    work: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    """The events of the step, appended as one entry when it ends (``flush_events``)."""

    def event(self, job_id: str, kind: str, *details: object) -> None:
        """``event``: record one job event of this step."""
        self.events.append((job_id, kind, *details))


class ReadyLanes:
    """Entries not delivered yet, one lane per priority (the stream and its lane streams):
    entry token -> job id, each lane oldest first. Tokens name their lane as the Redis
    broker's do: ``<ms>-<seq>`` in lane 0, ``<ms>-<seq>@<priority>`` in the others."""

    __slots__ = ("_lanes", "_size")

    def __init__(self) -> None:
        self._lanes: dict[int, OrderedDict[str, str]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, token: str, job_id: str, priority: int) -> None:
        """Append an entry to its lane (XADD)."""
        self._lanes.setdefault(priority, OrderedDict())[token] = job_id
        self._size += 1

    def discard(self, token: str) -> None:
        """Delete an entry if it is not delivered yet (XDEL)."""
        _, _, level = token.partition("@")
        lane = self._lanes.get(int(level or 0))
        if lane is not None and lane.pop(token, None) is not None:
            self._size -= 1

    def take(self, count: int) -> list[tuple[str, str]]:
        """Up to ``count`` entries (all if ``count`` <= 0), highest priority first."""
        taken: list[tuple[str, str]] = []
        for priority in sorted(self._lanes, reverse=True):
            lane = self._lanes[priority]
            while lane and (count <= 0 or len(taken) < count):
                taken.append(lane.popitem(last=False))
        self._size -= len(taken)
        return taken

    def items(self) -> list[tuple[str, str]]:
        """Every (entry token, job id) waiting, in the order workers take them."""
        return [e for p in sorted(self._lanes, reverse=True) for e in self._lanes[p].items()]

    def job_ids(self) -> list[str]:
        """Every job id waiting, in the order workers take them."""
        return [job_id for _, job_id in self.items()]

    def oldest(self) -> str | None:
        """The token of the entry that waits longest, whatever its lane."""
        heads = [next(iter(lane)) for lane in self._lanes.values() if lane]
        return min(heads, key=_entry_order, default=None)

    def clear(self) -> None:
        self._lanes.clear()
        self._size = 0


def _entry_order(token: str) -> tuple[int, int]:
    ms, _, seq = token.partition("@")[0].partition("-")
    return int(ms), int(seq)


@dataclass(slots=True)
class StoredJob:
    """One job's record: the fields of the Redis job hash."""

    envelope: bytes | None
    status: str
    enqueued_ms: int | None
    attempt: int = 1
    deliveries: int = 0
    started_ms: int | None = None
    finished_ms: int | None = None
    run_at_ms: int | None = None
    result: bytes | None = None
    error: bytes | None = None
    reason: str = ""
    priority: int = 0
    """Which lane its entries go to (the ``prio`` field)."""
    limit_keys: tuple[str, str] | None = None
    """Its rate and concurrency keys as its producer computed them (the ``lk`` field)."""
    limited: str = ""
    """Which limit deferred it while it waits: ``rate`` or ``concurrency`` (``limited``)."""
    slot: str | None = None
    """The concurrency key whose slot it holds while it runs (``slot``)."""
    worker: str = ""
    """The consumer that began the current delivery (settling checks it)."""
    entry: str = ""
    """The ready-queue entry of the current delivery (settling checks it)."""
    settled: tuple[str, str] | None = None
    """(consumer, entry) whose outcome was recorded last: a repeat of it answers recorded."""
    expires_at: float | None = None
    """``time.monotonic()`` deadline after which the record is gone; None = kept."""
    # Workflows (the fields enqueue.lua writes for a job of a workflow).
    next: list[tuple[str, int, int]] | None = None
    """(dependant id, slot, born) of every job waiting on this one, in the order the edges
    were written (the ``next`` field, lines ``<id>\t<slot>\t<born>``; None: it has none).
    born is the dependant's ``enqueued_ms`` when the edge was written: an edge whose
    dependant id now names another job (the first expired, the id was used again) is
    stale and ignored."""
    pending: int = 0
    """Dependencies not ended yet, while ``waiting``."""
    policy: str = "fast"
    """What a dependency that does not complete does: ``fast``, ``any`` (jobs), ``wait``,
    ``pass`` (groups)."""
    feed: bool = False
    """The dependency on slot 1 feeds its result as the first argument."""
    kind: str = "job"
    """``group``: a node that never runs and completes with its members' results."""
    size: int = 0
    """A group's number of members (``FlowNode.size``, else its ``pending``): its slots
    1..size. Slot 0 is its gate, the step before a group inside a chain."""
    shape: str = ""
    """A named group's digest of its whole workflow (``FlowNode.shape``)."""
    inputs: dict[int, bytes] | None = None
    """The ``in:<slot>`` fields: each ended dependency's outcome on its edge, as the scripts
    store it: ``b"c"`` + its encoded result, ``b"x"`` + msgpack ``[status, id, type,
    message, traceback]`` (a group's member that did not complete), or its bare status (a
    group's gate, slot 0, keeps only that)."""
    # Progress (progress.lua).
    progress: float | None = None
    progress_message: str = ""
    progress_ms: int | None = None
    progress_seq: tuple[str, int] | None = None
    """(entry, report number) of the last progress stored: a repeat announces nothing."""
    replaced_by: str = ""
    """Debounce (keyed.lua): the job that replaced this one."""

    def to_record(self, job_id: str) -> JobRecord:
        """The broker-neutral view of this record."""
        return JobRecord(
            job_id=job_id,
            status=self.status,
            envelope=self.envelope,
            attempt=self.attempt,
            deliveries=self.deliveries,
            enqueued_ms=self.enqueued_ms,
            started_ms=self.started_ms,
            finished_ms=self.finished_ms,
            run_at_ms=self.run_at_ms,
            result=self.result,
            error=self.error,
            reason=self.reason,
            worker=self.worker,
            progress=self.progress,
            progress_message=self.progress_message,
            progress_ms=self.progress_ms,
            replaced_by=self.replaced_by,
        )


@dataclass(slots=True)
class Heartbeat:
    """A worker's last heartbeat: its description and when it expires."""

    info: dict[str, str]
    """The description as Redis would store it: every value as text."""
    beat_ms: int
    expires_at: float
    """``time.monotonic()`` deadline after which the worker counts as dead."""


@dataclass(slots=True)
class PendingEntry:
    """A delivered, unacknowledged entry: whose it is and when it was last handed over."""

    job_id: str
    consumer: str
    delivered_at: float
    """``time.monotonic()`` of the last delivery, claim or renewal; idle time counts from it."""


class ScoredSet:
    """A sorted set of members with integer scores, ordered like a Redis zset (score, then
    member). A heap with lazy deletion keeps "pop what is due" and "peek" cheap."""

    __slots__ = ("_heap", "_scores")

    def __init__(self) -> None:
        self._scores: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, member: object) -> bool:
        return member in self._scores

    def add(self, member: str, score: int) -> None:
        """Insert ``member`` or move it to ``score`` (ZADD)."""
        self._scores[member] = score
        heapq.heappush(self._heap, (score, member))
        if len(self._heap) > 2 * len(self._scores) + 64:
            self._heap = [(s, m) for m, s in self._scores.items()]
            heapq.heapify(self._heap)

    def discard(self, member: str) -> bool:
        """Remove ``member``; True if it was there (ZREM)."""
        return self._scores.pop(member, None) is not None

    def _clean_head(self) -> None:
        heap = self._heap
        while heap and self._scores.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def head(self) -> tuple[str, int] | None:
        """The member with the lowest score and its score, or None if empty."""
        self._clean_head()
        if not self._heap:
            return None
        score, member = self._heap[0]
        return member, score

    def pop_due(self, max_score: int, limit: int) -> list[str]:
        """Remove and return up to ``limit`` members scored ``<= max_score``, lowest first."""
        due: list[str] = []
        while len(due) < limit:
            self._clean_head()
            if not self._heap or self._heap[0][0] > max_score:
                break
            _, member = heapq.heappop(self._heap)
            del self._scores[member]
            due.append(member)
        return due

    def ordered(self) -> list[str]:
        """Every member, lowest score first (ZRANGE 0 -1)."""
        return [m for m, _ in sorted(self._scores.items(), key=lambda item: (item[1], item[0]))]


class Strings:
    """String keys with a time to live (SET ... PX, GET, PTTL). Expired keys are dropped
    when read, and all at once whenever the table has doubled since the last sweep."""

    __slots__ = ("_sweep_at", "_values")

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, float]] = {}
        self._sweep_at = 1024

    def __len__(self) -> int:
        """How many keys are live (DBSIZE would count them)."""
        now = time.monotonic()
        return sum(1 for _, expires in self._values.values() if expires > now)

    def get(self, name: str) -> str | None:
        """The value of a live key (GET)."""
        found = self._values.get(name)
        if found is None:
            return None
        if found[1] <= time.monotonic():
            del self._values[name]
            return None
        return found[0]

    def ttl(self, name: str) -> float:
        """Seconds a live key has left (PTTL); 0 when it does not exist."""
        found = self._values.get(name)
        return 0.0 if found is None else max(found[1] - time.monotonic(), 0.0)

    def set(self, name: str, value: str, ttl: float) -> None:
        """Set a key that expires in ``ttl`` seconds (SET ... PX)."""
        self._values[name] = (value, time.monotonic() + ttl)
        if len(self._values) >= self._sweep_at:
            now = time.monotonic()
            self._values = {k: v for k, v in self._values.items() if v[1] > now}
            self._sweep_at = max(2 * len(self._values), 1024)

    def clear(self) -> None:
        """Delete every key."""
        self._values.clear()


class Waiters:
    """Coroutines waiting for a wake-up: each waits on its own future, no polling."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    def __bool__(self) -> bool:
        return bool(self._futures)

    async def wait(self, timeout: float | None) -> None:
        """Return at the next :meth:`wake_all` or after ``timeout`` seconds, whichever is
        first; the caller re-checks its condition either way."""
        await wait_any([self], timeout)

    def wake_all(self) -> None:
        """Wake every waiting coroutine."""
        futures, self._futures = self._futures, []
        for future in futures:
            if not future.done():
                future.set_result(None)


async def wait_any(waiters: Sequence[Waiters], timeout: float | None) -> None:
    """Return at the next wake-up of any of ``waiters`` or after ``timeout`` seconds (one
    blocking read on several streams)."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    for waiter in waiters:
        waiter._futures.append(future)
    try:
        await asyncio.wait((future,), timeout=timeout)
    finally:
        for waiter in waiters:
            if future in waiter._futures:
                waiter._futures.remove(future)
        future.cancel()


STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
"""A stream entry id as the Redis broker accepts it in an event cursor."""


@dataclass(frozen=True, slots=True)
class EventEntry:
    """One entry of the events stream: the events one step recorded."""

    key: tuple[int, int]
    """Its id as numbers (ms, sequence): ids only go up."""
    events: tuple[Event, ...]

    @property
    def entry_id(self) -> str:
        return f"{self.key[0]}-{self.key[1]}"

    def stored(self, start: int = 0) -> list[StoredEvent]:
        """Its events from index ``start`` on, as the Redis broker reads them."""
        entry = self.entry_id
        return [
            StoredEvent(f"{entry}/{index}", self.key[0], str(e[0]), str(e[1]), tuple(e[2:]))
            for index, e in enumerate(self.events)
            if index >= start
        ]


def parse_cursor(cursor: str) -> tuple[tuple[int, int], int | None]:
    """An event cursor ``<entry id>/<index>`` or ``<entry id>/*`` as (entry key, index or
    None); raises ValueError for anything else, as the Redis broker does."""
    entry, _, index = cursor.partition("/")
    if not STREAM_ID.fullmatch(entry) or not (index == "*" or index.isdigit()):
        raise ValueError(f"not an event cursor: {cursor!r}")
    ms, _, seq = entry.partition("-")
    return (int(ms), int(seq)), None if index == "*" else int(index)


class EventLog:
    """The queue's capped events stream (XADD MAXLEN / XRANGE / XREAD): entries oldest
    first, trimmed from the front, with the waiters of blocked readers."""

    __slots__ = ("_entries", "_last", "_start", "waiters")

    def __init__(self) -> None:
        self._entries: list[EventEntry] = []
        self._start = 0
        """Entries before this index are trimmed (dropped in bulk, now and then)."""
        self._last = (0, 0)
        self.waiters = Waiters()

    def __len__(self) -> int:
        return len(self._entries) - self._start

    def add(self, cap: int, events: Sequence[Event]) -> None:
        """``flush_events``: append the events of one step as one entry and keep at most
        ``cap`` entries (cap 0: nothing is kept, nothing trimmed); wakes blocked readers."""
        if not events or cap <= 0:
            return
        ms = now_ms()
        last_ms, seq = self._last
        self._last = (ms, 0) if ms > last_ms else (last_ms, seq + 1)
        self._entries.append(EventEntry(self._last, tuple(events)))
        if len(self) > cap:
            self._start = len(self._entries) - cap
            if self._start > len(self._entries) // 2:
                del self._entries[: self._start]
                self._start = 0
        self.waiters.wake_all()

    def clear(self) -> None:
        """Delete every entry (the key is gone); ids keep going up."""
        self._entries = []
        self._start = 0

    def newest(self) -> EventEntry | None:
        """The newest entry kept, or None."""
        return self._entries[-1] if len(self) else None

    def _index_after(self, key: tuple[int, int]) -> int:
        return bisect.bisect_right(self._entries, key, lo=self._start, key=lambda e: e.key)

    def find(self, key: tuple[int, int]) -> EventEntry | None:
        """The entry with this id, if kept (XRANGE id id)."""
        index = self._index_after(key) - 1
        if index >= self._start and self._entries[index].key == key:
            return self._entries[index]
        return None

    def after(self, key: tuple[int, int], count: int) -> list[EventEntry]:
        """Up to ``count`` entries with a greater id, oldest first (XREAD COUNT)."""
        start = self._index_after(key)
        return self._entries[start : start + count]


@dataclass(eq=False)
class QueueState:
    """Everything stored for one queue of one store."""

    name: str
    jobs: dict[str, StoredJob] = field(default_factory=dict)
    ready: ReadyLanes = field(default_factory=ReadyLanes)
    """Entries not yet delivered."""
    paused_ms: int | None = None
    """When the queue was paused (the paused flag), None while it runs."""
    rates: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Rate limits: key -> (tat, tail) of its GCRA hash in microseconds (see admit in
    _prelude.lua)."""
    rate_waiters: dict[str, dict[str, int]] = field(default_factory=dict)
    """Rate limits: key -> job id -> its place among the jobs held back (µs)."""
    slots: dict[str, dict[str, int]] = field(default_factory=dict)
    """Concurrency limits: key -> job id -> when its slot's lease ends (ms)."""
    slot_waiters: dict[str, dict[str, int]] = field(default_factory=dict)
    """Concurrency limits: key -> job id -> when it started waiting for a slot (ms)."""
    pending: dict[str, PendingEntry] = field(default_factory=dict)
    """Delivered, unacknowledged entries in entry order (the consumer group's pending list)."""
    consumers: dict[str, float] = field(default_factory=dict)
    """The group's consumers: name -> ``time.monotonic()`` it was last handed an entry (as
    Redis 7.0 does, a consumer is created, and its idle time reset, only by being handed
    entries: a read that returns some, a claim that takes some)."""
    delayed: ScoredSet = field(default_factory=ScoredSet)
    dead: ScoredSet = field(default_factory=ScoredSet)
    cron: dict[str, int] = field(default_factory=dict)
    cron_runs: dict[str, str] = field(default_factory=dict)
    cron_claims: dict[str, tuple[int, object, CronClaim]] = field(default_factory=dict)
    """The cron-claims hash: name -> (fire ms, claiming broker's token, answer) of its last
    claim, so a repeated call is answered as the first one was."""
    workers: dict[str, Heartbeat] = field(default_factory=dict)
    events: EventLog = field(default_factory=EventLog)
    ready_waiters: Waiters = field(default_factory=Waiters)
    final_waiters: dict[str, Waiters] = field(default_factory=dict)
    abort_listeners: set[asyncio.Queue[str]] = field(default_factory=set)
    _expiries: list[tuple[float, str]] = field(default_factory=list)
    _last_entry: tuple[int, int] = (0, 0)
    keyed: Strings = field(default_factory=Strings)
    """Debounce and throttle slots (keyed.lua): ``mode:len(task):task:key`` -> the id of
    the job that holds the key."""
    memos: Strings = field(default_factory=Strings)
    """Answers kept for a repeat (memo keys): request id -> answer."""
    entries_added: int = 0
    """Entries ever added to the ready queue (the stream's ``entries-added``)."""
    arrivals: deque[ArrivalSample] = field(default_factory=deque)
    """The arrivals stream: samples heartbeats took, oldest first."""

    # -- job records -----------------------------------------------------------------------

    def job(self, job_id: str) -> StoredJob | None:
        """The job's record, or None if it never existed or has expired."""
        job = self.jobs.get(job_id)
        if job is not None and job.expires_at is not None and job.expires_at <= time.monotonic():
            del self.jobs[job_id]
            return None
        return job

    def expire(self, job_id: str, job: StoredJob, ttl: float) -> None:
        """Let the record expire ``ttl`` seconds from now (PEXPIRE)."""
        job.expires_at = time.monotonic() + ttl
        heapq.heappush(self._expiries, (job.expires_at, job_id))

    def sweep(self) -> None:
        """Drop every record whose time is up, so finished jobs nobody reads do not pile up."""
        now = time.monotonic()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, job_id = heapq.heappop(expiries)
            self.job(job_id)

    def size(self) -> int:
        """Unfinished jobs counted against ``max_size``: ready + pending + delayed."""
        return len(self.ready) + len(self.pending) + len(self.delayed)

    # -- ready queue -----------------------------------------------------------------------

    def add_entry(self, job_id: str) -> str:
        """Append a ready entry for the job to the lane of its priority (``push``) and wake
        blocked fetches; returns its token."""
        ms = now_ms()
        last_ms, seq = self._last_entry
        self._last_entry = (ms, 0) if ms > last_ms else (last_ms, seq + 1)
        stored = self.jobs.get(job_id)
        priority = 0 if stored is None else stored.priority
        entry = f"{self._last_entry[0]}-{self._last_entry[1]}"
        if priority:
            entry += f"@{priority}"
        self.ready.add(entry, job_id, priority)
        self.entries_added += 1
        self.ready_waiters.wake_all()
        return entry

    def deliver(self, consumer: str, count: int) -> list[tuple[str, str]]:
        """Hand up to ``count`` ready entries to ``consumer`` (XREADGROUP ``>``)."""
        now = time.monotonic()
        taken = self.ready.take(count)
        for entry, job_id in taken:
            self.pending[entry] = PendingEntry(job_id, consumer, now)
        if taken:
            self.consumers[consumer] = now
        return taken

    def own_pending(self, consumer: str) -> list[tuple[str, str]]:
        """(entry id, job id) of every entry in ``consumer``'s pending list, oldest first
        (XPENDING ... consumer)."""
        return [(e, row.job_id) for e, row in self.pending.items() if row.consumer == consumer]

    def owns(self, consumer: str, entry: str) -> bool:
        """True if ``entry`` is in ``consumer``'s pending list."""
        row = self.pending.get(entry)
        return row is not None and row.consumer == consumer

    def drop_entry(self, entry: str) -> None:
        """Acknowledge and delete an entry (XACK + XDEL)."""
        self.ready.discard(entry)
        self.pending.pop(entry, None)

    def begin(
        self,
        consumer: str,
        entries: Sequence[tuple[str, str]],
        max_deliveries: int,
        *,
        check: bool,
        ttl: float,
        cap: int,
        paused: bool = False,
        limits: Mapping[str, Limits] | None = None,
        lease_ms: int = 30_000,
        on_deferred: Callable[[], None] | None = None,
    ) -> list[Delivery]:
        """``begin.lua``: count the delivery of each entry, then run, skip or dead-letter its job.

        With ``check``, entries another consumer owns by now are left alone (lost). A
        delivery is identified by (consumer, entry): a job already running under this pair
        is returned as it stands without counting another delivery, and one dead-lettered
        under it answers dead again. An entry that is not its job's current one (stale or
        forged), or whose job is ``waiting`` for its dependencies, is skipped and dropped.
        A job fed by its dependency carries that input. A job dead-lettered here hands its
        outcome to its dependants (:meth:`flow_drain`; ``ttl``: the result TTL in seconds).
        Its events (started, dead and what the dependants did) are one entry (``cap``: the
        events cap). While the queue is ``paused``, entries are handed back unbegun. A
        job over its task's ``limits`` is deferred (:meth:`admit`), and ``on_deferred``
        called.
        """
        now = now_ms()
        ctx = FlowContext(now, ttl)
        deliveries: list[Delivery] = []
        back: list[tuple[str, str]] = []
        for entry, job_id in entries:
            if check and not self.owns(consumer, entry):
                continue  # lost: another consumer owns the entry now
            job = self.job(job_id)
            mine = job is not None and job.worker == consumer and job.entry == entry
            if job is not None and mine and job.status == "running":
                envelope = job.envelope if job.envelope is not None else b""
                deliveries.append(
                    Delivery(job_id, entry, envelope, job.attempt, job.deliveries, _input(job))
                )
                continue
            if job is not None and mine and job.status == "dead":
                self.drop_entry(entry)
                _log_dead(job_id, job.deliveries)
                continue
            if job is None or job.status in FINAL or job.status == "waiting" or job.entry != entry:
                self.drop_entry(entry)
                continue
            if paused:
                back.append((entry, job_id))
                continue
            job.deliveries += 1
            if job.deliveries > max_deliveries:
                # bury(): dead-lettered with a WorkerLost error.
                message = (
                    f"the job was handed out {job.deliveries} times; each time its worker died"
                )
                job.status = "dead"
                job.finished_ms = now
                job.worker = consumer
                job.entry = entry
                job.reason = f"worker lost {job.deliveries - 1} times"
                job.error = pack_texts(b"WorkerLost", message.encode(), b"")
                job.expires_at = None
                self.dead.add(job_id, now)
                self.drop_entry(entry)
                self.finalized(job_id)
                ctx.event(job_id, "dead", job.reason)
                ctx.work.append(job_id)
                _log_dead(job_id, job.deliveries)
                continue
            held_back = self.admit(limits, lease_ms, job_id, job, now) if limits else None
            if held_back is not None:
                # Not started: the hand-over is not counted, the attempt is not used up.
                due, why = held_back
                job.deliveries -= 1
                job.status = "scheduled"
                job.run_at_ms = due
                job.limited = why
                self.delayed.add(job_id, due)
                self.drop_entry(entry)
                ctx.event(job_id, "deferred", why, due)
                if on_deferred is not None:
                    on_deferred()
                continue
            if job.limited:
                job.limited = ""
                job.run_at_ms = None
            job.status = "running"
            job.started_ms = now
            job.worker = consumer
            job.entry = entry
            ctx.event(job_id, "started", job.attempt, consumer)
            envelope = job.envelope if job.envelope is not None else b""
            deliveries.append(
                Delivery(job_id, entry, envelope, job.attempt, job.deliveries, _input(job))
            )
        self.flow_drain(ctx)
        self.events.add(cap, ctx.events)
        self.hand_back(consumer, back)
        return deliveries

    def hand_back(self, consumer: str, entries: Sequence[tuple[str, str]]) -> int:
        """``release.lua``: give entries this consumer holds back to their lanes as fresh
        entries. Each is dropped; its job is re-queued only if the entry is still its current
        one and it is queued or running (a running one's concurrency slot is freed, and the
        cut-short delivery under this consumer is not counted). Returns how many."""
        released = 0
        for entry, job_id in entries:
            if not self.owns(consumer, entry):
                continue
            self.drop_entry(entry)
            job = self.job(job_id)
            # A job with no entry recorded counts as held by this one (as in release.lua).
            if job is None or job.entry not in ("", entry):
                continue
            if job.status not in ("queued", "running"):
                continue
            if job.status == "running" and job.worker == consumer:
                job.deliveries -= 1
            self.free_slot(job_id, job)
            job.status = "queued"
            job.entry = self.add_entry(job_id)
            released += 1
        return released

    # -- limits (admit, wake_waiter and free_slot of _prelude.lua) ---------------------------

    def admit(
        self, limits: Mapping[str, Limits], lease_ms: int, job_id: str, job: StoredJob, now: int
    ) -> tuple[int, str] | None:
        """None when the job may start now (it takes its slot and its place in the rate);
        else (when it may try again, which limit held it)."""
        task = envelope_task(job.envelope)
        spec = limits.get(task) if task is not None else None
        if spec is None or task is None:
            return None
        rate_key, slot_key = job.limit_keys or ("", "")
        rate_key, slot_key = rate_key or task, slot_key or task
        holders: dict[str, int] | None = None
        if spec.concurrency is not None:
            holders = self.slots.setdefault(slot_key, {})
            for holder, ends in list(holders.items()):
                if ends <= now:
                    del holders[holder]
            if job_id not in holders and len(holders) >= spec.concurrency:
                self.slot_waiters.setdefault(slot_key, {}).setdefault(job_id, now)
                return min(holders.values(), default=now + lease_ms), "concurrency"
        admitted_rate: tuple[int, int] | None = None
        if spec.interval_us is not None:
            now_us = time.time_ns() // 1000
            stored_tat, tail = self.rates.get(rate_key, (0, 0))
            tat = max(stored_tat, now_us)
            if tat - spec.burst_us > now_us:
                due = tat - spec.burst_us
                waiting = self.rate_waiters.setdefault(rate_key, {})
                if job.limited != "rate":
                    due = max(due, tail + spec.interval_us)
                    self.rates[rate_key] = (stored_tat, due)
                    waiting[job_id] = due
                else:
                    waiting.setdefault(job_id, due)
                    mine = (waiting[job_id], job_id)
                    due += sum(1 for j, s in waiting.items() if (s, j) < mine) * spec.interval_us
                return -(-due // 1000), "rate"
            admitted_rate = (tat + spec.interval_us, tail)
        if holders is not None:
            holders[job_id] = now + lease_ms
            self.slot_waiters.get(slot_key, {}).pop(job_id, None)
            job.slot = slot_key
        if admitted_rate is not None:
            self.rates[rate_key] = admitted_rate
            if job.limited == "rate":
                self.rate_waiters.get(rate_key, {}).pop(job_id, None)
        return None

    def wake_waiter(self, slot_key: str) -> None:
        """Send the oldest job waiting for a slot of ``slot_key`` back to the ready queue; a
        waiter keeps its place until it starts, waiters that ended or run are dropped."""
        waiters = self.slot_waiters.get(slot_key, {})
        for wid in sorted(waiters, key=lambda j: (waiters[j], j))[:20]:
            w = self.job(wid)
            if w is None or w.status not in ("queued", "scheduled"):
                del waiters[wid]
            elif (
                w.status == "scheduled" and w.limited == "concurrency" and self.delayed.discard(wid)
            ):
                w.status = "queued"
                w.entry = self.add_entry(wid)
                w.limited = ""
                w.run_at_ms = None
                return

    def free_slot(self, job_id: str, job: StoredJob) -> None:
        """Free the concurrency slot the job holds, if any, and wake the oldest waiter."""
        if job.slot is not None:
            slot_key, job.slot = job.slot, None
            self.slots.get(slot_key, {}).pop(job_id, None)
            self.wake_waiter(slot_key)

    # -- workflows (the flow functions of _prelude.lua) -------------------------------------

    def flow_final(
        self,
        ctx: FlowContext,
        wid: str,
        w: StoredJob,
        status: str,
        *,
        result: bytes | None = None,
        error: bytes | None = None,
        reason: str | None = None,
    ) -> None:
        """``flow_final``: a waiting job ends without running; its dependants are next."""
        w.status = status
        w.finished_ms = ctx.now
        if result is not None:
            w.result = result
        if error is not None:
            w.error = error
        if reason is not None:
            w.reason = reason
        self.expire(wid, w, ctx.ttl)
        self.finalized(wid)
        if reason is None:
            ctx.event(wid, "completed" if status == "complete" else status)
        else:
            ctx.event(wid, "completed" if status == "complete" else status, reason)
        ctx.work.append(wid)

    def complete_group(self, ctx: FlowContext, wid: str, w: StoredJob) -> None:
        """``complete_group``: a group node whose members have all ended completes with one
        msgpack array of their results in member order (a member that did not complete as
        extension 42), or fails when one did not and its policy is not ``pass``."""
        n = w.size
        inputs = w.inputs if w.inputs is not None else {}
        parts = [array_header(n)]
        failures = 0
        named: list[bytes] = []
        for slot in range(1, n + 1):
            value = inputs.pop(slot, b"c\xc0")
            if value[:1] == b"c":
                parts.append(value[1:])
            else:
                payload = value[1:]
                failures += 1
                parts.append(member_error(payload))
                if len(named) < 3:
                    m = _member_parts(payload)
                    named.append(m[1] + b" " + m[0] + b" (" + m[2] + b": " + clip(m[3], 200) + b")")
        if failures > 0 and w.policy != "pass":
            message = f"{failures} of {n} members failed: ".encode() + b"; ".join(named)
            if failures > len(named):
                message += b"; ..."
            error = pack_texts(b"GroupFailed", message, b"")
            reason = f"{failures} member failed" if failures == 1 else f"{failures} members failed"
            self.flow_final(ctx, wid, w, "failed", error=error, reason=reason)
        else:
            self.flow_final(ctx, wid, w, "complete", result=b"".join(parts))

    def release(self, ctx: FlowContext, wid: str, w: StoredJob) -> None:
        """``release``: a job with nothing left to wait for goes to the ready queue, or to
        the delayed set when it is due later; a group node completes (or fails)."""
        if w.kind == "group":
            self.complete_group(ctx, wid, w)
            return
        run_at = w.run_at_ms or 0
        if run_at > ctx.now:
            w.status = "scheduled"
            self.delayed.add(wid, run_at)
        else:
            w.entry = self.add_entry(wid)
            w.status = "queued"
        ctx.event(wid, "released", w.status)

    def resolve_edge(
        self, ctx: FlowContext, did: str, d: Outcome, wid: str, slot: int, born: int | None
    ) -> None:
        """``resolve_edge``: record dependency ``did``'s outcome ``d`` (status, result,
        error; status None: no such job) on dependant ``wid``'s edge ``slot``. Only the
        first outcome of an edge counts; a later one replaces the stored value. An edge
        born for another job than the one ``wid`` names now (``born`` is not its
        ``enqueued_ms``; None: the edge names no time) is ignored. Slot 0 is a gate: the
        bare status is stored and a gate that did not complete fails the dependant at once,
        whatever its policy (the scripts test the slot alone, not the kind)."""
        w = self.job(wid)
        if w is None or w.status != "waiting" or (born is not None and w.enqueued_ms != born):
            return
        status = d[0] if d[0] is not None else "missing"
        ok = status == "complete"
        value = status.encode()
        gate = slot == 0
        if w.kind == "group" and not gate:
            if ok:
                value = b"c" + (d[1] if d[1] is not None else b"\xc0")
            else:
                kind, message, tb = outcome_error(status, d[2])
                value = b"x" + pack_texts(status.encode(), did.encode(), kind, message, tb)
        elif w.feed and ok:
            value = b"c" + (d[1] if d[1] is not None else b"\xc0")
        if w.inputs is None:
            w.inputs = {}
        counted = slot in w.inputs
        w.inputs[slot] = value
        if counted:
            return
        if not ok and (w.policy == "fast" or gate):
            error = dependency_error(did, status, d[2])
            reason = f"dependency {did} {status}"
            self.flow_final(ctx, wid, w, "failed", error=error, reason=reason)
        else:
            w.pending -= 1
            if w.pending <= 0:
                self.release(ctx, wid, w)

    def flow_drain(self, ctx: FlowContext) -> None:
        """``flow_drain``: settle every edge out of the jobs in ``ctx.work`` (jobs that just
        became final), and out of the jobs that became final because of them."""
        work = ctx.work
        while work:
            did = work.pop()
            d = self.job(did)
            if d is not None and d.next:
                outcome: Outcome = (d.status, d.result, d.error)
                for wid, slot, born in list(d.next):
                    self.resolve_edge(ctx, did, outcome, wid, slot, born)

    # -- notifications ---------------------------------------------------------------------

    def finalized(self, job_id: str) -> None:
        """Wake everyone waiting for this job to end (the PUBLISH to its watchers)."""
        waiters = self.final_waiters.pop(job_id, None)
        if waiters is not None:
            waiters.wake_all()

    def publish_abort(self, job_id: str) -> None:
        """Tell every abort listener to cancel the job (PUBLISH on the abort channel)."""
        for inbox in self.abort_listeners:
            inbox.put_nowait(job_id)

    def drop_waiters(self) -> None:
        """Forget waiters and listeners of an event loop that is gone."""
        self.ready_waiters = Waiters()
        self.events.waiters = Waiters()
        self.final_waiters.clear()
        self.abort_listeners.clear()

    # -- workers ---------------------------------------------------------------------------

    def worker_alive(self, worker_id: str) -> bool:
        """True while the worker's last heartbeat has not expired (EXISTS on its key).
        Read-only: an expired heartbeat is dropped by :meth:`drop_expired_workers`."""
        beat = self.workers.get(worker_id)
        return beat is not None and beat.expires_at > time.monotonic()

    def drop_expired_workers(self) -> None:
        """Forget heartbeats that have expired (Redis expires their keys by itself)."""
        now = time.monotonic()
        for worker_id in [w for w, beat in self.workers.items() if beat.expires_at <= now]:
            del self.workers[worker_id]

    def forget_consumers(self, names: Sequence[str]) -> int:
        """``forget_consumers.lua``: remove the consumers whose worker's heartbeat is gone and
        whose pending list is empty; returns how many were removed."""
        removed = 0
        for name in names:
            if name not in self.consumers or self.worker_alive(name):
                continue
            if any(row.consumer == name for row in self.pending.values()):
                continue
            del self.consumers[name]
            removed += 1
        return removed

    # -- arrivals --------------------------------------------------------------------------

    def sample_arrivals(self) -> None:
        """A heartbeat's arrival sample: append ``entries_added`` now to the arrivals and
        drop those older than ``ARRIVALS_KEPT_MS`` (XADD ... MINID)."""
        now = now_ms()
        self.arrivals.append(ArrivalSample(now, self.entries_added))
        while self.arrivals[0].at_ms < now - ARRIVALS_KEPT_MS:
            self.arrivals.popleft()


def _input(job: StoredJob) -> bytes | None:
    """begin.lua's ``input``: what a job fed by its dependency gets (``in:1`` without its
    one-byte tag), or None."""
    if job.feed and job.inputs is not None:
        value = job.inputs.get(1)
        return None if value is None else value[1:]
    return None


def envelope_task(envelope: bytes | None) -> str | None:
    """The task name at the head of an envelope, read from its first bytes as
    ``envelope_task`` in _prelude.lua does (a signed envelope starts with \xc1 and a
    32-byte tag), or None."""
    if not envelope:
        return None
    at = 33 if envelope[0] == 0xC1 else 0
    if at >= len(envelope):
        return None
    head = envelope[at]
    if 0x90 <= head <= 0x9F:
        at += 1
    elif head == 0xDC:
        at += 3
    elif head == 0xDD:
        at += 5
    else:
        return None
    if at >= len(envelope):
        return None
    kind = envelope[at]
    if 0xA0 <= kind <= 0xBF:
        start, size = at + 1, kind - 0xA0
    elif kind == 0xD9 and at + 1 < len(envelope):
        start, size = at + 2, envelope[at + 1]
    elif kind == 0xDA and at + 2 < len(envelope):
        start, size = at + 3, int.from_bytes(envelope[at + 1 : at + 3], "big")
    else:
        return None
    return envelope[start : start + size].decode(errors="replace")


def _log_dead(job_id: str, deliveries: int) -> None:
    logger.error(
        "job %s dead-lettered: its worker was lost %d times",
        job_id,
        deliveries - 1,
        extra={"job_id": job_id},
    )


# -- workflow values, byte for byte as the scripts build them with cmsgpack --------------------


def _str_header(n: int) -> bytes:
    if n < 32:
        return bytes((0xA0 | n,))
    if n <= 0xFF:
        return bytes((0xD9, n))
    if n <= 0xFFFF:
        return b"\xda" + n.to_bytes(2, "big")
    return b"\xdb" + n.to_bytes(4, "big")


def array_header(n: int) -> bytes:
    """``array_header``: the msgpack header of an array of ``n`` values."""
    if n < 16:
        return bytes((0x90 + n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def pack_texts(*texts: bytes) -> bytes:
    """``cmsgpack.pack({...})`` of a table of strings: a msgpack array of str values (Lua
    strings are bytes, so this takes bytes)."""
    return array_header(len(texts)) + b"".join(_str_header(len(t)) + t for t in texts)


def member_error(payload: bytes) -> bytes:
    """``member_error``: a group member that did not complete, inside the group's result:
    msgpack extension 42 (ext 32 framing) holding ``payload``."""
    return b"\xc9" + len(payload).to_bytes(4, "big") + b"\x2a" + payload


class _BadData(ValueError):
    """What ``cmsgpack.unpack`` raises for bad or truncated input."""


# Numbers by their format byte; cmsgpack reads a uint 64 as a signed one, and so does this.
_FIXED = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i"}
_FIXED.update({0xD3: ">q", 0xCA: ">f", 0xCB: ">d"})


def _read(data: bytes, pos: int) -> tuple[object, int]:
    """One msgpack value at ``pos`` as ``cmsgpack`` hands it to Lua: strings as bytes,
    every number as a float, arrays as lists, maps as dicts. Like ``cmsgpack``, it knows no
    bin or ext types. Returns the value and the position after it."""
    if pos >= len(data):
        raise _BadData("Missing bytes in input.")
    b = data[pos]
    pos += 1
    if b <= 0x7F:
        return float(b), pos
    if b >= 0xE0:
        return float(b - 0x100), pos
    if b <= 0x8F:
        return _read_map(data, pos, b & 0x0F)
    if b <= 0x9F:
        return _read_array(data, pos, b & 0x0F)
    if b <= 0xBF:
        return _read_bytes(data, pos, b & 0x1F)
    if b == 0xC0:
        return None, pos
    if b in (0xC2, 0xC3):
        return b == 0xC3, pos
    if b in _FIXED:
        fmt = _FIXED[b]
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise _BadData("Missing bytes in input.")
        (number,) = struct.unpack_from(fmt, data, pos)
        return float(number), pos + size
    lengths = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}
    if b not in lengths:
        raise _BadData("Bad data format in input.")
    size = lengths[b]
    if pos + size > len(data):
        raise _BadData("Missing bytes in input.")
    n = int.from_bytes(data[pos : pos + size], "big")
    pos += size
    if b <= 0xDB:
        return _read_bytes(data, pos, n)
    if b <= 0xDD:
        return _read_array(data, pos, n)
    return _read_map(data, pos, n)


def _read_bytes(data: bytes, pos: int, n: int) -> tuple[object, int]:
    if pos + n > len(data):
        raise _BadData("Missing bytes in input.")
    return data[pos : pos + n], pos + n


def _read_array(data: bytes, pos: int, n: int) -> tuple[object, int]:
    items: list[object] = []
    for _ in range(n):
        item, pos = _read(data, pos)
        items.append(item)
    return items, pos


def _read_map(data: bytes, pos: int, n: int) -> tuple[object, int]:
    table: dict[object, object] = {}
    for _ in range(n):
        key, pos = _read(data, pos)
        value, pos = _read(data, pos)
        if key is None or (isinstance(key, float) and math.isnan(key)):
            raise _BadData("table index is nil or NaN")
        # Lua tells true from 1 and compares tables by identity.
        if isinstance(key, bool):
            key = ("boolean", key)
        elif not isinstance(key, bytes | float):
            key = object()
        table[key] = value
    return table, pos


def _lua_first(raw: bytes) -> object:
    """The first value ``cmsgpack.unpack(raw)`` returns (None for none). It decodes every
    value in ``raw``, so bad data anywhere raises _BadData."""
    values: list[object] = []
    pos = 0
    try:
        while pos < len(raw):
            value, pos = _read(raw, pos)
            values.append(value)
    except RecursionError as exc:
        raise _BadData("too deeply nested") from exc
    return values[0] if values else None


def _tostring(value: object, default: bytes) -> bytes:
    """Lua's ``tostring(value or default)`` on a value :func:`_read` gave."""
    if value is None or value is False:
        return default
    if value is True:
        return b"true"
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return b"-nan" if math.copysign(1.0, value) < 0 else b"nan"
        return b"%.14g" % value
    return b"table: 0x0"  # Lua prints a table's address


def _item(table: object, index: int) -> object:
    """``table[index]`` of a Lua table :func:`_read` gave (1-based)."""
    if isinstance(table, list):
        return table[index - 1] if index <= len(table) else None
    if isinstance(table, dict):
        return table.get(float(index))
    return None


def error_parts(raw: bytes | None) -> tuple[bytes, bytes, bytes]:
    """``error_parts``: an ErrorInfo (msgpack ``[type, message, traceback]``) as three
    strings, whatever was stored."""
    try:
        parts = _lua_first(raw if raw is not None else b"")
    except _BadData:
        return b"UnreadableError", b"", b""
    if not isinstance(parts, list | dict):
        return b"UnreadableError", b"", b""
    return (
        _tostring(_item(parts, 1), b"Error"),
        _tostring(_item(parts, 2), b""),
        _tostring(_item(parts, 3), b""),
    )


def outcome_error(status: str, raw: bytes | None) -> tuple[bytes, bytes, bytes]:
    """``outcome_error``: how a dependency that did not complete failed: its error, or what
    ended it."""
    if status == "aborted":
        return b"JobAborted", b"the job was aborted", b""
    if status == "missing":
        return b"JobNotFound", b"no job with this id", b""
    return error_parts(raw)


def clip(text: bytes, n: int) -> bytes:
    """``clip``: at most ``n`` bytes of a text, never ending inside a UTF-8 character."""
    if len(text) <= n:
        return text
    cut = text[:n]
    start = len(cut)
    while start > 1 and 0x80 <= cut[start - 1] < 0xC0:
        start -= 1
    lead = cut[start - 1]
    size = 4 if lead >= 0xF0 else 3 if lead >= 0xE0 else 2 if lead >= 0xC0 else 1
    if start + size - 1 > len(cut):
        return cut[: start - 1]
    return cut


def _member_parts(payload: bytes) -> list[bytes]:
    """The ``[status, id, type, message, traceback]`` of a member's payload (made by
    :meth:`QueueState.resolve_edge`, hence five strings)."""
    parts = _lua_first(payload)
    assert isinstance(parts, list)
    return [_tostring(part, b"") for part in parts]


def dependency_error(did: str, status: str, raw: bytes | None) -> bytes:
    """``dependency_error``: the error a dependant fails with. A dependency that itself
    failed for a dependency (a chain, a group) passes its error on unchanged, so a long
    chain never nests messages."""
    kind, message, tb = error_parts(raw)
    if raw is not None and kind in (b"DependencyFailed", b"GroupFailed"):
        return raw
    if status == "missing":
        what = f"dependency {did} does not exist".encode()
    elif status == "aborted":
        what = f"dependency {did} was aborted".encode()
    else:
        what = f"dependency {did} ended {status}: ".encode() + kind + b": " + message
    return pack_texts(b"DependencyFailed", what, tb)


class MemoryStore:
    """The queues of one ``memory://`` URL, bound to one event loop at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[str, QueueState] = {}
        # Queue name -> its partitions, once a process gave it more than one.
        self.partitions: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"MemoryStore({SCHEME + self.name!r})"

    def bind(self) -> None:
        """Check that the running loop owns this store, taking it over from a loop that has
        stopped or closed. Raises RuntimeError if another loop is running with it."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        old = self._loop
        if old is not None and not old.is_closed() and old.is_running():
            raise RuntimeError(
                f"{self!r} is in use by another running event loop; a memory:// store "
                "belongs to one event loop (use a different memory:// name per loop)"
            )
        self._loop = loop
        for state in self.queues.values():
            state.drop_waiters()

    def queue(self, name: str) -> QueueState:
        """The state of queue ``name``, created empty on first use."""
        state = self.queues.get(name)
        if state is None:
            state = self.queues[name] = QueueState(name)
        return state


_STORES: dict[str, MemoryStore] = {}


def _store_name(url: str) -> str:
    if not url.startswith(SCHEME):
        raise ValueError(f"not a {SCHEME} URL: {url!r}")
    return url[len(SCHEME) :].strip("/")


def store_for(url: str) -> MemoryStore:
    """The process-wide store of a ``memory://name`` URL, created on first use."""
    name = _store_name(url)
    store = _STORES.get(name)
    if store is None:
        store = _STORES[name] = MemoryStore(name)
    return store


def reset_stores(url: str | None = None) -> None:
    """Forget the store of ``url`` (every store when None): brokers opened afterwards on that
    URL start empty. Meant for test teardown."""
    if url is None:
        _STORES.clear()
    else:
        _STORES.pop(_store_name(url), None)
