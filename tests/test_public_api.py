"""The public surface is exactly what ``aioqueue.__all__`` lists, sorted and importable."""

from __future__ import annotations

import aioqueue


def test_all_is_sorted_and_every_name_exists() -> None:
    assert aioqueue.__all__ == sorted(aioqueue.__all__)
    for name in aioqueue.__all__:
        assert hasattr(aioqueue, name), name


def test_public_names_are_pinned() -> None:
    assert set(aioqueue.__all__) == {
        "AccessDenied",
        "AioqueueError",
        "AuthenticationFailed",
        "Backoff",
        "Chain",
        "ConfigurationError",
        "Context",
        "CronJob",
        "DependencyFailed",
        "EnqueueError",
        "EnqueueIncomplete",
        "Fail",
        "Group",
        "GroupFailed",
        "GroupJob",
        "GroupStatus",
        "InvalidArguments",
        "Job",
        "JobAborted",
        "JobError",
        "JobEvent",
        "JobFailed",
        "JobInfo",
        "JobNotFound",
        "JobOptions",
        "JobProgress",
        "JobRequest",
        "JobStatus",
        "JobTimeout",
        "MemberFailure",
        "Partial",
        "PayloadTooLarge",
        "PermissionDenied",
        "Queue",
        "QueueFull",
        "RedisUnavailable",
        "ResultTimeout",
        "Retry",
        "SerializationError",
        "Settings",
        "TLSError",
        "Task",
        "UnknownTask",
        "NotReplicated",
        "UnsupportedRedis",
        "Worker",
        "WorkflowConflict",
        "__version__",
        "chain",
        "cron",
        "group",
    }


def test_every_error_derives_from_aioqueue_error() -> None:
    errors = [getattr(aioqueue, n) for n in aioqueue.__all__ if n.endswith(("Error", "Full"))]
    for error in errors:
        assert issubclass(error, aioqueue.AioqueueError), error
    assert issubclass(aioqueue.RedisUnavailable, ConnectionError)
    assert issubclass(aioqueue.ResultTimeout, TimeoutError)
    for error in (aioqueue.AuthenticationFailed, aioqueue.PermissionDenied, aioqueue.TLSError):
        assert issubclass(error, aioqueue.AccessDenied), error
        assert not issubclass(error, aioqueue.RedisUnavailable), error
