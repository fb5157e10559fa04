"""The storage boundary: what the queue and the worker ask of a broker.

The worker never builds a storage command; it asks for "fetch n", "settle these jobs",
"renew these leases", "promote due jobs". Each call is one atomic step on the broker's side,
so a job is never half-settled. :mod:`aioqueue.brokers.redis` implements it on Redis Streams.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aioqueue.errors import RedisUnavailable


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job about to be written: its id, its encoded envelope, and when it may run: at
    ``run_at_ms`` (0 = now) and no sooner than ``delay_ms`` from now, both on the broker's
    clock, so a producer's clock cannot move a due time."""

    job_id: str
    envelope: bytes
    run_at_ms: int = 0
    delay_ms: int = 0
    flow: FlowNode | None = None
    """Its place in a workflow: what it waits for and who waits for it (None: a plain job)."""
    priority: int = 0
    """Higher runs first (docs/flow-control.md#priorities)."""
    limit_keys: tuple[str, str] | None = None
    """The keys of its task's rate and concurrency limits its producer computed from its
    arguments ('' for the task's own key); None: the task name is the key of both."""


@dataclass(frozen=True, slots=True)
class Limits:
    """One task's limits, enforced when a job would start (docs/flow-control.md)."""

    interval_us: int | None = None
    """Rate: at most one start per interval (microseconds) on average (GCRA); None: no
    rate limit."""
    burst_us: int = 0
    """Rate: how far ahead of the average starts may run (GCRA tolerance, microseconds):
    (burst - 1) intervals."""
    concurrency: int | None = None
    """At most this many running at once; None: no concurrency limit."""
    rate_count: int = 0
    rate_period_us: int = 0
    """The rate as given (``count`` starts per ``period``), which a partitioned queue shares
    out among its partitions; 0 when unknown (the interval alone is then the rate)."""


@dataclass(frozen=True, slots=True)
class FlowNode:
    """How one job of a workflow is wired (see docs/workflows.md).

    A job with dependencies is stored ``waiting`` until each has ended; a dependency hands
    its outcome to each dependant on an edge numbered by ``slot``. Edges to jobs of the same
    batch are listed on the dependency (``next``), edges to jobs that existed before on the
    dependant (``after``).
    """

    kind: str = "job"
    """``job`` runs; ``group`` never runs: it completes with its members' results."""
    policy: str = "fast"
    """When a dependency does not complete: ``fast`` fails this job at once; ``any`` runs
    it anyway; for groups, ``wait`` fails it once every member ended, ``pass`` completes it
    with the failures as values."""
    feed: bool = False
    """The (single) dependency's result becomes the first argument."""
    pending: int = 0
    """How many dependencies (edges into this job)."""
    next: tuple[tuple[str, int], ...] = ()
    """(dependant id, slot) for dependants written in the same batch."""
    after: tuple[tuple[str, int], ...] = ()
    """(dependency id, slot) for dependencies that are not in the batch."""
    size: int | None = None
    """A group's member count (its edges from slot 1 on; slot 0 is the gate of a group
    inside a chain); None: ``pending``."""
    shape: str = ""
    """For a named group: a digest of the whole workflow. Enqueueing a workflow whose named
    group exists with another digest raises :class:`~aioqueue.WorkflowConflict`."""


def counted(jobs: Sequence[NewJob]) -> int:
    """How many of ``jobs`` count toward ``max_size`` when written: not a group node, not
    waiting on other jobs."""
    return sum(
        1 for job in jobs if job.flow is None or not (job.flow.pending or job.flow.kind == "group")
    )


@dataclass(frozen=True, slots=True)
class Keyed:
    """A debounce or throttle key a job is enqueued under (docs/flow-control.md)."""

    mode: str
    """``debounce``: of the jobs enqueued for the key while the previous one still waits,
    only the last runs, ``window_ms`` after it was enqueued. ``throttle``: at most one job
    per ``window_ms`` for the key; the others are not written."""
    task: str
    """The task name: keys are per task."""
    key: str
    window_ms: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """A job handed to this worker and marked running; it now owns the job's lease."""

    job_id: str
    entry_id: str
    """The stream entry that delivered the job, as a token unique across the queue's
    priority lanes (``<entry id>`` or ``<entry id>@<priority>``)."""
    envelope: bytes
    attempt: int
    deliveries: int
    input: bytes | None = None
    """Workflows: the encoded result of the dependency that feeds this job its first
    argument (a chain's previous step, a group's callback); None for other jobs."""


