"""aioqueue: an asyncio-native job queue on Redis Streams.

Typed tasks, leases instead of visibility timeouts, retries with backoff in Redis,
dead letters, delayed jobs, and backpressure. Import everything from here::

    from aioqueue import Queue, Context, Retry
"""

from aioqueue.context import Context
from aioqueue.cron import CronJob, cron
from aioqueue.errors import (
    AccessDenied,
    AioqueueError,
    AuthenticationFailed,
    ConfigurationError,
    EnqueueError,
    EnqueueIncomplete,
    Fail,
    InvalidArguments,
    JobAborted,
    JobError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    PermissionDenied,
    QueueFull,
    RedisUnavailable,
    ResultTimeout,
    Retry,
    SerializationError,
    TLSError,
    UnknownTask,
    UnsupportedRedis,
)
from aioqueue.job import Job, JobInfo, JobStatus
from aioqueue.queue import Queue
from aioqueue.retry import Backoff
from aioqueue.settings import Settings
from aioqueue.task import JobOptions, JobRequest, Task
from aioqueue.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AioqueueError",
    "AuthenticationFailed",
    "Backoff",
    "ConfigurationError",
    "Context",
    "CronJob",
    "EnqueueError",
    "EnqueueIncomplete",
    "Fail",
    "InvalidArguments",
    "Job",
    "JobAborted",
    "JobError",
    "JobFailed",
    "JobInfo",
    "JobNotFound",
    "JobOptions",
    "JobRequest",
    "JobStatus",
    "JobTimeout",
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
    "UnsupportedRedis",
    "Worker",
    "__version__",
    "cron",
]
