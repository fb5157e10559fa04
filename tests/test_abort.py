"""Abort: queued, delayed and running jobs stop; finished ones are left alone."""

from __future__ import annotations

import asyncio

import pytest
from helpers import eventually, running

from aioqueue import Context, JobAborted, JobStatus, Queue


async def test_aborting_a_running_job_cancels_it_on_its_worker(queue: Queue) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @queue.task()
    async def forever(ctx: Context) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            cancelled.set()
            raise

    job = await forever.enqueue()
    async with running(queue.worker()):
        await asyncio.wait_for(started.wait(), 10)
        assert await job.abort() is JobStatus.RUNNING
        await asyncio.wait_for(cancelled.wait(), 10)
        with pytest.raises(JobAborted):
            await job.result(timeout=10)
        await eventually(lambda: _settled(queue))
    assert await job.status() is JobStatus.ABORTED


async def _settled(queue: Queue) -> bool:
    return (await queue.counts()).pending == 0


async def test_aborted_delayed_job_never_runs(queue: Queue) -> None:
    runs: list[int] = []

    @queue.task()
    async def later(ctx: Context) -> None:
        runs.append(1)

    job = await later.options(delay=0.3).enqueue()
    assert await job.abort() is JobStatus.SCHEDULED
    assert (await queue.counts()).delayed == 0
    marker = await later.options(delay=0.5).enqueue()
    async with running(queue.worker()):
        await marker.result(timeout=10)
    assert runs == [1]
    assert await job.status() is JobStatus.ABORTED


async def test_aborted_queued_job_never_runs(queue: Queue) -> None:
    runs: list[str] = []

    @queue.task()
    async def note(ctx: Context, name: str) -> None:
        runs.append(name)

    job = await note.enqueue("aborted")
    assert await job.abort() is JobStatus.QUEUED
    after = await note.enqueue("kept")
    async with running(queue.worker()):
        await after.result(timeout=10)
    assert runs == ["kept"]


async def test_aborting_a_finished_job_changes_nothing(queue: Queue) -> None:
    @queue.task()
    async def quick(ctx: Context) -> int:
        return 7

    job = await quick.enqueue()
    async with running(queue.worker()):
        assert await job.result(timeout=10) == 7
    assert await job.abort() is JobStatus.COMPLETE
    assert await job.result(timeout=1) == 7
    assert await queue.job("never-enqueued").abort() is JobStatus.NOT_FOUND
