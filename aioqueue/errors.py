"""Every error aioqueue raises, in one tree.

```
AioqueueError
├── ConfigurationError          bad settings or Redis URL, cron expression, import path, task
├── AccessDenied                wrong credentials, ACL rights or certificates (never retried)
│   ├── AuthenticationFailed    wrong user name or password, or none where Redis wants one
│   ├── PermissionDenied        the ACL user lacks a command, key or channel right (NOPERM)
│   └── TLSError                the TLS handshake failed on a certificate
├── RedisUnavailable            Redis cannot be reached (also a builtin ConnectionError)
│   ├── UnsupportedRedis        the server is older than Redis 7.0
│   └── EnqueueIncomplete       a bulk enqueue failed part-way; says which jobs were written
├── EnqueueError                a job was refused at enqueue; nothing was written
│   ├── QueueFull               the queue holds max_size unfinished jobs (or a batch never fits)
│   ├── WorkflowConflict        a group_id already names a different workflow
│   ├── PayloadTooLarge         the encoded job exceeds max_payload_bytes
│   ├── SerializationError      arguments or a result msgspec cannot encode
│   ├── UnknownTask             no task of that name is registered
│   └── InvalidArguments        arguments that do not fit the task's signature
├── JobError                    about one job, seen from a producer
│   ├── JobNotFound             no such job (never enqueued, or its result expired)
│   ├── JobFailed               the job ended in failure; carries the remote error
│   │   ├── GroupFailed         a group (and its callback) failed: members did not complete
│   │   └── DependencyFailed    a job waiting on others failed because one of them did
│   ├── JobAborted              the job was aborted before it completed
│   └── ResultTimeout           waiting for a result took longer than asked (also TimeoutError)
├── JobTimeout                  raised inside a worker when a task overruns its timeout
└── control flow raised by tasks:
    ├── Retry                   run this job again (after ``delay`` seconds)
    └── Fail                    stop: do not retry this job
```

Messages say what happened, to which job or task, and what to do about it.
"""

from __future__ import annotations


class AioqueueError(Exception):
    """Root of every error aioqueue raises."""


class ConfigurationError(AioqueueError):
    """A setting, cron expression, task definition or import path is invalid."""


class AccessDenied(AioqueueError):
    """Redis refused this client, or this client refused Redis: wrong credentials, missing
    ACL rights or a certificate that does not verify. Unlike :class:`RedisUnavailable` it
    does not pass by itself, so a worker meeting it at start-up exits instead of retrying."""


class AuthenticationFailed(AccessDenied):
    """Redis refused the user name and password (``WRONGPASS``), or wants one (``NOAUTH``)."""


class PermissionDenied(AccessDenied):
    """The Redis ACL user may not run a command, or touch a key or a channel (``NOPERM``).

    ``missing`` lists the ACL rules that would grant what was refused (``+xadd``,
    ``~aioqueue:{emails}:*``, ``&aioqueue:{emails}:*``), when they are known.
    """

    def __init__(self, message: str, missing: list[str] | None = None) -> None:
        self.missing = list(missing or [])
        super().__init__(message)


class TLSError(AccessDenied):
    """The TLS handshake failed on a certificate: the server's is not trusted or does not
    name the host, or the server refused this client's (or wanted one)."""


class RedisUnavailable(AioqueueError, ConnectionError):
    """Redis could not be reached or dropped the connection mid-command."""


class NotReplicated(RedisUnavailable):
    """The primary stored the change, but fewer replicas than ``wait_replicas`` confirmed it
    within ``wait_replicas_timeout``: a failover now could lose it. Repeating the call is
    safe (an enqueue with the same ``job_id`` is not written twice; a worker settles again)."""

    def __init__(self, message: str, wanted: int, confirmed: int) -> None:
        self.wanted = wanted
        self.confirmed = confirmed
        super().__init__(message)


class UnsupportedRedis(RedisUnavailable):
    """The Redis server is older than the 7.0 aioqueue needs."""


class EnqueueIncomplete(RedisUnavailable):
    """A bulk enqueue failed part-way (Redis ran out of memory or went away): ``written``
    holds the ids of the jobs that are stored, ``not_written`` those that are not, so the
    caller can retry exactly the rest."""

    def __init__(self, cause: str, written: list[str], not_written: list[str]) -> None:
        self.written = written
        self.not_written = not_written
        super().__init__(
            f"{cause}; {len(written)} of {len(written) + len(not_written)} jobs were written "
            "(see .written and .not_written)"
        )


