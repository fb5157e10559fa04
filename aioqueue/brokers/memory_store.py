"""The state behind the ``memory://`` broker: what Redis holds for a queue, in process memory.

Each Redis structure has a counterpart here, so the broker can follow the Lua scripts line by
line:

==========================  ========================================================
Redis                       here
==========================  ========================================================
job hash (with TTL)         :class:`StoredJob` in :attr:`QueueState.jobs`, ``expires_at``
stream + consumer group     :attr:`QueueState.ready` (entries not yet delivered),
                            :attr:`QueueState.pending` (the pending list: owner and
                            last delivery or claim, hence idle time) and
                            :attr:`QueueState.consumers` (the group's consumers)
delayed / dead zsets        :class:`ScoredSet`
cron zset / cron-runs hash  :attr:`QueueState.cron` / :attr:`QueueState.cron_runs`
cron-claims hash            :attr:`QueueState.cron_claims`
worker heartbeat keys       :attr:`QueueState.workers`, each with an expiry
pub/sub channels            :class:`Waiters` (result waits, blocked fetches) and one
                            :class:`asyncio.Queue` per abort listener
==========================  ========================================================

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
import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from aioqueue.brokers.base import CronClaim, Delivery, JobRecord

__all__ = [
    "FINAL",
    "SCHEME",
    "Heartbeat",
    "MemoryStore",
    "PendingEntry",
    "QueueState",
    "ScoredSet",
    "StoredJob",
    "Waiters",
    "now_ms",
    "reset_stores",
    "store_for",
]

logger = logging.getLogger("aioqueue.brokers.memory")

SCHEME = "memory://"
FINAL = frozenset({"complete", "failed", "dead", "aborted"})


def now_ms() -> int:
    """Wall-clock time in Unix ms: the clock every stored timestamp and delay uses."""
    return int(time.time() * 1000)


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
    worker: str = ""
    """The consumer that began the current delivery (settling checks it)."""
    entry: str = ""
    """The ready-queue entry of the current delivery (settling checks it)."""
    settled: tuple[str, str] | None = None
    """(consumer, entry) whose outcome was recorded last: a repeat of it answers recorded."""
    expires_at: float | None = None
    """``time.monotonic()`` deadline after which the record is gone; None = kept."""

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
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.append(future)
        try:
            await asyncio.wait((future,), timeout=timeout)
        finally:
            if future in self._futures:
                self._futures.remove(future)
            future.cancel()

    def wake_all(self) -> None:
        """Wake every waiting coroutine."""
        futures, self._futures = self._futures, []
        for future in futures:
            if not future.done():
                future.set_result(None)


@dataclass(eq=False)
class QueueState:
    """Everything stored for one queue of one store."""

    name: str
    jobs: dict[str, StoredJob] = field(default_factory=dict)
    ready: OrderedDict[str, str] = field(default_factory=OrderedDict)
    """Entries not yet delivered, oldest first: entry id -> job id."""
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
    ready_waiters: Waiters = field(default_factory=Waiters)
    final_waiters: dict[str, Waiters] = field(default_factory=dict)
    abort_listeners: set[asyncio.Queue[str]] = field(default_factory=set)
    _expiries: list[tuple[float, str]] = field(default_factory=list)
    _last_entry: tuple[int, int] = (0, 0)

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
        """Append a ready entry for the job (XADD) and wake blocked fetches; returns its id."""
        ms = now_ms()
        last_ms, seq = self._last_entry
        self._last_entry = (ms, 0) if ms > last_ms else (last_ms, seq + 1)
        entry = f"{self._last_entry[0]}-{self._last_entry[1]}"
        self.ready[entry] = job_id
        self.ready_waiters.wake_all()
        return entry

    def deliver(self, consumer: str, count: int) -> list[tuple[str, str]]:
        """Hand up to ``count`` ready entries to ``consumer`` (XREADGROUP ``>``)."""
        taken: list[tuple[str, str]] = []
        now = time.monotonic()
        while self.ready and (count <= 0 or len(taken) < count):
            entry, job_id = self.ready.popitem(last=False)
            self.pending[entry] = PendingEntry(job_id, consumer, now)
            taken.append((entry, job_id))
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
        self.ready.pop(entry, None)
        self.pending.pop(entry, None)

    def begin(
        self,
        consumer: str,
        entries: Sequence[tuple[str, str]],
        max_deliveries: int,
        *,
        check: bool,
    ) -> list[Delivery]:
        """``begin.lua``: count the delivery of each entry, then run, skip or dead-letter its job.

        With ``check``, entries another consumer owns by now are left alone (lost). A
        delivery is identified by (consumer, entry): a job already running under this pair
        is returned as it stands without counting another delivery, and one dead-lettered
        under it answers dead again. An entry that is not its job's current one (stale or
        forged) is skipped and dropped.
        """
        now = now_ms()
        deliveries: list[Delivery] = []
        for entry, job_id in entries:
            if check and not self.owns(consumer, entry):
                continue  # lost: another consumer owns the entry now
            job = self.job(job_id)
            mine = job is not None and job.worker == consumer and job.entry == entry
            if job is not None and mine and job.status == "running":
                envelope = job.envelope if job.envelope is not None else b""
                deliveries.append(Delivery(job_id, entry, envelope, job.attempt, job.deliveries))
                continue
            if job is not None and mine and job.status == "dead":
                self.drop_entry(entry)
                _log_dead(job_id, job.deliveries)
                continue
            if job is None or job.status in FINAL or job.entry != entry:
                self.drop_entry(entry)
                continue
            job.deliveries += 1
            if job.deliveries > max_deliveries:
                job.status = "dead"
                job.finished_ms = now
                job.worker = consumer
                job.reason = f"worker lost {job.deliveries - 1} times"
                job.expires_at = None
                self.dead.add(job_id, now)
                self.drop_entry(entry)
                self.finalized(job_id)
                _log_dead(job_id, job.deliveries)
                continue
            job.status = "running"
            job.started_ms = now
            job.worker = consumer
            job.entry = entry
            envelope = job.envelope if job.envelope is not None else b""
            deliveries.append(Delivery(job_id, entry, envelope, job.attempt, job.deliveries))
        return deliveries

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


def _log_dead(job_id: str, deliveries: int) -> None:
    logger.error(
        "job %s dead-lettered: its worker was lost %d times",
        job_id,
        deliveries - 1,
        extra={"job_id": job_id},
    )


class MemoryStore:
    """The queues of one ``memory://`` URL, bound to one event loop at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[str, QueueState] = {}
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
