"""A job as seen from the outside: its status, its stored details, and a typed handle."""

from __future__ import annotations

import contextlib
import enum
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from aioqueue.brokers.base import JobRecord
from aioqueue.errors import (
    JobAborted,
    JobFailed,
    JobNotFound,
    ResultTimeout,
    SerializationError,
)
from aioqueue.serialization import ErrorInfo, Signer, decode, decode_envelope, decode_error

if TYPE_CHECKING:
    from aioqueue.queue import Queue

__all__ = ["Job", "JobInfo", "JobStatus"]

R = TypeVar("R")


class JobStatus(str, enum.Enum):
    """Where a job is in its life.

    ``queued → running → complete`` is the happy path. ``scheduled`` waits for its ``delay``;
    ``retrying`` waits for its backoff; ``failed`` (``Fail`` or a non-retryable error),
    ``dead`` (retries or deliveries used up, or undecodable input: kept in the dead-letter
    store) and ``aborted`` are the other final states.
    """

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
                    result = decode(record.result)
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
        after ``timeout`` seconds (``None`` waits as long as it takes).
        """
        broker = await self._queue.connected_broker()
        try:
            record = await broker.wait_final(self.id, timeout)
        except TimeoutError:
            raise ResultTimeout(self.id, timeout or 0.0) from None
        if record is None:
            raise JobNotFound(self.id)
        status = _status(record.status)
        if status is JobStatus.COMPLETE:
            value: R = decode(record.result or b"\xc0", self._result_type)
            return value
        if status is JobStatus.ABORTED:
            raise JobAborted(self.id)
        error = decode_error(record.error) if record.error else ErrorInfo("Unknown", record.reason)
        message = f"{error.message} ({record.reason})" if record.reason else error.message
        raise JobFailed(self.id, status.value, error.type, message, error.traceback)

    async def abort(self) -> JobStatus:
        """Abort the job: a queued or delayed job never runs; a running one is cancelled.

        Returns the status the job had. Aborting a finished job changes nothing.
        """
        previous = await (await self._queue.connected_broker()).abort(self.id)
        return _status(previous)
