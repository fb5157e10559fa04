"""What a running task receives as its first argument."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aioqueue.queue import Queue

__all__ = ["Context"]


@dataclass(slots=True)
class Context:
    """The job being run and the worker's shared state.

    ``state`` is one dict per worker, filled by ``on_startup`` hooks with shared resources
    (an HTTP client, a database pool) and read by tasks: ``ctx.state["http"]``. Sub-jobs are
    enqueued as usual, with ``await other_task.enqueue(...)`` or ``ctx.queue.enqueue(...)``.
    """

    job_id: str
    task_name: str
    attempt: int
    """1 on the first run, 2 on the first retry, and so on."""
    deliveries: int
    """How often this attempt has been handed to a worker; above 1 after a worker was lost."""
    queue: Queue
    state: dict[str, Any] = field(default_factory=dict)
    enqueued_at: datetime | None = None
    fire_time: datetime | None = None
    """For cron runs, the scheduled time of the tick this run belongs to."""
    trace: dict[str, str] | None = None
    """The trace context the producer attached at enqueue (see ``Queue(trace_context=...)``)."""
