"""What a running task receives as its first argument."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aioqueue.errors import InvalidArguments, RedisUnavailable

if TYPE_CHECKING:
    from aioqueue.brokers.base import Delivery
    from aioqueue.queue import Queue

ProgressSink = Callable[["Delivery", float, str, int], Awaitable[bool]]
"""Stores a progress report: (delivery, fraction, message, report number) -> stored."""

__all__ = ["Context"]

logger = logging.getLogger(__name__)

MAX_PROGRESS_MESSAGE = 1_000
"""Longest progress message kept, in characters (longer ones are cut)."""


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
    report: ProgressSink | None = field(default=None, repr=False)
    """Where :meth:`progress` goes (set by the worker)."""
    delivery: Delivery | None = field(default=None, repr=False)
    """The delivery this run belongs to (set by the worker)."""
    reports: int = field(default=0, repr=False)
    """Progress reports sent so far: numbered, so a re-sent one is recognised."""

    async def progress(self, fraction: float, message: str = "") -> bool:
        """Store and announce how far the job is: ``await ctx.progress(0.4, "page 400 of
        1000")``. ``job.progress()`` reads it and ``queue.events()`` delivers it.

        Returns False when it was not stored: the job is no longer this run's (its lease
        was lost, it was aborted) or Redis is unreachable for a moment; a progress report
        never fails the job.
        """
        if not (isinstance(fraction, int | float) and math.isfinite(fraction)):
            raise InvalidArguments(f"progress must be a number from 0 to 1, not {fraction!r}")
        if not 0 <= fraction <= 1:
            raise InvalidArguments(f"progress must be from 0 to 1, not {fraction!r}")
        if self.report is None or self.delivery is None:
            return False
        self.reports += 1
        text = str(message)[:MAX_PROGRESS_MESSAGE]
        try:
            return await self.report(self.delivery, float(fraction), text, self.reports)
        except RedisUnavailable as exc:
            logger.warning("progress of job %s not stored: %s", self.job_id, exc)
            return False
