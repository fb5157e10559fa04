"""Enqueue, run, result: the basic life of a job."""

from __future__ import annotations

import pytest
from conftest import RedisServer
from helpers import eventually, running

from aioqueue import ConfigurationError, Context, JobStatus, Queue
from aioqueue.errors import InvalidArguments, UnknownTask


async def test_enqueued_job_runs_and_returns_its_result(queue: Queue) -> None:
    @queue.task()
    async def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    job = await add.enqueue(1, 2)
    async with running(queue.worker(concurrency=5)):
        assert await job.result(timeout=10) == 3
    assert await job.status() is JobStatus.COMPLETE


async def test_enqueue_by_name_runs_the_registered_task(queue: Queue) -> None:
    @queue.task()
    async def greet(ctx: Context, name: str) -> str:
        return f"hello {name}"

    job = await queue.enqueue("greet", "ada")
    async with running(queue.worker()):
        assert await job.result(timeout=10) == "hello ada"


async def test_status_moves_from_queued_to_running_to_complete(queue: Queue) -> None:
    import asyncio

    release = asyncio.Event()

    @queue.task()
    async def wait(ctx: Context) -> None:
        await release.wait()

    job = await wait.enqueue()
    assert await job.status() is JobStatus.QUEUED
    async with running(queue.worker()):
        await eventually(lambda: _is(job, JobStatus.RUNNING))
        release.set()
        await job.result(timeout=10)
    assert await job.status() is JobStatus.COMPLETE
    info = await job.info()
    assert info.task == "wait"
    assert info.enqueued_at is not None
    assert info.started_at is not None
    assert info.finished_at is not None
    assert info.finished_at >= info.started_at


async def _is(job: object, status: JobStatus) -> bool:
    from aioqueue import Job

    assert isinstance(job, Job)
    return await job.status() is status


async def test_result_is_decoded_to_the_task_return_type(queue: Queue) -> None:
    @queue.task()
    async def pair(ctx: Context) -> tuple[int, str]:
        return (1, "a")

    job = await pair.enqueue()
    async with running(queue.worker()):
        assert await job.result(timeout=10) == (1, "a")


async def test_arguments_that_do_not_fit_the_signature_are_refused_at_enqueue(
    queue: Queue,
) -> None:
    @queue.task()
    async def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    with pytest.raises(InvalidArguments, match="add"):
        await queue.enqueue("add", "x", 2)
    with pytest.raises(InvalidArguments):
        await queue.enqueue("add", 1)
    with pytest.raises(UnknownTask, match="nope"):
        await queue.enqueue("nope")
    assert (await queue.counts()).ready == 0


async def test_same_job_id_enqueued_twice_runs_once(queue: Queue) -> None:
    runs: list[int] = []

    @queue.task()
    async def record(ctx: Context, n: int) -> int:
        runs.append(n)
        return n

    first = await record.options(job_id="once").enqueue(1)
    second = await record.options(job_id="once").enqueue(2)
    assert first.id == second.id == "once"
    async with running(queue.worker()):
        assert await first.result(timeout=10) == 1
        third = await record.options(job_id="once").enqueue(3)
        assert await third.result(timeout=10) == 1
    assert runs == [1]


async def test_startup_hook_state_is_visible_to_tasks(queue: Queue) -> None:
    closed: list[bool] = []

    async def open_client(state: dict[str, object]) -> None:
        state["client"] = "shared-client"

    async def close_client(state: dict[str, object]) -> None:
        closed.append(state.pop("client") == "shared-client")

    @queue.task()
    async def use(ctx: Context) -> str:
        return str(ctx.state["client"])

    job = await use.enqueue()
    worker = queue.worker(on_startup=[open_client], on_shutdown=[close_client])
    async with running(worker):
        assert await job.result(timeout=10) == "shared-client"
    assert closed == [True]


async def test_enqueue_many_of_ten_thousand_jobs_all_complete(queue: Queue) -> None:
    done: set[int] = set()

    @queue.task()
    async def mark(ctx: Context, n: int) -> None:
        done.add(n)

    jobs = await queue.enqueue_many([mark.prepare(i) for i in range(10_000)])
    assert len({job.id for job in jobs}) == 10_000
    assert (await queue.counts()).ready == 10_000
    async with running(queue.worker(concurrency=200)):
        await eventually(lambda: len(done) == 10_000, timeout=60)
        await eventually(lambda: _drained(queue), timeout=10)
    assert done == set(range(10_000))


async def _drained(queue: Queue) -> bool:
    counts = await queue.counts()
    return counts.ready == 0 and counts.pending == 0


async def test_queue_names_outside_ascii_work(redis_server: RedisServer, queue_name: str) -> None:
    queue = Queue(redis_server.url, name=f"tâche-{queue_name}-ü")

    @queue.task()
    async def echo(ctx: Context, text: str) -> str:
        return text

    job = await echo.enqueue("ça marche")
    assert (await job.info()).id == job.id
    async with running(queue.worker()):
        assert await job.result(timeout=10) == "ça marche"
    await queue.close()


def test_a_task_without_the_context_first_is_refused_at_definition() -> None:
    queue = Queue("redis://localhost:6379/0", name="defs")
    with pytest.raises(ConfigurationError, match=r"first parameter receives the job's Context"):

        @queue.task()
        async def add(a: int, b: int) -> int:
            return a + b

    with pytest.raises(ConfigurationError, match="first parameter"):

        @queue.task()
        async def nothing() -> None:
            return None


def test_a_bare_cron_decorator_is_refused() -> None:
    queue = Queue("redis://localhost:6379/0", name="defs")

    async def poll(ctx: Context) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"@queue.cron\('\*/10 \* \* \* \*'\)"):
        queue.cron(poll)  # type: ignore[arg-type]


def test_cron_arguments_are_checked_when_the_worker_is_made() -> None:
    queue = Queue("redis://localhost:6379/0", name="defs")

    @queue.cron("* * * * *", args=("x",))
    async def cleanup(ctx: Context, days: int) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"cron job 'cleanup'.*days"):
        queue.worker()