@dataclass(frozen=True, slots=True)
class Done:
    """Settle as complete with an encoded result."""

    delivery: Delivery
    result: bytes


@dataclass(frozen=True, slots=True)
class Again:
    """Settle as retrying: run again ``delay_ms`` from now on the broker's clock (attempt
    + 1)."""

    delivery: Delivery
    delay_ms: int
    error: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Finished:
    """Settle in a final state other than complete: ``failed``, ``dead`` or ``aborted``."""

    delivery: Delivery
    status: str
    error: bytes
    reason: str


Settlement = Done | Again | Finished


class Recorded(enum.Enum):
    """What became of one settlement."""

    YES = "recorded"
    """The outcome is recorded."""
    LOST = "lost"
    """Refused: the lease was lost, another worker began the job and its run counts."""
    ABORTED = "aborted"
    """The job was aborted while it ran: it stays aborted whatever the outcome."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """Everything the broker stores about one job."""

    job_id: str
    status: str
    envelope: bytes | None
    attempt: int
    deliveries: int
    enqueued_ms: int | None
    started_ms: int | None
    finished_ms: int | None
    run_at_ms: int | None
    result: bytes | None
    error: bytes | None
    reason: str
    worker: str
    progress: float | None = None
    """The last fraction done the running task reported (``ctx.progress``), if any."""
    progress_message: str = ""
    progress_ms: int | None = None
    replaced_by: str = ""
    """Debounce: the job that replaced this one (it ended aborted, reason ``debounced``)."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One job event as the broker keeps it (see ``queue.events()``)."""

    cursor: str
    """Where this event is in the queue's event stream: ``<entry id>/<index>``; reading
    after it resumes with the next event."""
    at_ms: int
    job_id: str
    kind: str
    details: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What workers and health checks verify about the storage server."""

    evicting_policy: str | None
    """The ``maxmemory-policy`` when it lets the server delete keys on its own, else None."""
    persistent: bool | None
    """False when the server keeps data in memory only (no append-only file); None when
    unknown."""

    def eviction_problem(self) -> str | None:
        """One line saying why an evicting server loses jobs, or None."""
        if self.evicting_policy is None:
            return None
        return (
            f"Redis evicts keys (maxmemory-policy {self.evicting_policy}): it would delete "
            "jobs at random; set maxmemory-policy noeviction (or allow_eviction for a "
            "throwaway setup)"
        )


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Sizes of one queue at one instant."""

    ready: int
    pending: int
    delayed: int
    dead: int


@dataclass(frozen=True, slots=True)
class ArrivalSample:
    """One reading of a queue's arrivals counter, taken by a worker's heartbeat."""

    at_ms: int
    """The broker's clock when it was read."""
    added: int
    """Entries ever added to the ready stream (Redis: ``XINFO STREAM``'s ``entries-added``):
    new jobs, delayed jobs and retries that came due, requeued dead jobs. It starts again
    from 0 when the stream is deleted (a purge)."""


ARRIVALS_KEPT_MS = 120_000
"""How long a broker keeps arrival samples: two of the one-minute windows rates are taken
over, so a window always has a sample at or before its start."""


class CronClaim(enum.Enum):
    """What claiming a cron tick did."""

    CLAIMED = "claimed"
    """This worker claimed the tick and enqueued its run."""
    TAKEN = "taken"
    """Another worker had claimed it already."""
    OVERLAP = "overlap"
    """Claimed, but the run was skipped: the previous run of a unique job is unfinished."""
    EARLY = "early"
    """Not claimed: the tick is not due yet on the broker's clock."""


@dataclass(frozen=True, slots=True)
class CronRun:
    """The last claimed tick of one cron job and the record of the run it enqueued."""

    fire_ms: int | None
    job_id: str | None
    record: JobRecord | None


B = TypeVar("B", bound="WorkerBroker")


class FetchIncomplete(RedisUnavailable):
    """``fetch_many`` reached some queues and not others (in a cluster, a master of one of
    them failing): ``fetched`` is what the others gave, ``failed`` the indices of the queues
    that failed. A failed fetch may have begun entries before its reply was lost: the
    caller adopts those queues' entries."""

    def __init__(
        self, message: str, fetched: list[tuple[int, Delivery]], failed: list[int]
    ) -> None:
        self.fetched = fetched
        self.failed = failed
        super().__init__(message)


