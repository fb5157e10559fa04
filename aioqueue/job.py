"""A job as seen from the outside: its status, its stored details, and a typed handle."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import re
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from aioqueue.brokers.base import JobRecord, StoredEvent
from aioqueue.errors import (
    ConfigurationError,
    DependencyFailed,
    GroupFailed,
    JobAborted,
    JobFailed,
    JobNotFound,
    RedisUnavailable,
    ResultTimeout,
    SerializationError,
)
from aioqueue.serialization import (
    ErrorInfo,
    Signer,
    decode,
    decode_envelope,
    decode_error,
    decode_result,
)

if TYPE_CHECKING:
    from aioqueue.queue import Queue

__all__ = ["Job", "JobEvent", "JobInfo", "JobProgress", "JobStatus"]

R = TypeVar("R")


class JobStatus(str, enum.Enum):
    """Where a job is in its life.

    ``queued → running → complete`` is the happy path. ``waiting`` waits for the jobs it
    depends on (a workflow step, a group's callback); ``scheduled`` waits for its ``delay``;
    ``retrying`` waits for its backoff; ``failed`` (``Fail`` or a non-retryable error),
    ``dead`` (retries or deliveries used up, or undecodable input: kept in the dead-letter
    store) and ``aborted`` are the other final states.
    """

    WAITING = "waiting"
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETE = "complete"
    FAILED = "failed"
    DEAD = "dead"
    ABORTED = "aborted"
    NOT_FOUND = "not_found"

    @property
    def is_final(self) -> bool:
        """True once the job will not change any more."""
        return self in _FINAL


_STATUSES = frozenset(
    {"waiting", "queued", "scheduled", "running", "retrying", "complete", "failed", "dead"}
)
_FINAL_EVENTS = frozenset({"completed", "failed", "dead", "aborted"})
_CURSOR = re.compile(r"(\d{1,20})-(\d{1,20})/(\*|\d{1,9})")


def check_cursor(cursor: str) -> str:
    """An event cursor as given, or :class:`ConfigurationError` if it is none (a stream id
    ``<ms>-<seq>`` below 2**64 each, ``/``, an index or ``*``; a partitioned queue's is one
    such per partition, separated by spaces)."""
    parts = cursor.split(" ") if isinstance(cursor, str) else [None]
    matches = [_CURSOR.fullmatch(part) if part is not None else None for part in parts]
    if any(m is None or max(int(m[1]), int(m[2])) >= 2**64 for m in matches):
        raise ConfigurationError(
            f"not an event cursor: {cursor!r} (take one from an event's cursor, "
            "queue.events_cursor(), or '0-0/*' for the oldest event kept)"
        )
    return cursor


_WORKFLOW_FAILURES: dict[str, type[JobFailed]] = {
    "GroupFailed": GroupFailed,
    "DependencyFailed": DependencyFailed,
}
OUTAGE_PATIENCE = 30.0
"""Seconds ``result()`` without a timeout waits out Redis being unreachable (a failover, a
restart) before it raises RedisUnavailable."""
EVENT_WAIT = 5.0
"""Longest one blocking read of the event stream waits, in seconds."""
_FINAL = frozenset(
    {JobStatus.COMPLETE, JobStatus.FAILED, JobStatus.DEAD, JobStatus.ABORTED, JobStatus.NOT_FOUND}
)


def _when(ms: int | None) -> datetime | None:
    """A stored timestamp; None when missing or out of any calendar's range (garbage)."""
    if ms is None:
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None


class JobProgress(msgspec.Struct, frozen=True):
    """How far a running job is, as its task last reported (``ctx.progress``)."""

    fraction: float
    """From 0 to 1."""
    message: str
    at: datetime | None

    @classmethod
    def from_record(cls, record: JobRecord) -> JobProgress | None:
        """The progress stored in a record, or None."""
        if record.progress is None:
            return None
        return cls(record.progress, record.progress_message, _when(record.progress_ms))


class JobEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Something that happened to a job, from the queue's event stream.

    ``kind`` is one of ``enqueued`` (``status`` says queued, scheduled or waiting),
    ``released`` (a waiting job's dependencies ended), ``started`` (``attempt``, ``worker``),
    ``progress`` (``fraction``, ``message``), ``retrying`` (``reason``, ``attempt``: the
    next one), ``deferred`` (``reason``: the limit that held it back, ``rate`` or
    ``concurrency``; ``run_at``: when it may try again), ``completed``, ``failed`` /
    ``dead`` (``reason``) and ``aborted`` (``status``: the status it had, or ``reason``).
    Pass ``cursor`` as ``since`` to resume after it.
    """

    cursor: str
    job_id: str
    kind: str
    at: datetime | None
    status: str | None = None
    reason: str | None = None
    attempt: int | None = None
    worker: str | None = None
    fraction: float | None = None
    message: str | None = None
    run_at: datetime | None = None

    @classmethod
    def from_stored(cls, event: StoredEvent) -> JobEvent:
        """Name the details of a stored event by its kind."""
        first, second = (*event.details, None, None)[:2]
        fields: dict[str, Any] = {}
        kind = event.kind
        if kind in ("enqueued", "released"):
            fields["status"] = first
        elif kind == "started":
            fields["attempt"], fields["worker"] = first, second
        elif kind == "progress":
            fields["fraction"], fields["message"] = first, second
        elif kind == "retrying":
            fields["reason"], fields["attempt"] = first, second
        elif kind == "deferred":
            fields["reason"] = first
            if isinstance(second, int) and not isinstance(second, bool):
                fields["run_at"] = _when(second)
        elif kind == "aborted" and first in _STATUSES:
            fields["status"] = first
        elif kind in ("failed", "dead", "aborted"):
            fields["reason"] = first
        if isinstance(fields.get("fraction"), int) and not isinstance(fields["fraction"], bool):
            fields["fraction"] = float(fields["fraction"])  # Lua sends 0 and 1 as integers
        typed = {
            "status": str,
            "reason": str,
            "worker": str,
            "message": str,
            "attempt": int,
            "fraction": float,
            "run_at": datetime,
        }
        kept: dict[str, Any] = {k: v for k, v in fields.items() if isinstance(v, typed[k])}
        return cls(
            cursor=event.cursor,
            job_id=event.job_id,
            kind=kind,
            at=_when(event.at_ms),
            **kept,
        )


class JobInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Everything stored about one job, decoded."""

    id: str
    status: JobStatus
    task: str | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    attempt: int
    """The attempt running now or next (1-based)."""
    deliveries: int
    """How often the current attempt was handed to a worker (crash redeliveries included)."""
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    run_at: datetime | None
    result: Any
    error: ErrorInfo | None
    reason: str
    worker: str
    progress: JobProgress | None = None
    """The last progress the task reported, if any."""
    replaced_by: str = ""
    """Debounce: the id of the job that replaced this one (then ``aborted``, reason
    ``debounced``); empty otherwise."""

    @classmethod
    def from_record(cls, record: JobRecord, result_type: Any = Any) -> JobInfo:
        """Decode a broker record; undecodable parts are reported, never raised."""
        task: str | None = None
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        if record.envelope:
            try:
                # Shown, not run: a signature is stripped without being checked.
                envelope = decode_envelope(Signer().open(record.job_id, record.envelope))
                task, args, kwargs = envelope.task, envelope.args, envelope.kwargs
            except SerializationError:
                pass
        result = None
        if record.result is not None:
            try:
                result = decode(record.result, result_type)
            except SerializationError:
                with contextlib.suppress(SerializationError):
                    result = decode_result(record.result)
        return cls(
            id=record.job_id,
            status=_status(record.status),
            task=task,
            args=args,
            kwargs=kwargs,
            attempt=record.attempt,
            deliveries=record.deliveries,
            enqueued_at=_when(record.enqueued_ms),
            started_at=_when(record.started_ms),
            finished_at=_when(record.finished_ms),
            run_at=_when(record.run_at_ms),
            result=result,
            error=decode_error(record.error) if record.error else None,
            reason=record.reason,
            worker=record.worker,
            progress=JobProgress.from_record(record),
            replaced_by=record.replaced_by,
        )


def _status(value: str) -> JobStatus:
    try:
        return JobStatus(value)
    except ValueError:
        return JobStatus.NOT_FOUND


class Job(Generic[R]):
    """A handle on one enqueued job. Cheap to create: ``queue.job(id)`` makes one from an id.

    ``R`` is the task's return type, so ``await job.result()`` is typed.
    """

    __slots__ = ("_queue", "_result_type", "id")

    def __init__(self, queue: Queue, job_id: str, result_type: Any = Any) -> None:
        self.id = job_id
        self._queue = queue
        self._result_type = result_type

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, queue={self._queue.name!r})"

    @property
    def queue_name(self) -> str:
        """The name of the queue the job is on."""
        return self._queue.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id and other._queue is self._queue

    def __hash__(self) -> int:
        return hash(self.id)

    async def status(self) -> JobStatus:
        """The job's current status (``not_found`` once its record has expired)."""
        record = await (await self._queue.connected_broker()).record(self.id)
        return JobStatus.NOT_FOUND if record is None else _status(record.status)

    async def info(self) -> JobInfo:
        """Everything stored about the job; raises :class:`JobNotFound` if there is nothing."""
        record = await (await self._queue.connected_broker()).record(self.id)
        if record is None:
            raise JobNotFound(self.id)
        return JobInfo.from_record(record, self._result_type)

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the job to finish and return its result.

        Raises :class:`JobFailed` (with the remote error and traceback) if it failed or was
        dead-lettered, :class:`JobAborted`, :class:`JobNotFound`, or :class:`ResultTimeout`
        after ``timeout`` seconds (``None`` waits as long as it takes). Redis out of reach
        (a failover, a restart) is waited out within the timeout; without one, for
        OUTAGE_PATIENCE seconds before :class:`RedisUnavailable`. A job a debounce
        replaced gives the outcome of the job that replaced it (and so on, to the one that
        ran).
        """
        broker = await self._queue.connected_broker()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        job_id, seen = self.id, {self.id}
        outage: float | None = None
        while True:
            remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
            try:
                record = await broker.wait_final(job_id, remaining)
            except TimeoutError:
                raise ResultTimeout(self.id, timeout or 0.0) from None
            except RedisUnavailable:
                # A failover or a restart of Redis: wait it out, within the timeout (or
                # OUTAGE_PATIENCE without one), then look again.
                outage = loop.time() if outage is None else outage
                if deadline is None and loop.time() - outage > OUTAGE_PATIENCE:
                    raise
                if deadline is not None and loop.time() >= deadline:
                    raise ResultTimeout(self.id, timeout or 0.0) from None
                await asyncio.sleep(min(0.5, max((deadline or math.inf) - loop.time(), 0)))
                continue
            outage = None
            if record is None:
                raise JobNotFound(job_id)
            replacement = record.replaced_by if record.status == "aborted" else ""
            if not replacement or replacement in seen:
                break
            job_id = replacement
            seen.add(job_id)
        status = _status(record.status)
        if status is JobStatus.COMPLETE:
            data = record.result or b"\xc0"
            try:
                value: R = decode(data, self._result_type)
            except SerializationError:
                # A group's results hold members that did not complete as an extension.
                value = decode_result(data, self._result_type)
            return value
        if status is JobStatus.ABORTED:
            raise JobAborted(self.id)
        error = decode_error(record.error) if record.error else ErrorInfo("Unknown", record.reason)
        message = f"{error.message} ({record.reason})" if record.reason else error.message
        kind = _WORKFLOW_FAILURES.get(error.type, JobFailed)
        raise kind(self.id, status.value, error.type, message, error.traceback)

    async def progress(self) -> JobProgress | None:
        """The progress the task last reported (``ctx.progress``), or None."""
        record = await (await self._queue.connected_broker()).record(self.id)
        return None if record is None else JobProgress.from_record(record)

    async def events(self, *, since: str = "0-0/*") -> AsyncIterator[JobEvent]:
        """This job's events: those the queue still keeps, then each as it happens, until
        the job ends (completed, failed, dead or aborted).

        Reads the queue's event stream (see :meth:`Queue.events`), so it suits watching one
        job for a while, not thousands at once. Ends at once, after what is kept, when the
        job has ended already or does not exist."""
        broker = await self._queue.connected_broker()
        cursor, live = check_cursor(since), False
        while True:
            batch = await broker.events(cursor, 500, EVENT_WAIT if live else None)
            for stored in batch:
                cursor = stored.cursor
                if stored.kind and stored.job_id == self.id:
                    yield JobEvent.from_stored(stored)
                    if stored.kind in _FINAL_EVENTS:
                        return
            if batch:
                continue
            # Nothing new: has the job ended without an event to say so (events not kept,
            # trimmed, or the job deleted)?
            record = await broker.record(self.id)
            if record is None or record.status in _FINAL:
                # Its last events may have arrived since the read above.
                for stored in await broker.events(cursor, 500, None):
                    if stored.kind and stored.job_id == self.id:
                        yield JobEvent.from_stored(stored)
                return
            live = True

    async def abort(self) -> JobStatus:
        """Abort the job: a queued or delayed job never runs; a running one is cancelled.

        Returns the status the job had. Aborting a finished job changes nothing.
        """
        previous = await (await self._queue.connected_broker()).abort(self.id)
        return _status(previous)
