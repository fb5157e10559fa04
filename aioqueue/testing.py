"""Helpers for testing code that uses aioqueue.

Point a queue at a private in-memory store, let the code under test enqueue, look at what it
enqueued, then run those jobs to completion in the test's own event loop::

    from aioqueue.testing import drain, enqueued, isolated

    async def test_signup_sends_a_welcome_email() -> None:
        async with isolated(queue):               # a fresh memory:// store, restored after
            await signup("ada@example.com")       # the code under test enqueues
            (job,) = await enqueued(queue)
            assert (job.task, job.args) == ("send_welcome", ("ada@example.com",))
            (done,) = await drain(queue)          # runs it here, now
            assert done.status is JobStatus.COMPLETE

The pytest plugin (installed with aioqueue) offers the same as a fixture,
``aioqueue_memory``: call it with a queue to isolate that queue for the test.

``drain`` runs jobs through the same code a worker uses (argument checking, timeouts,
retries, dead letters), one job at a time and in order, so tests are deterministic. It
does not need a worker process or Redis; the same helpers work against a real Redis queue
too (pass ``url=`` to :func:`isolated`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Any

import msgspec

from aioqueue.execution import Running, execute
from aioqueue.job import JobInfo
from aioqueue.queue import Queue
from aioqueue.task import Task

__all__ = ["drain", "enqueued", "isolated", "use_memory"]

CONSUMER = "aioqueue-testing"


class Restore:
    """Undoes :func:`use_memory`: the queue goes back to its own settings and broker."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._settings = queue.settings
        self._name = queue.name
        self._broker = queue._broker
        self._connected = queue._connected

    def __call__(self) -> None:
        self.queue.settings = self._settings
        self.queue.name = self._name
        self.queue._broker = self._broker
        self.queue._connected = self._connected


def use_memory(queue: Queue, url: str | None = None) -> Restore:
    """Point ``queue`` at a fresh, private store (``memory://`` unless ``url`` is given,
    e.g. a test Redis) and return a callable that restores it."""
    restore = Restore(queue)
    target = url or f"memory://aioqueue-test-{uuid.uuid4().hex}"
    name = queue.name if url is None else f"{queue.name}-test-{uuid.uuid4().hex[:8]}"
    queue.settings = msgspec.structs.replace(queue.settings, redis_url=target, queue=name)
    queue.name = name
    queue._broker = None
    queue._connected = False
    return restore


@contextlib.asynccontextmanager
async def isolated(queue: Queue, url: str | None = None) -> AsyncIterator[Queue]:
    """Use a private store for ``queue`` inside the block; see :func:`use_memory`."""
    restore = use_memory(queue, url)
    try:
        yield queue
    finally:
        if url is not None:
            with contextlib.suppress(Exception):
                await queue.purge()
        await queue.close()
        restore()


def _task_name(task: str | Task[Any, Any] | None) -> str | None:
    return task.name if isinstance(task, Task) else task


async def enqueued(
    queue: Queue, task: str | Task[Any, Any] | None = None, *, limit: int = 10_000
) -> list[JobInfo]:
    """Jobs waiting to run (ready, then delayed), optionally only those of one task."""
    broker = await queue.connected_broker()
    name = _task_name(task)
    infos = [JobInfo.from_record(record) for record in await broker.waiting(limit)]
    return [info for info in infos if name is None or info.task == name]


async def drain(
    queue: Queue,
    *,
    include_delayed: bool = True,
    state: Mapping[str, Any] | None = None,
    max_jobs: int = 10_000,
) -> list[JobInfo]:
    """Run every waiting job to completion, one at a time in order, and return what became
    of each run (its final or retrying state).

    With ``include_delayed`` (the default) delayed jobs and retry backoffs count as due at
    once, so a job that keeps failing is retried until it is dead-lettered. Jobs enqueued by
    the jobs that run (fan-out) run too. ``state`` is what ``on_startup`` hooks would have
    put in ``ctx.state``.
    """
    broker = await queue.connected_broker()
    await broker.ensure_group()
    shared = dict(state or {})
    ran: list[str] = []
    while len(ran) < max_jobs:
        if include_delayed:
            await broker.promote_due(max_jobs, early=True)
        deliveries = await broker.fetch(CONSUMER, 1, 0.001, max_deliveries=1_000)
        if not deliveries:
            break
        (delivery,) = deliveries
        running = Running(delivery)
        # A task of its own, so the job's timeout can cancel it as a worker's would.
        run = asyncio.create_task(
            execute(running, queue, shared, report=partial(broker.progress, CONSUMER))
        )
        running.task = run
        settlement = await run
        if settlement is not None:
            await broker.settle(CONSUMER, [settlement])
        ran.append(delivery.job_id)
    infos: list[JobInfo] = []
    for job_id in ran:
        info = await queue.job(job_id).info()
        infos.append(info)
    return infos
