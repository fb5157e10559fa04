"""aioqueue.testing: isolate a queue, see what was enqueued, run it to completion."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conftest import RedisServer

from aioqueue import Context, JobStatus, Queue
from aioqueue.testing import drain, enqueued, isolated, use_memory


def make_app() -> tuple[Queue, dict[str, list[str]]]:
    """A queue as user code would define it at import time, pointing at a Redis that does
    not exist: the helpers must never touch it."""
    queue = Queue("redis://127.0.0.1:1/0", name="app")
    sent: dict[str, list[str]] = {"welcome": [], "digest": []}

    @queue.task()
    async def send_welcome(ctx: Context, email: str) -> str:
        sent["welcome"].append(email)
        return f"sent to {email}"

    @queue.task()
    async def send_digests(ctx: Context, emails: list[str]) -> int:
        await send_welcome.map([(e,) for e in emails])
        sent["digest"].extend(emails)
        return len(emails)

    @queue.task(retries=2)
    async def flaky(ctx: Context) -> None:
        raise ConnectionError("down")

    @queue.task(retries=0, timeout=0.05)
    async def slow(ctx: Context) -> None:
        await asyncio.Event().wait()  # until cancelled

    return queue, sent


async def test_enqueued_jobs_can_be_inspected_then_run() -> None:
    queue, sent = make_app()
    async with isolated(queue):
        await queue.enqueue("send_welcome", "ada@example.com")
        await queue.options(delay=3600).enqueue("send_welcome", "bob@example.com")
        waiting = await enqueued(queue, "send_welcome")
        assert [(job.task, job.args) for job in waiting] == [
            ("send_welcome", ("ada@example.com",)),
            ("send_welcome", ("bob@example.com",)),
        ]
        done = await drain(queue)
        assert [job.status for job in done] == [JobStatus.COMPLETE, JobStatus.COMPLETE]
        assert done[0].result == "sent to ada@example.com"
        assert sent["welcome"] == ["ada@example.com", "bob@example.com"]
        assert await enqueued(queue) == []
    assert queue.settings.redis_url == "redis://127.0.0.1:1/0"


async def test_drain_runs_the_sub_jobs_a_job_fans_out() -> None:
    queue, sent = make_app()
    async with isolated(queue):
        await queue.enqueue("send_digests", ["a@x", "b@x", "c@x"])
        done = await drain(queue)
        assert [job.task for job in done] == ["send_digests"] + ["send_welcome"] * 3
        assert sorted(sent["welcome"]) == ["a@x", "b@x", "c@x"]


async def test_drain_retries_a_failing_job_until_it_is_dead() -> None:
    queue, _ = make_app()
    async with isolated(queue):
        await queue.enqueue("flaky")
        runs = await drain(queue)
        assert [job.status for job in runs] == [JobStatus.DEAD] * 3
        assert runs[-1].reason == "retries exhausted after 3 attempts"
        (dead,) = await queue.dead_letters()
        assert dead.error is not None
        assert dead.error.type == "ConnectionError"


async def test_drain_applies_task_timeouts() -> None:
    queue, _ = make_app()
    async with isolated(queue):
        await queue.enqueue("slow")
        (run,) = await drain(queue)
        assert run.status is JobStatus.DEAD
        assert run.error is not None
        assert "timeout" in run.error.message


async def test_isolated_works_against_a_real_redis_with_a_private_queue_name(
    redis_server: RedisServer,
) -> None:
    queue, sent = make_app()
    async with isolated(queue, url=redis_server.url):
        assert queue.name.startswith("app-test-")
        await queue.enqueue("send_welcome", "eve@example.com")
        (done,) = await drain(queue)
        assert done.status is JobStatus.COMPLETE
    assert sent["welcome"] == ["eve@example.com"]
    assert queue.name == "app"


def test_pytest_fixture_isolates_a_queue(aioqueue_memory: Callable[[Queue], Queue]) -> None:
    queue, _ = make_app()
    assert aioqueue_memory(queue) is queue
    assert queue.settings.redis_url.startswith("memory://")


def test_use_memory_gives_each_isolation_its_own_store() -> None:
    queue, _ = make_app()
    restore = use_memory(queue)
    first = queue.settings.redis_url
    restore()
    restore = use_memory(queue)
    assert queue.settings.redis_url != first
    restore()
    assert queue.settings.redis_url == "redis://127.0.0.1:1/0"
