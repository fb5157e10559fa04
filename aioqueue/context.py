"""What a running task receives as its first argument."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from aioqueue.errors import ConfigurationError, InvalidArguments, RedisUnavailable

if TYPE_CHECKING:
    from aioqueue.brokers.base import Delivery
    from aioqueue.execution import Running
    from aioqueue.queue import Queue

T = TypeVar("T")

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

    A plain ``def`` task runs in a thread: it notices cancellation with :meth:`cancelled`
    and awaits the coroutine methods (``progress``, enqueueing) through :meth:`run`.
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
    running: Running | None = field(default=None, repr=False)
    """The worker's record of this run, which says when it was cancelled (set by the worker)."""
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    """The worker's event loop, where :meth:`run` sends coroutines (set for plain ``def``
    tasks)."""

    def cancelled(self) -> bool:
        """True once the worker stopped waiting for this run: its timeout passed, it was
        aborted, the worker is shutting down or lost the job's lease.

        For plain ``def`` tasks, whose thread cannot be interrupted: check it between steps
        and return (or raise) when it turns True; what the run returns from then on is
        ignored. An async task is cancelled at its next ``await`` instead.
        """
        return self.running is not None and self.running.cancel_reason is not None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """From a plain ``def`` task: run ``coroutine`` on the worker's event loop and wait
        for its result (or exception), for instance
        ``ctx.run(ctx.progress(0.5))`` or ``job = ctx.run(other_task.enqueue(7))``.

        Raises :class:`ConfigurationError` when called on the event loop itself (an async
        task awaits instead) or with no worker loop to run on.
        """
        loop = self.loop
        if loop is None:
            problem = "ctx.run is for plain def tasks, run by a worker or by awaiting the task"
        elif _on_loop(loop):
            problem = "ctx.run called on the event loop would wait for itself: await instead"
        else:
            return asyncio.run_coroutine_threadsafe(coroutine, loop).result()
        coroutine.close()
        raise ConfigurationError(f"job {self.job_id}: {problem}")

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


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread is running ``loop``."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