class EnqueueError(AioqueueError):
    """A job was refused at enqueue time; nothing was written to Redis."""


class QueueFull(EnqueueError):
    """The queue already holds ``max_size`` unfinished jobs (ready, running or delayed), or
    one batch (``enqueue_many``, a workflow) holds more jobs than ``max_size`` allows."""

    def __init__(self, queue: str, max_size: int, batch: int = 0) -> None:
        self.queue = queue
        self.max_size = max_size
        self.batch = batch
        if batch > max_size:
            message = (
                f"{batch} jobs enqueued at once can never fit queue {queue!r} "
                f"(max_size {max_size}): enqueue them in smaller batches or raise max_size"
            )
        else:
            message = (
                f"queue {queue!r} is full ({max_size} unfinished jobs): "
                "retry later, add workers or raise max_size"
            )
        super().__init__(message)


class WorkflowConflict(EnqueueError):
    """A workflow names a group (``group_id``) that already exists for a different
    workflow; nothing was written."""

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        super().__init__(
            f"group {group_id!r} already exists for a different workflow: nothing was "
            "written; use another group_id (the same workflow again returns the existing one)"
        )


class PayloadTooLarge(EnqueueError):
    """The encoded job is larger than the queue's ``max_payload_bytes``."""

    def __init__(self, task: str, size: int, limit: int) -> None:
        self.task = task
        self.size = size
        self.limit = limit
        super().__init__(
            f"job for task {task!r} encodes to {size} bytes, over max_payload_bytes={limit}: "
            "pass a reference (a key, a URL) instead of the data"
        )


class SerializationError(EnqueueError):
    """A value could not be encoded or decoded with msgspec."""


class UnknownTask(EnqueueError):
    """No task with this name is registered on the queue."""

    def __init__(self, task: str, known: list[str] | None = None) -> None:
        self.task = task
        hint = f"; registered tasks: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"no task named {task!r} is registered{hint}")


class InvalidArguments(EnqueueError):
    """The arguments do not fit the task's signature or its type annotations."""


class JobError(AioqueueError):
    """An error about one job, seen from the producer's side."""

    def __init__(self, job_id: str, message: str) -> None:
        self.job_id = job_id
        super().__init__(message)


class JobNotFound(JobError):
    """No job has this id: it was never enqueued, or its result has expired."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"job {job_id!r} does not exist (never enqueued, or expired)")


class JobFailed(JobError):
    """The job ended in failure; ``error_type``, ``remote_message`` and ``traceback`` are the
    remote error's."""

    def __init__(
        self, job_id: str, status: str, error_type: str, message: str, traceback: str
    ) -> None:
        self.status = status
        self.error_type = error_type
        self.remote_message = message
        self.traceback = traceback
        super().__init__(job_id, f"job {job_id!r} {status}: {error_type}: {message}")


class GroupFailed(JobFailed):
    """A group ended with members that did not complete (``on_failure="fail"``), and so did
    the callback that waited on it; the message names the first of those members."""


class DependencyFailed(JobFailed):
    """A job waiting on others failed without running: a dependency (an earlier chain step,
    a ``depends_on`` job) failed, was dead-lettered or aborted, or does not exist."""


class JobAborted(JobError):
    """The job was aborted before it completed."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"job {job_id!r} was aborted")


class ResultTimeout(JobError, TimeoutError):
    """The job did not finish within the time the caller was willing to wait."""

    def __init__(self, job_id: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(job_id, f"job {job_id!r} did not finish within {timeout:g}s")


class JobTimeout(AioqueueError):
    """Raised inside the worker when a task runs past its timeout; the job is then retried."""


class Retry(AioqueueError):
    """Raise from a task to run the job again after ``delay`` seconds.

    Without a delay, the task's backoff policy chooses one. The retry counts as an attempt:
    once the task's ``retries`` are used up the job is dead-lettered.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None and delay < 0:
            raise ValueError("Retry delay must be >= 0")
        self.delay = delay
        self.reason = reason
        super().__init__(reason or (f"retry in {delay:g}s" if delay is not None else "retry"))


class Fail(AioqueueError):
    """Raise from a task to end the job as failed at once, without further retries."""