class WorkerBroker(Protocol):
    """What producers and workers need: the job lifecycle. Every method is one atomic step
    per job, and safe to repeat when a reply was lost."""

    async def connect(self) -> None:
        """Open connections and check the server; idempotent."""

    async def close(self) -> None:
        """Close every connection."""

    async def now_ms(self) -> int:
        """The broker's clock in ms: the one clock every worker agrees on."""

    async def server_facts(self) -> ServerFacts:
        """Eviction policy and persistence of the storage server."""

    async def check_access(self, role: str) -> None:
        """Raise one PermissionDenied naming every right ``role`` (producer, worker,
        monitor, operator) lacks on the storage server; change nothing."""

    async def enqueue(self, jobs: Sequence[NewJob], max_size: int) -> list[bool]:
        """Write jobs; True per job that is new, False if one with that id already exists.

        Raises QueueFull, writing nothing of the batch, if it would exceed ``max_size`` (0 =
        unlimited).
        """

    async def enqueue_keyed(self, job: NewJob, keyed: Keyed, max_size: int) -> str:
        """Write one job under a debounce or throttle key; returns the id of the job that
        answers the enqueue: ``job``'s, or (throttle, within the window) the job holding the
        key, and then nothing is written. A debounced job is scheduled ``window_ms`` from
        now and replaces the key's previous job if that one is still scheduled.

        Raises QueueFull, writing nothing, if the job would exceed ``max_size``.
        """

    def configure(
        self, limits: Mapping[str, Limits], lease_ms: int, on_deferred: Callable[[], None]
    ) -> None:
        """For a worker: its tasks' limits (by task name), its lease, and what to call when
        starting a job was deferred by a limit (the delayed set has an earlier job)."""

    async def ensure_group(self) -> None:
        """Create the stream and consumer group if they are missing."""

    async def fetch(
        self, consumer: str, count: int, block: float, max_deliveries: int
    ) -> list[Delivery]:
        """Wait up to ``block`` seconds for up to ``count`` new jobs and mark them running."""

    async def fetch_many(
        self: B,
        queues: Sequence[B],
        consumer: str,
        count: int,
        shares: Sequence[int] | None,
        block: float,
        max_deliveries: int,
    ) -> list[tuple[int, Delivery]]:
        """``fetch`` from several queues of the same storage in one step: strictly in their
        order (``shares`` None: a queue gives jobs only while the ones before it have none
        ready), or weighted (each first up to its share of ``count``, the rest in order).
        Returns (index in ``queues``, delivery) pairs; one blocking wait covers them all."""

    async def reclaim(
        self, consumer: str, count: int, min_idle: float, max_deliveries: int
    ) -> list[Delivery]:
        """Take over up to ``count`` jobs whose lease expired and mark them running. May
        return entries this consumer already runs (idle after an outage): the caller keeps
        the copy it has."""

    async def adopt(
        self, consumer: str, known: Collection[str], count: int, max_deliveries: int
    ) -> list[Delivery]:
        """Mark running up to ``count`` entries this consumer holds but are not in ``known``
        (delivered by a read or begun by a call whose reply was lost)."""

    async def settle(self, consumer: str, settlements: Sequence[Settlement]) -> list[Recorded]:
        """Record outcomes and remove the jobs from the ready stream, in one round trip.
        Returns what became of each settlement."""

    async def renew(
        self, consumer: str, deliveries: Sequence[Delivery]
    ) -> tuple[list[str], list[str]]:
        """Renew leases; returns (entry ids no longer owned, entry ids of jobs aborted)."""

    async def progress(
        self, consumer: str, delivery: Delivery, fraction: float, message: str, seq: int
    ) -> bool:
        """Store and announce a running job's progress (report number ``seq`` of this
        delivery); False when this delivery no longer runs the job."""

    async def listen_aborts(
        self, on_abort: Callable[[str], None], on_ready: Callable[[], None]
    ) -> None:
        """Call ``on_abort(job_id)`` for each abort request until cancelled."""

    async def release(self, consumer: str, keep: Collection[str] = ()) -> int:
        """Hand every job this consumer still holds back at once, except the entries in
        ``keep``; returns how many."""

    async def heartbeat(
        self, worker_id: str, info: dict[str, str | int | float], ttl: float
    ) -> None:
        """Record that a worker is alive; the record expires after ``ttl`` seconds. Also
        take an :class:`ArrivalSample` (kept about two minutes, see :meth:`arrivals`)."""

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a stopping worker's record (and its consumer, if it holds nothing)."""

    async def forget_dead_consumers(self, min_idle: float) -> int:
        """Remove consumers of workers that are gone and hold nothing; returns how many."""

    async def promote_due(self, limit: int, *, early: bool = False) -> float | None:
        """Move due delayed jobs (``early``: all delayed jobs) to the ready stream; returns
        the seconds until the next one is due, or None."""

    async def claim_tick(
        self, name: str, fire_ms: int, job: NewJob, unique: bool, lease_ms: int
    ) -> CronClaim:
        """Claim one cron tick and enqueue its run, exactly once across workers."""


