"""Workflows on both brokers: groups, fan-in callbacks, chains, dependencies.

Every test runs against the suite's redis-server and ``memory://`` (the ``storage_url``
fixture), through the public API and a real worker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from helpers import eventually, running

from aioqueue import (
    ConfigurationError,
    Context,
    DependencyFailed,
    GroupFailed,
    JobFailed,
    JobStatus,
    MemberFailure,
    Queue,
    QueueFull,
    Retry,
    WorkflowConflict,
    chain,
    group,
)
from aioqueue.testing import drain

pytestmark = pytest.mark.timeout(60)

WAIT = 15.0


class App:
    """A queue with the tasks the tests compose, counting every run."""

    def __init__(self, url: str) -> None:
        self.queue = Queue(url, name=f"wf-{uuid.uuid4().hex[:10]}", result_ttl=300)
        self.runs: Counter[str] = Counter()
        self.inputs: list[object] = []
        self.flaky_failures: Counter[int] = Counter()
        self.gate = asyncio.Event()
        q = self.queue

        @q.task(retries=0)
        async def double(ctx: Context, x: int) -> int:
            self.runs[f"double:{x}"] += 1
            if x < 0:
                raise ValueError(f"negative {x}")
            return 2 * x

        @q.task(retries=3)
        async def flaky(ctx: Context, x: int) -> int:
            self.runs[f"flaky:{x}"] += 1
            if self.flaky_failures[x] < 2:
                self.flaky_failures[x] += 1
                raise Retry(delay=0.01)
            return x

        @q.task(retries=0)
        async def held(ctx: Context, x: int) -> int:
            await self.gate.wait()
            return x

        @q.task
        async def add(ctx: Context, x: int, y: int) -> int:
            self.runs[f"add:{x}+{y}"] += 1
            return x + y

        @q.task
        async def total(ctx: Context, xs: list[int], label: str) -> str:
            self.runs["total"] += 1
            self.inputs.append(xs)
            return f"{label}:{sum(xs)}"

        @q.task
        async def outcomes(ctx: Context, xs: list[int | MemberFailure]) -> list[str]:
            self.runs["outcomes"] += 1
            return [x.status if isinstance(x, MemberFailure) else str(x) for x in xs]

        @q.task(retries=1)
        async def step(ctx: Context, x: int) -> int:
            self.runs[f"step:{x}"] += 1
            if x == 3 and ctx.attempt == 1:
                raise RuntimeError("step 2 fails once")
            return x + 1

        self.double, self.flaky, self.held, self.add = double, flaky, held, add
        self.total, self.outcomes, self.step = total, outcomes, step


@pytest.fixture
async def app(storage_url: str) -> AsyncIterator[App]:
    made = App(storage_url)
    yield made
    await made.queue.purge()
    await made.queue.close()


async def test_group_results_in_member_order_and_status(app: App) -> None:
    async with running(app.queue.worker(concurrency=8)):
        g = await group(app.double.prepare(i) for i in range(20)).enqueue()
        assert await g.results(timeout=WAIT) == [2 * i for i in range(20)]
        status = await g.status()
    assert status.status is JobStatus.COMPLETE
    assert status.counts == {JobStatus.COMPLETE: 20}
    assert status.done == status.total == 20
    assert all(app.runs[f"double:{i}"] == 1 for i in range(20))


async def test_chord_callback_runs_once_with_results_in_order(app: App) -> None:
    async with running(app.queue.worker(concurrency=8)):
        callback = group(app.double.prepare(i) for i in range(30)).then(app.total, "sum")
        job = await callback.enqueue()
        assert await job.result(timeout=WAIT) == f"sum:{sum(2 * i for i in range(30))}"
    assert app.runs["total"] == 1
    assert app.inputs == [[2 * i for i in range(30)]]


async def test_callback_waits_without_a_worker_slot(app: App) -> None:
    # One slot: a parent that awaited its children would deadlock here.
    async with running(app.queue.worker(concurrency=1)):
        job = await group(app.double.prepare(i) for i in range(5)).then(app.total, "x").enqueue()
        assert await job.result(timeout=WAIT) == "x:20"


async def test_failed_member_fails_the_callback_with_its_error(app: App) -> None:
    async with running(app.queue.worker(concurrency=4)):
        members = [app.double.prepare(i) for i in (1, -7, 2)]
        job = await group(members).then(app.total, "never").enqueue()
        with pytest.raises(JobFailed) as caught:
            await job.result(timeout=WAIT)
    assert caught.value.error_type == "GroupFailed"
    assert "1 of 3 members failed" in caught.value.remote_message
    assert "negative -7" in caught.value.remote_message
    assert app.runs["total"] == 0
    # Every member ran once, the failing one included: the callback waited for all.
    assert [app.runs[f"double:{i}"] for i in (1, -7, 2)] == [1, 1, 1]


async def test_pass_policy_hands_member_errors_to_the_callback(app: App) -> None:
    async with running(app.queue.worker(concurrency=4)):
        members = [app.double.prepare(i) for i in (1, -7, 2)]
        job = await group(members, on_failure="pass").then(app.outcomes).enqueue()
        assert await job.result(timeout=WAIT) == ["2", "dead", "4"]
        g = await group(members, on_failure="pass").enqueue()
        results = await g.results(timeout=WAIT)
    assert (results[0], results[2]) == (2, 4)
    error = results[1]
    assert isinstance(error, MemberFailure)
    assert (error.status, error.type, error.message) == ("dead", "ValueError", "negative -7")
    assert error.job_id == g.member_ids[1]


async def test_retrying_members_are_counted_once(app: App) -> None:
    async with running(app.queue.worker(concurrency=4)):
        members = [app.flaky.prepare(i) for i in range(6)]
        job = await group(members).then(app.total, "retried").enqueue()
        assert await job.result(timeout=WAIT) == f"retried:{sum(range(6))}"
    assert all(app.runs[f"flaky:{i}"] == 3 for i in range(6))
    assert app.runs["total"] == 1
    assert app.inputs == [list(range(6))]


async def test_aborted_member_is_counted_once(app: App) -> None:
    members = [app.double.prepare(1), app.held.prepare(5), app.double.prepare(2)]
    async with running(app.queue.worker(concurrency=4)):
        g = await group(members, on_failure="pass").enqueue()
        waiting = g.members[1]
        await eventually(
            lambda: _is(waiting.status(), JobStatus.RUNNING), timeout=WAIT, interval=0.01
        )
        assert await waiting.abort() is JobStatus.RUNNING
        results = await g.results(timeout=WAIT)
        app.gate.set()
    assert (results[0], results[2]) == (2, 4)
    assert isinstance(results[1], MemberFailure)
    assert results[1].status == "aborted"
    assert (await g.status()).counts == {JobStatus.COMPLETE: 2, JobStatus.ABORTED: 1}


async def _is(status: asyncio.Future[JobStatus] | object, wanted: JobStatus) -> bool:
    return await status is wanted  # type: ignore[misc]


async def test_chain_step_failing_once_then_succeeding(app: App) -> None:
    async with running(app.queue.worker(concurrency=4)):
        last = await app.step.prepare(2).then(app.step).then(app.step).enqueue()
        assert await last.result(timeout=WAIT) == 5
    # step(2) -> 3, step(3) fails once then -> 4, step(4) -> 5: step 3 ran once.
    assert (app.runs["step:2"], app.runs["step:3"], app.runs["step:4"]) == (1, 2, 1)


async def test_failing_step_stops_the_chain_and_marks_the_rest(app: App) -> None:
    async with running(app.queue.worker(concurrency=4)):
        first = app.double.prepare(-1)
        last = await first.then(app.add, 1).then(app.add, 2).enqueue()
        with pytest.raises(JobFailed) as caught:
            await last.result(timeout=WAIT)
    assert caught.value.status == "failed"
    assert caught.value.error_type == "DependencyFailed"
    assert "negative -1" in caught.value.remote_message
    assert not any(key.startswith("add:") for key in app.runs)


async def test_chain_function_with_a_group_inside(app: App) -> None:
    async with running(app.queue.worker(concurrency=4)):
        flow = chain(
            app.add.prepare(1, 2),
            group([app.double.partial(), app.add.partial(10)]),
            app.total.partial("both"),
        )
        last = await flow.enqueue()
        assert await last.result(timeout=WAIT) == "both:19"


async def test_group_of_chains(app: App) -> None:
    async with running(app.queue.worker(concurrency=4)):
        members = [app.add.prepare(i, 1).then(app.double) for i in range(4)]
        g = await group(members).enqueue()
        assert await g.results(timeout=WAIT) == [2 * (i + 1) for i in range(4)]


async def test_depends_on_complete_dead_and_missing(app: App) -> None:
    async with running(app.queue.worker(concurrency=4)):
        done = await app.add.enqueue(1, 1)
        assert await done.result(timeout=WAIT) == 2
        dead = await app.double.enqueue(-3)
        with pytest.raises(JobFailed):
            await dead.result(timeout=WAIT)

        after_done = await app.add.options(depends_on=[done]).enqueue(5, 5)
        assert await after_done.result(timeout=WAIT) == 10

        after_dead = await app.add.options(depends_on=[dead]).enqueue(6, 6)
        with pytest.raises(JobFailed) as caught:
            await after_dead.result(timeout=WAIT)
        assert caught.value.error_type == "DependencyFailed"
        assert "ended dead" in caught.value.remote_message

        after_missing = await app.add.options(depends_on=["no-such-job"]).enqueue(7, 7)
        with pytest.raises(JobFailed) as caught:
            await after_missing.result(timeout=WAIT)
        assert "no-such-job does not exist" in caught.value.remote_message

        regardless = app.add.options(depends_on=[dead], on_dependency_failure="run")
        assert await (await regardless.enqueue(8, 8)).result(timeout=WAIT) == 16
    assert app.runs["add:6+6"] == app.runs["add:7+7"] == 0


async def test_dependant_waits_until_its_dependency_completes(app: App) -> None:
    first = await app.held.enqueue(3)
    second = await app.add.options(depends_on=[first.id]).enqueue(1, 1)
    assert await second.status() is JobStatus.WAITING
    async with running(app.queue.worker(concurrency=4)):
        await eventually(lambda: _is(first.status(), JobStatus.RUNNING), timeout=WAIT)
        assert await second.status() is JobStatus.WAITING
        app.gate.set()
        assert await second.result(timeout=WAIT) == 2


async def test_abort_a_group_stops_its_callback(app: App) -> None:
    flow = group((app.held.prepare(i) for i in range(3)), group_id="g-abort")
    callback = await flow.then(app.total, "never").enqueue()
    g = await app.queue.get_group("g-abort")
    assert await callback.status() is JobStatus.WAITING
    async with running(app.queue.worker(concurrency=4)):
        assert await g.abort() == 3
        app.gate.set()
        with pytest.raises(JobFailed) as caught:
            await callback.result(timeout=WAIT)
    assert "was aborted" in caught.value.remote_message
    assert (await g.status()).status is JobStatus.ABORTED
    assert app.runs["total"] == 0


async def test_group_is_written_all_or_nothing_against_max_size(storage_url: str) -> None:
    queue = Queue(storage_url, name=f"wf-{uuid.uuid4().hex[:10]}", max_size=10)

    @queue.task
    async def noop(ctx: Context, x: int) -> int:
        return x

    try:
        await queue.enqueue_many([noop.prepare(i) for i in range(5)])
        with pytest.raises(QueueFull):
            await group(noop.prepare(i) for i in range(6)).enqueue()
        assert (await queue.counts()).ready == 5
        await group(noop.prepare(i) for i in range(5)).enqueue()
        assert (await queue.counts()).ready == 10
    finally:
        await queue.purge()
        await queue.close()


async def test_group_id_is_idempotent_and_can_be_reopened(app: App) -> None:
    members = [app.double.prepare(i) for i in range(3)]
    first = await group(members, group_id="report-7").enqueue()
    again = await group(members, group_id="report-7").enqueue()
    assert first.id == again.id == "report-7"
    reopened = await app.queue.get_group("report-7")
    assert reopened.member_ids == first.member_ids
    async with running(app.queue.worker(concurrency=4)):
        assert await reopened.results(timeout=WAIT) == [0, 2, 4]


async def test_empty_group_completes_at_once(app: App) -> None:
    g = await app.queue.enqueue_flow(group([]))
    assert await g.results(timeout=WAIT) == []


async def test_drain_runs_a_workflow(app: App) -> None:
    job = await group(app.double.prepare(i) for i in range(4)).then(app.total, "d").enqueue()
    await drain(app.queue)
    assert await job.result(timeout=WAIT) == "d:12"


def test_composition_errors(storage_url: str) -> None:
    queue = Queue(storage_url, name="wf-errors")

    @queue.task
    async def one(ctx: Context, x: int) -> int:
        return x

    @queue.task
    async def none(ctx: Context) -> int:
        return 0

    with pytest.raises(ConfigurationError):
        chain(one.prepare(1), one.prepare(2))  # a later step is fed, not prepared
    with pytest.raises(Exception, match="no positional argument"):
        none.partial()  # type: ignore[misc]
    with pytest.raises(ConfigurationError):
        group([one.prepare(1)], on_failure="ignore")  # type: ignore[call-overload]


async def test_a_named_workflow_enqueued_twice_is_written_once(app: App) -> None:
    flow = group((app.double.prepare(i) for i in range(3)), group_id="nightly").then(app.total, "n")
    first = await flow.enqueue()
    again = await flow.enqueue()
    assert first.id == again.id == "nightly:4"
    g = await app.queue.get_group("nightly")
    assert g.member_ids == ["nightly:1", "nightly:2", "nightly:3"]
    async with running(app.queue.worker(concurrency=4)):
        assert await again.result(timeout=WAIT) == "n:6"
    assert app.runs["total"] == 1
    assert [app.runs[f"double:{i}"] for i in range(3)] == [1, 1, 1]


async def test_member_failures_name_how_they_ended(app: App) -> None:
    members = [app.double.prepare(-1), app.held.prepare(1)]
    async with running(app.queue.worker(concurrency=4)):
        g = await group(members).enqueue()
        await g.members[1].abort()
        with pytest.raises(JobFailed) as caught:
            await g.results(timeout=WAIT)
        passed = await group([app.held.prepare(2)], on_failure="pass").enqueue()
        await passed.members[0].abort()
        (aborted,) = await passed.results(timeout=WAIT)
        app.gate.set()
    assert caught.value.error_type == "GroupFailed"
    assert "2 of 2 members failed" in caught.value.remote_message
    assert "aborted (JobAborted: the job was aborted)" in caught.value.remote_message
    assert isinstance(aborted, MemberFailure)
    assert (aborted.status, aborted.type) == ("aborted", "JobAborted")


async def test_a_long_member_message_is_cut_on_a_character(storage_url: str) -> None:
    queue = Queue(storage_url, name=f"wf-{uuid.uuid4().hex[:10]}")

    @queue.task(retries=0)
    async def fails(ctx: Context) -> None:
        raise ValueError("é" * 150)

    try:
        g = await group([fails.prepare()]).enqueue()
        await drain(queue)
        with pytest.raises(JobFailed) as caught:
            await g.results(timeout=WAIT)
        assert caught.value.error_type == "GroupFailed"
        assert ("é" * 90) in caught.value.remote_message
        assert "1 member failed" in (await g.job.info()).reason
    finally:
        await queue.purge()
        await queue.close()


def test_a_fed_step_must_not_run_without_its_input(storage_url: str) -> None:
    queue = Queue(storage_url, name="wf-fed")

    @queue.task
    async def one(ctx: Context, x: int) -> int:
        return x

    step = one.options(on_dependency_failure="run").partial()
    with pytest.raises(ConfigurationError, match="cannot run without it"):
        asyncio.run(queue.enqueue_flow(chain(one.prepare(1), step)))


async def test_waiting_jobs_count_toward_max_size_once_released(storage_url: str) -> None:
    queue = Queue(storage_url, name=f"wf-{uuid.uuid4().hex[:10]}", max_size=3)

    @queue.task
    async def one(ctx: Context, x: int) -> int:
        return x

    @queue.task
    async def total(ctx: Context, xs: list[int]) -> int:
        return sum(xs)

    try:
        # Three members fill the queue; the waiting callback is not counted yet.
        job = await group(one.prepare(i) for i in range(3)).then(total).enqueue()
        assert (await queue.counts()).ready == 3
        with pytest.raises(QueueFull):
            await one.enqueue(9)
        await drain(queue)
        assert await job.result(timeout=WAIT) == 3
    finally:
        await queue.purge()
        await queue.close()


async def test_a_reopened_group_is_typed_by_its_task(app: App) -> None:
    members = [app.double.prepare(1), app.double.prepare(-2)]
    g = await group(members, on_failure="pass", group_id="typed").enqueue()
    await drain(app.queue)
    reopened = await app.queue.get_group("typed", app.double)
    first, second = await reopened.results(timeout=WAIT)
    assert first == 2
    assert isinstance(second, MemberFailure)
    assert await g.results(timeout=WAIT) == [first, second]


async def test_a_group_id_reused_for_another_workflow_is_refused(app: App) -> None:
    first = group((app.double.prepare(i) for i in (1, 2)), group_id="rep").then(app.total, "a")
    other = group((app.double.prepare(i) for i in (5, 6, 7)), group_id="rep").then(app.total, "b")
    await first.enqueue()
    with pytest.raises(WorkflowConflict, match="'rep' already exists"):
        await other.enqueue()
    await drain(app.queue)
    assert app.runs["double:5"] == 0
    assert app.inputs == [[2, 4]]


async def test_workflow_failures_are_their_own_exceptions(app: App) -> None:
    bad_group = await group([app.double.prepare(-1)]).then(app.total, "x").enqueue()
    bad_chain = await app.double.prepare(-2).then(app.add, 1).enqueue()
    await drain(app.queue)
    with pytest.raises(GroupFailed):
        await bad_group.result(timeout=WAIT)
    with pytest.raises(DependencyFailed):
        await bad_chain.result(timeout=WAIT)


async def test_a_batch_larger_than_max_size_says_it_can_never_fit(storage_url: str) -> None:
    queue = Queue(storage_url, name=f"wf-{uuid.uuid4().hex[:10]}", max_size=5)

    @queue.task
    async def one(ctx: Context, x: int) -> int:
        return x

    try:
        with pytest.raises(QueueFull, match="6 jobs enqueued at once can never fit"):
            await group(one.prepare(i) for i in range(6)).enqueue()
    finally:
        await queue.purge()
        await queue.close()


async def test_bad_dependencies_and_group_ids_are_typed_errors(app: App) -> None:
    with pytest.raises(ConfigurationError, match="neither a job nor a job id"):
        app.add.options(depends_on=[123])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="not one string"):
        app.add.options(depends_on="abc")
    plain = await app.add.enqueue(1, 2)
    with pytest.raises(ConfigurationError, match="is not a group"):
        await app.queue.get_group(plain.id)
