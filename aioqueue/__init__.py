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
    DependencyFailed,
    EnqueueError,
    EnqueueIncomplete,
    Fail,
    GroupFailed,
    InvalidArguments,
    JobAborted,
    JobError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NotReplicated,
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
    WorkflowConflict,
)
from aioqueue.job import Job, JobEvent, JobInfo, JobProgress, JobStatus
from aioqueue.queue import Queue
from aioqueue.retry import Backoff
from aioqueue.settings import Settings
from aioqueue.task import JobOptions, JobRequest, Task
from aioqueue.worker import Worker
from aioqueue.workflow import (
    Chain,
    Group,
    GroupJob,
    GroupStatus,
    MemberFailure,
    Partial,
    chain,
    group,
)

__version__ = "0.1.0"

__all__ = [
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
    "NotReplicated",
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
    "UnsupportedRedis",
    "Worker",
    "WorkflowConflict",
    "__version__",
    "chain",
    "cron",
    "group",
]
