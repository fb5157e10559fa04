"""Plain ``def`` tasks run in the worker's thread pool, with the retries, timeouts, aborts,
middleware and results of async tasks; a thread the worker gave up on keeps its slot."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from helpers import eventually, running

from aioqueue import (
    Backoff,
    ConfigurationError,
    Context,
    JobAborted,
    JobFailed,
    JobStatus,
    Queue,
)
from aioqueue.testing import drain

pytestmark = pytest.mark.timeout(60)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


@pytest.fixture
async def any_queue(storage_url: str, queue_name: str) -> AsyncIterator[Queue]:
    """A queue on the suite's Redis, then on a fresh memory store."""
    queue = Queue(storage_url, name=queue_name)
    yield queue
    await queue.close()


async def tag_request(ctx: Context, call_next: Callable[[], Awaitable[Any]]) -> Any:
    """A middleware setting a contextvar, as a logging or tracing middleware would."""
    token = request_id.set(f"req-{ctx.job_id}")
    try:
        return await call_next()
    finally:
        request_id.reset(token)


@pytest.mark.timeout(30)
async def test_a_plain_def_task_runs_in_a_thread_and_returns_its_result(
    any_queue: Queue,
) -> None:
    @any_queue.task()
    def describe(ctx: Context, word: str, times: int) -> dict[str, str]:
        return {
            "text": word * times,
            "thread": threading.current_thread().name,
            "request": request_id.get(),
        }

    job = await describe.enqueue("ab", 3)
    worker = any_queue.worker(middleware=[tag_request])
    async with running(worker):
        result = await job.result(timeout=10)
    assert result["text"] == "ababab"
    assert result["thread"].startswith(f"aioqueue-{worker.id}")
    assert result["request"] == f"req-{job.id}"  # the middleware's contextvars reach the thread


@pytest.mark.timeout(30)
async def test_a_raising_plain_def_task_is_retried_with_backoff(any_queue: Queue) -> None:
    attempts: list[int] = []

    @any_queue.task(retries=3, backoff=Backoff(base=0.01, jitter=False))
    def flaky(ctx: Context) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ValueError(f"attempt {ctx.attempt} failed")
        return ctx.attempt

    job = await flaky.enqueue()
    async with running(any_queue.worker()):
        assert await job.result(timeout=10) == 3
    assert attempts == [1, 2, 3]


@pytest.mark.timeout(30)
async def test_a_plain_def_task_out_of_retries_is_dead_with_its_error(any_queue: Queue) -> None:
    @any_queue.task(retries=1, backoff=Backoff(base=0.01, jitter=False))
    def broken(ctx: Context) -> None:
        raise KeyError("missing")

    job = await broken.enqueue()
    async with running(any_queue.worker()):
        with pytest.raises(JobFailed) as failed:
            await job.result(timeout=10)
    assert (failed.value.status, failed.value.error_type) == ("dead", "KeyError")


@pytest.mark.timeout(30)
async def test_a_timed_out_thread_is_settled_at_once_and_holds_its_slot_until_it_returns(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    lock = threading.Lock()
    active = 0
    peak = 0
    events: dict[str, float] = {}

    def enter() -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)

    def leave() -> None:
        nonlocal active
        with lock:
            active -= 1

    @queue.task(timeout=0.3, retries=1, backoff=Backoff(base=0.01, jitter=False))
    def slow(ctx: Context) -> int:
        enter()
        try:
            events[f"start {ctx.attempt}"] = time.monotonic()
            if ctx.attempt == 1:
                time.sleep(1.5)  # cannot be interrupted: outlives its timeout
            return ctx.attempt
        finally:
            events[f"return {ctx.attempt}"] = time.monotonic()
            leave()

    @queue.task()
    def quick(ctx: Context) -> str:
        enter()
        events["quick"] = time.monotonic()
        leave()
        return "quick"

    job = await slow.enqueue()
    other = await quick.enqueue()
    with caplog.at_level(logging.INFO, logger="aioqueue"):
        async with running(queue.worker(concurrency=1)):
            await eventually(lambda: "start 1" in events)
            # The timeout is recorded (a retry, per the task's policy) while the thread sleeps.
            await eventually(
                lambda: _status_is(queue, job.id, JobStatus.RETRYING, JobStatus.QUEUED)
            )
            assert "return 1" not in events
            assert await job.result(timeout=20) == 2
            assert await other.result(timeout=20) == "quick"
    # Nothing else started on the worker's one slot before the abandoned thread returned.
    assert peak == 1
    assert events["start 2"] >= events["return 1"]
    assert events["quick"] >= events["return 1"]
    info = await job.info()
    assert info.attempt == 2
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if job.id in r.getMessage()]
    assert any(
        level == logging.WARNING and "ran past its timeout" in message
        for level, message in messages
    )
    assert any("left behind returned" in message for _, message in messages)


async def _status_is(queue: Queue, job_id: str, *statuses: JobStatus) -> bool:
    return await queue.job(job_id).status() in statuses


@pytest.mark.timeout(30)
async def test_plain_def_jobs_run_in_parallel_up_to_the_pool_size(any_queue: Queue) -> None:
    lock = threading.Lock()
    active = 0
    peak = 0

    @any_queue.task()
    def busy(ctx: Context) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.2)
        with lock:
            active -= 1

    jobs = await any_queue.enqueue_many([busy.prepare() for _ in range(16)])
    async with running(any_queue.worker(concurrency=20, sync_threads=4)):
        for job in jobs:
            await any_queue.job(job.id).result(timeout=20)
    assert peak == 4