class AdminBroker(Protocol):
    """What job handles, the CLI and the operations API need: looking and administering."""

    async def claim_partitions(self, queue: str, wanted: int) -> int:
        """How many partitions queue ``queue`` has on record; with none on record yet,
        record ``wanted``, unless it is more than 1 and the queue already holds jobs as a
        queue of one partition (then 1)."""

    async def record(self, job_id: str) -> JobRecord | None:
        """One job's stored state, or None."""

    async def wait_final(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """Wait without polling until the job is in a final state (or the timeout passes)."""

    async def abort(self, job_id: str) -> str:
        """Abort a job; returns the status it had (``not_found`` if none)."""

    async def abort_many(self, job_ids: Sequence[str]) -> list[str]:
        """Abort jobs in one round trip; returns the status each had."""

    async def statuses(self, job_ids: Sequence[str]) -> list[str | None]:
        """The status of each job (None: no such job), in one round trip."""

    async def dependants(self, job_id: str) -> list[str]:
        """The ids of the jobs that wait (or waited) on this one, in the order they were
        wired."""

    async def events_tail(self) -> str:
        """The cursor of the newest event kept (reading after it waits for new ones)."""

    async def events(self, after: str, count: int, block: float | None) -> list[StoredEvent]:
        """Up to about ``count`` events after cursor ``after`` (``"0-0/*"``: from the oldest
        kept), waiting up to ``block`` seconds for one when there is none (None: do not
        wait)."""

    async def pause(self, paused: bool) -> bool:
        """Pause the queue (workers start nothing new from it; enqueues still land) or
        resume it; returns whether it was paused before. Repeat-safe."""

    async def paused_since(self) -> int | None:
        """When the queue was paused (ms on the broker's clock), None while it runs."""

    async def counts(self) -> QueueCounts:
        """Sizes of the queue."""

    async def waiting(self, limit: int) -> list[JobRecord]:
        """Jobs no worker has fetched yet: ready ones in order, then delayed ones."""

    async def lag_ms(self) -> int | None:
        """Age in ms of the oldest job no worker has fetched yet, or None."""

    async def workers(self) -> list[dict[str, str]]:
        """Live workers with their heartbeat description (id, host, pid, ...)."""

    async def arrivals(self) -> list[ArrivalSample]:
        """The arrival samples heartbeats took over about the last two minutes, in no
        particular order (samples of different workers may interleave)."""

    async def purge_queue(self) -> int:
        """Delete everything stored for the queue; returns how many records went."""

    async def cron_runs(self, names: Sequence[str]) -> dict[str, CronRun]:
        """The last claimed tick and its run, per cron job name."""

    async def dead(self, offset: int, limit: int) -> list[JobRecord]:
        """Dead-lettered jobs, most recent first."""

    async def dead_ids(self) -> list[str]:
        """Every dead-lettered job id, oldest first."""

    async def requeue_dead(self, job_ids: Sequence[str]) -> int:
        """Run dead jobs again from attempt 1; returns how many were requeued."""

    async def purge_dead(self, job_ids: Sequence[str]) -> int:
        """Delete dead jobs; returns how many were deleted."""


class Broker(WorkerBroker, AdminBroker, Protocol):
    """A whole broker: the worker-facing lifecycle plus inspection and administration."""