@pytest.mark.timeout(30)
async def test_aborting_a_running_plain_def_job_settles_it_aborted(any_queue: Queue) -> None:
    started = threading.Event()
    noticed = threading.Event()

    @any_queue.task()
    def poll(ctx: Context) -> str:
        started.set()
        deadline = time.monotonic() + 20
        while not ctx.cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)
        if ctx.cancelled():
            noticed.set()
        return "ignored"

    job = await poll.enqueue()
    async with running(any_queue.worker()):
        await eventually(started.is_set)
        assert await job.abort() is JobStatus.RUNNING
        with pytest.raises(JobAborted):
            await job.result(timeout=10)
        await eventually(noticed.is_set)
    assert await job.status() is JobStatus.ABORTED


@pytest.mark.timeout(30)
async def test_a_plain_def_job_cancelled_at_shutdown_is_handed_back_once_its_thread_returns(
    queue: Queue,
) -> None:
    started = threading.Event()
    returned: list[float] = []

    @queue.task()
    def stubborn(ctx: Context) -> None:
        started.set()
        while not ctx.cancelled():
            time.sleep(0.01)
        time.sleep(0.5)  # cleaning up after noticing
        returned.append(time.monotonic())

    job = await stubborn.enqueue()
    async with running(queue.worker(shutdown_grace=0.1)):
        await eventually(started.is_set)
    stopped = time.monotonic()
    assert returned
    assert returned[0] <= stopped
    # Handed back, not settled: what a cancelled thread returns is ignored.
    assert await job.status() is JobStatus.QUEUED


@pytest.mark.timeout(30)
async def test_ctx_run_awaits_progress_and_sub_jobs_from_the_thread(any_queue: Queue) -> None:
    @any_queue.task()
    async def double(ctx: Context, n: int) -> int:
        return 2 * n

    @any_queue.task()
    def parent(ctx: Context, n: int) -> str:
        assert ctx.run(ctx.progress(0.5, "half way"))
        child = ctx.run(double.enqueue(n))
        return child.id

    job = await parent.enqueue(21)
    async with running(any_queue.worker()):
        child_id = await job.result(timeout=10)
        assert await any_queue.job(child_id).result(timeout=10) == 42
    progress = await job.progress()
    assert progress is not None
    assert progress.message == "half way"


async def test_ctx_run_refuses_to_wait_on_the_loop_it_runs_on(queue: Queue) -> None:
    ctx = Context(
        job_id="j",
        task_name="t",
        attempt=1,
        deliveries=1,
        queue=queue,
        loop=asyncio.get_running_loop(),
    )
    with pytest.raises(ConfigurationError, match="would wait for itself"):
        ctx.run(asyncio.sleep(0))
    without_loop = Context(job_id="j", task_name="t", attempt=1, deliveries=1, queue=queue)
    with pytest.raises(ConfigurationError, match="plain def tasks"):
        without_loop.run(asyncio.sleep(0))


async def test_calling_a_plain_def_task_directly_runs_it_in_a_thread(queue: Queue) -> None:
    @queue.task()
    async def double(ctx: Context, n: int) -> int:
        return 2 * n

    @queue.task()
    def thread_and_double(ctx: Context, n: int) -> tuple[bool, int]:
        on_main = threading.current_thread() is threading.main_thread()
        return on_main, ctx.run(double(ctx, n))

    ctx = Context(
        job_id="direct", task_name="thread_and_double", attempt=1, deliveries=1, queue=queue
    )
    assert await thread_and_double(ctx, 4) == (False, 8)


async def test_drain_runs_plain_def_tasks_too() -> None:
    queue = Queue(f"memory://{uuid.uuid4().hex}", name="drain")

    @queue.task()
    def square(ctx: Context, n: int) -> int:
        return n * n

    job = await square.enqueue(7)
    (info,) = await drain(queue)
    assert info.status is JobStatus.COMPLETE
    assert await job.result(timeout=5) == 49
    await queue.close()


async def test_a_plain_def_returning_a_coroutine_fails_saying_to_use_async_def() -> None:
    queue = Queue(f"memory://{uuid.uuid4().hex}", name="wrapped")

    async def work(ctx: Context) -> int:
        return 1

    @queue.task(retries=3)
    def wrapper(ctx: Context) -> Any:  # a decorator that lost the async def
        return work(ctx)

    job = await wrapper.enqueue()
    (info,) = await drain(queue)
    assert info.status is JobStatus.FAILED
    assert info.error is not None
    assert "async def" in info.error.message
    with pytest.raises(JobFailed):
        await job.result(timeout=5)
    await queue.close()


def test_generators_and_async_callable_objects_are_refused_as_tasks() -> None:
    queue = Queue("memory://refusals")

    def numbers(ctx: Context) -> Any:
        yield 1

    class Handler:
        async def __call__(self, ctx: Context) -> None: ...

    with pytest.raises(ConfigurationError, match="generator function"):
        queue.task()(numbers)
    with pytest.raises(ConfigurationError, match=r"must be a function \(async def or def\)"):
        queue.task(name="handler")(Handler())
    with pytest.raises(ConfigurationError, match=r"write def no_context\(ctx: Context"):

        @queue.task()
        def no_context() -> None: ...


def test_the_pool_size_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    queue = Queue("memory://settings")
    assert queue.worker().settings.sync_threads == 32
    assert queue.worker(sync_threads=3).settings.sync_threads == 3
    monkeypatch.setenv("AIOQUEUE_SYNC_THREADS", "5")
    assert queue.worker().settings.sync_threads == 5
    monkeypatch.setenv("AIOQUEUE_SYNC_THREADS", "0")
    with pytest.raises(ConfigurationError, match="sync_threads"):
        queue.worker()
