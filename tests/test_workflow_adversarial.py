"""Adversarial regression tests for workflows, progress and job events, on the real
redis-server: each test here shows a defect found by a hostile review (it fails until the
defect is fixed). Each test's docstring says what the docs promise and what happens instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import redis
from conftest import ROOT, RedisServer
from helpers import eventually, running

from aioqueue import (
    AioqueueError,
    ConfigurationError,
    Context,
    Fail,
    JobFailed,
    JobStatus,
    MemberFailure,
    Queue,
    chain,
    group,
)
from aioqueue.job import JobEvent

WAIT = 10.0


class Point(msgspec.Struct, tag=True):
    """A tagged Struct result (module level: task annotations are resolved from globals)."""

    x: int


def _new_queue(url: str, **settings: Any) -> Queue:
    queue = Queue(url, name=f"adv-{uuid.uuid4().hex[:10]}", result_ttl=60)
    if settings:
        queue.settings = msgspec.structs.replace(queue.settings, **settings)
    return queue


@pytest.fixture
async def queue(redis_server: RedisServer) -> AsyncIterator[Queue]:
    made = _new_queue(redis_server.url)
    yield made
    await made.purge()
    await made.close()


def _key(queue: Queue, job_id: str) -> str:
    return f"aioqueue:{{{queue.name}}}:job:{job_id}"


# -- dependencies ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_job_that_depends_on_itself_is_refused(queue: Queue) -> None:
    """``depends_on`` its own id: the job is stored ``waiting`` on itself and never runs,
    with no error (a silent hang). Bad input must raise a typed error."""

    @queue.task
    async def one(ctx: Context) -> int:
        return 1

    async def attempt() -> None:
        job = await one.options(job_id="self-loop", depends_on=["self-loop"]).enqueue()
        assert await job.status() is not JobStatus.WAITING, "waits on itself forever"

    await _expect_typed_error(attempt())


@pytest.mark.timeout(30)
async def test_a_dependency_cycle_in_one_batch_is_refused(queue: Queue) -> None:
    """Two jobs of one ``enqueue_many`` that depend on each other both wait forever."""

    @queue.task
    async def one(ctx: Context) -> int:
        return 1

    with pytest.raises(AioqueueError):
        await queue.enqueue_many(
            [
                one.options(job_id="cycle-a", depends_on=["cycle-b"]).prepare(),
                one.options(job_id="cycle-b", depends_on=["cycle-a"]).prepare(),
            ]
        )


@pytest.mark.timeout(30)
async def test_a_dependency_cycle_inside_a_group_is_refused(queue: Queue) -> None:
    """Two members of a group that depend on each other: the group (and a callback) wait
    forever, with no error."""

    @queue.task
    async def one(ctx: Context) -> int:
        return 1

    with pytest.raises(AioqueueError):
        await group(
            [
                one.options(job_id="m-x", depends_on=["m-y"]).prepare(),
                one.options(job_id="m-y", depends_on=["m-x"]).prepare(),
            ]
        ).enqueue()


@pytest.mark.timeout(30)
async def test_depends_on_a_job_of_another_queue_is_refused(
    redis_server: RedisServer, queue: Queue
) -> None:
    """A ``Job`` handle of queue B given as ``depends_on`` of a job on queue A is looked up
    by id in queue A: the dependant fails at once with "dependency ... does not exist"
    although the dependency exists (and runs). It should be refused at enqueue."""
    other = _new_queue(redis_server.url)

    @other.task
    async def elsewhere(ctx: Context) -> int:
        return 1

    @queue.task
    async def here(ctx: Context) -> int:
        return 2

    try:
        dependency = await elsewhere.enqueue()

        async def attempt() -> None:
            dependant = await here.options(depends_on=[dependency]).enqueue()
            info = await dependant.info()
            raise AssertionError(f"accepted, then {info.status.value}: {info.error}")

        await _expect_typed_error(attempt())
    finally:
        await other.purge()
        await other.close()


@pytest.mark.timeout(30)
async def test_a_reused_job_id_is_not_released_by_a_stale_edge(
    redis_server: RedisServer,
) -> None:
    """A dependant aborted (or failed) while its dependency runs leaves the dependency's
    ``next`` line naming it. Once its record expires and the id is used again for a new
    job waiting on something else, the OLD dependency ending releases the NEW job before
    its own dependency ended (and a fed job would get the old job's result)."""
    queue = Queue(redis_server.url, name=f"adv-{uuid.uuid4().hex[:10]}", result_ttl=1)
    gates = {"old": asyncio.Event(), "new": asyncio.Event()}

    @queue.task
    async def blocker(ctx: Context, name: str) -> str:
        await gates[name].wait()
        return name

    @queue.task
    async def notify(ctx: Context, label: str) -> str:
        return label

    try:
        async with running(queue.worker(concurrency=4)):
            old = await blocker.enqueue("old")
            first = await notify.options(job_id="notify", depends_on=[old]).enqueue("first")
            await first.abort()
            await eventually(
                lambda: _is(first.status(), JobStatus.NOT_FOUND), timeout=WAIT, interval=0.1
            )
            new = await blocker.enqueue("new")
            second = await notify.options(job_id="notify", depends_on=[new]).enqueue("second")
            assert await second.status() is JobStatus.WAITING
            gates["old"].set()
            # The old dependency's edges are settled in the same script that completes it.
            await eventually(lambda: _is(old.status(), JobStatus.COMPLETE), timeout=WAIT)
            assert await new.status() is JobStatus.RUNNING
            # The new job's only dependency is still running: it must still wait.
            try:
                assert await second.status() is JobStatus.WAITING
            finally:
                gates["new"].set()
    finally:
        await queue.purge()
        await queue.close()


async def _is(status: Any, wanted: JobStatus) -> bool:
    return bool(await status == wanted)


@pytest.mark.timeout(60)
async def test_many_dependants_of_one_job_enqueue_in_linear_time(queue: Queue) -> None:
    """Each ``depends_on`` edge to an existing job rewrites that job's whole ``next``
    field (HMGET + HSET of the concatenation), so N dependants of one job cost O(N^2)
    bytes inside ONE script: 8,000 take ~2 s, 20,000 ~36 s of Redis blocked for every
    client (BUSY after 5 s). A fan-in on one job ("notify everyone once the export is
    done") must not block Redis like that."""

    @queue.task
    async def step(ctx: Context, x: int) -> int:
        return x

    export = await step.enqueue(0)
    requests = [step.options(depends_on=[export]).prepare(i) for i in range(12_000)]
    started = time.monotonic()
    await queue.enqueue_many(requests)
    elapsed = time.monotonic() - started
    # 12,000 plain jobs take ~0.1 s here; linear edges would stay well under this bound.
    assert elapsed < 1.5, f"12,000 dependants of one job took {elapsed:.1f}s to enqueue"


# -- chains and groups -----------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_an_empty_group_inside_a_chain_waits_for_the_step_before(queue: Queue) -> None:
    """``chain(a, group([]), b)``: the empty group has no edge from ``a``, so it completes
    at enqueue and ``b`` runs at once, even though ``a`` fails ("a step that fails stops the
    chain: every later step fails with DependencyFailed and never runs")."""
    ran: list[str] = []

    @queue.task(retries=0)
    async def first(ctx: Context) -> int:
        ran.append("first")
        raise Fail("step 1 failed")

    @queue.task
    async def last(ctx: Context, results: list[int]) -> str:
        ran.append("last")
        return "ran"

    job = await queue.enqueue_flow(chain(first.prepare(), group([]), last.partial()))
    async with running(queue.worker()):
        with pytest.raises(JobFailed):
            await job.result(timeout=WAIT)
    assert ran == ["first"]


@pytest.mark.timeout(30)
async def test_aborting_a_group_of_chains_stops_their_running_steps(queue: Queue) -> None:
    """``GroupJob.abort()``: "every member that has not ended is aborted". A chain member's
    handle is its last step, so only that waiting step is aborted: the running first step
    is neither aborted nor cancelled and runs to the end, while ``g.status()`` reports
    every member aborted."""
    started = asyncio.Event()
    finished: list[int] = []

    @queue.task
    async def slow(ctx: Context, x: int) -> int:
        started.set()
        await asyncio.sleep(1.5)
        finished.append(x)
        return x

    @queue.task
    async def after(ctx: Context, x: int) -> int:
        return x

    g = await group([slow.prepare(1).then(after)]).enqueue()
    async with running(queue.worker()) as worker:
        await asyncio.wait_for(started.wait(), WAIT)
        await g.abort()
        # The worker cancels the aborted step, which then no longer runs.
        await eventually(lambda: worker.in_flight == 0, timeout=WAIT)
    assert finished == [], "the chain's running first step was not stopped by g.abort()"


@pytest.mark.timeout(30)
async def test_aborting_a_group_whose_callback_is_not_running_yet_stops_the_callback(
    queue: Queue,
) -> None:
    """``GroupJob.abort()``: "Abort the group: its callback never runs". Once the members
    have ended, the group node is ``complete`` and its callback released (here delayed):
    ``g.abort()`` aborts nothing, returns 0, and the callback runs afterwards."""
    ran: list[int] = []

    @queue.task
    async def member(ctx: Context, x: int) -> int:
        return x

    @queue.task
    async def gather(ctx: Context, xs: list[int]) -> int:
        ran.append(sum(xs))
        return sum(xs)

    flow = chain(
        group([member.prepare(1), member.prepare(2)], group_id="abort-me"),
        gather.options(delay=2).partial(),
    )
    callback = await queue.enqueue_flow(flow)
    g = await queue.get_group("abort-me")
    async with running(queue.worker()):
        await eventually(lambda: _is(callback.status(), JobStatus.SCHEDULED), timeout=WAIT)
        await g.abort()
        assert await callback.status() is JobStatus.ABORTED
        # Its delay over (promoted early here), an aborted job is dropped, never queued.
        await (await queue.connected_broker()).promote_due(100, early=True)
        counts = await queue.counts()
    assert (counts.ready, counts.pending, counts.delayed) == (0, 0, 0)
    assert ran == [], "the callback ran after g.abort()"


@dataclass(frozen=True)
class Spot:
    """A dataclass result (module level: task annotations are resolved from globals)."""

    x: int


@pytest.mark.timeout(30)
async def test_struct_results_and_member_failures(queue: Queue) -> None:
    """docs/workflows.md: results that are msgspec Structs cannot share a union with
    MemberFailure (such a callback is refused at registration); dataclass results can, and
    a pass group's results come back typed."""

    @queue.task(retries=0)
    async def member(ctx: Context, x: int) -> Spot:
        if x < 0:
            raise Fail("negative")
        return Spot(x)

    g = await group([member.prepare(1), member.prepare(-1)], on_failure="pass").enqueue()
    async with running(queue.worker()):
        results = await g.results(timeout=WAIT)
    assert isinstance(results[0], Spot), f"got {results[0]!r}"
    assert isinstance(results[1], MemberFailure)

    with pytest.raises(ConfigurationError, match="cannot share a union"):

        @queue.task
        async def tally(ctx: Context, points: list[Point | MemberFailure]) -> int:
            return 0


# -- what the worker accepts -----------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_signed_queue_refuses_a_forged_fed_argument(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    """docs/tasks.md: with a signing key "workers run only jobs signed with one of their
    keys". A fed step's first argument comes from the unsigned ``in:1`` field whenever the
    job hash has ``feed``: anyone who can write Redis adds both to a legitimately signed
    job and the worker runs it with an argument of their choosing."""
    queue = Queue(redis_server.url, name=queue_name, signing_key="adversarial-signing-key")
    paid: list[tuple[str, str]] = []

    @queue.task
    async def pay(ctx: Context, to: str, note: str = "") -> str:
        paid.append((to, note))
        return to

    try:
        job = await pay.enqueue("alice")
        redis_client.hset(
            _key(queue, job.id),
            mapping={"feed": "1", "in:1": b"c" + msgspec.msgpack.encode("mallory")},
        )
        async with running(queue.worker()):
            await eventually(lambda: _final(job), timeout=WAIT)
        assert paid in ([], [("alice", "")]), f"a signed job ran as {paid}"
    finally:
        await queue.purge()
        await queue.close()


async def _final(job: Any) -> bool:
    return bool((await job.status()).is_final)


@pytest.mark.timeout(30)
async def test_a_fed_input_larger_than_max_payload_bytes_is_not_run(
    redis_server: RedisServer, queue_name: str
) -> None:
    """docs/guarantees.md #11: a job larger than ``max_payload_bytes`` that reaches a worker
    "goes to the dead-letter store with the reason". begin.lua checks only the envelope's
    size: a callback's fed input (the group's result array, with every failed member's
    traceback in it) is sent to the worker whatever its size, so the limit that protects
    a worker's memory does not apply to fan-in."""
    queue = Queue(redis_server.url, name=queue_name, max_payload_bytes=20_000)

    @queue.task
    async def member(ctx: Context, x: int) -> str:
        return "x" * 1_000

    received: list[int] = []

    @queue.task
    async def gather(ctx: Context, texts: list[str]) -> int:
        received.append(sum(len(t) for t in texts))
        return len(texts)

    try:
        job = await group(member.prepare(i) for i in range(100)).then(gather).enqueue()
        async with running(queue.worker(max_payload_bytes=20_000)):
            await eventually(lambda: _final(job), timeout=WAIT)
        assert received == [], f"the callback ran with {received[0]} bytes of input"
    finally:
        await queue.purge()
        await queue.close()


# -- progress --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_progress_while_redis_runs_a_long_script_does_not_fail_the_job(
    tmp_path: Any,
) -> None:
    """docs/workflows.md: "storing a report never fails the job". While Redis runs a long
    script (a big workflow enqueue: "a group of a million members blocks Redis for that
    call"), other clients get ``BUSY`` once ``busy-reply-threshold`` passes (5 s by
    default, 100 ms here). ``ctx.progress`` lets that ``redis.ResponseError`` escape into
    the task, which then fails (here: dead, retries=0)."""
    server = RedisServer(tmp_path, extra=("--busy-reply-threshold", "100"))
    server.start()
    queue = _new_queue(server.url)
    reported = asyncio.Event()

    @queue.task(retries=0)
    async def report(ctx: Context) -> str:
        for i in range(100):
            await ctx.progress(i / 100, "working")
            reported.set()
            await asyncio.sleep(0.02)
        return "done"

    busy = (
        "local t0 = redis.call('TIME') "
        "repeat local t = redis.call('TIME') "
        "until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 800000 return 1"
    )

    def block_redis() -> None:
        with server.client() as client:
            client.eval(busy, 0)

    try:
        job = await report.enqueue()
        async with running(queue.worker(shutdown_grace=1)):
            await asyncio.wait_for(reported.wait(), WAIT)
            await asyncio.to_thread(block_redis)
            await eventually(lambda: _final(job), timeout=30)
            info = await job.info()
        assert info.status is JobStatus.COMPLETE, f"{info.status.value}: {info.error}"
    finally:
        await queue.close()
        server.kill()


# -- events ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_job_events_end_when_the_job_ends_with_no_events_kept(
    redis_server: RedisServer,
) -> None:
    """``job.events()`` "ends when the job ends". Once it has gone live it only waits for a
    final event on the stream and never looks at the job again: with ``events_max_len=0``
    (documented: "0 keeps none"), or a final event trimmed away, or a purged job, it
    never ends."""
    queue = _new_queue(redis_server.url, events_max_len=0)

    @queue.task
    async def slow(ctx: Context) -> int:
        await asyncio.sleep(0.5)
        return 1

    async def collect() -> list[JobEvent]:
        return [event async for event in job.events()]

    try:
        job = await slow.enqueue()
        watcher = asyncio.create_task(collect())
        async with running(queue.worker(events_max_len=0)):
            assert await job.result(timeout=WAIT) == 1
            done, _ = await asyncio.wait({watcher}, timeout=8)
            await _stop(watcher)
        assert done, "job.events() still waits 8 s after the job completed"
    finally:
        await queue.purge()
        await queue.close()


_FOREIGN_EVENTS = """
import asyncio, json, os, sys, time
import redis
from aioqueue import Context, Queue
queue = Queue(sys.argv[1], name=sys.argv[2])
@queue.task
async def one(ctx: Context) -> int:
    return 1
async def main() -> None:
    broker = await queue.connected_broker()
    calls = 0
    real = broker.events
    async def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return await real(*args, **kwargs)
    broker.events = counted
    cursor = await queue.events_cursor()
    client = redis.Redis.from_url(sys.argv[1])
    for _ in range(600):
        client.xadd(f"aioqueue:{{{queue.name}}}:events", {"foo": "bar"})
    seen = []
    async def consume() -> None:
        async for event in queue.events(since=cursor):
            seen.append(event.kind)
    asyncio.get_running_loop().create_task(consume())
    await asyncio.sleep(1.0)
    reads = calls
    await one.enqueue()
    deadline = time.monotonic() + 5
    while "enqueued" not in seen and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    print(json.dumps({"reads_in_1s": reads, "saw_later_event": "enqueued" in seen}), flush=True)
    os._exit(0)  # the spinning consumer does not even obey cancellation
asyncio.run(main())
"""


@pytest.mark.timeout(40)
async def test_a_foreign_event_entry_neither_spins_nor_blocks_consumers(
    redis_server: RedisServer, queue_name: str
) -> None:
    """Guarantee #11: input aioqueue did not write "never blocks the queue". An entry of the
    events stream that holds no readable event (anyone who can write the queue's keys can
    add one) never moves the consumer's cursor forward: ``queue.events()`` re-reads it in a
    tight loop (thousands of non-blocking XREADs a second, and the consuming task then
    ignores ``cancel()``), and 500 such entries (the read count) stop it from ever seeing
    a later event. Run in a subprocess: the stuck consumer cannot be cancelled."""
    done = subprocess.run(
        [sys.executable, "-c", _FOREIGN_EVENTS, redis_server.url, queue_name],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    queue = Queue(redis_server.url, name=queue_name)
    await queue.purge()
    await queue.close()
    assert done.stdout.strip(), done.stderr[-1000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"reads_in_1s": outcome["reads_in_1s"], "saw_later_event": True}, outcome
    assert outcome["reads_in_1s"] < 50, f"{outcome['reads_in_1s']} event reads in one second"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "cursor",
    ["garbage", "1-1/x", "99999999999999999999-0/*"],
)
async def test_a_bad_event_cursor_is_a_typed_error(queue: Queue, cursor: str) -> None:
    """A cursor that is not one raises ``ValueError``; one with an out-of-range id raises
    redis-py's ``ResponseError``. Every bad input must be an ``AioqueueError``."""

    async def attempt() -> None:
        events: Any = queue.events(since=cursor)
        try:
            await asyncio.wait_for(events.__anext__(), 2)
        finally:
            await events.aclose()

    await _expect_typed_error(attempt())


# -- named workflows -------------------------------------------------------------------------

_ENQUEUE_NAMED = """
import asyncio, sys
from aioqueue import Context, Queue, group
queue = Queue(sys.argv[1], name=sys.argv[2])
@queue.task
async def send(ctx: Context, tags: frozenset[str]) -> int:
    return len(tags)
async def main() -> None:
    tags = frozenset({"alpha", "beta", "gamma", "delta", "epsilon", "zeta"})
    g = await group([send.prepare(tags)], group_id="report-1").enqueue()
    print(g.member_ids)
    await queue.close()
asyncio.run(main())
"""


@pytest.mark.timeout(60)
async def test_the_same_named_workflow_from_another_process_is_idempotent(
    redis_server: RedisServer, queue_name: str
) -> None:
    """``group_id`` "makes the whole workflow idempotent: enqueueing the same workflow a
    second time writes nothing and returns the same handles". The workflow's digest
    encodes arguments in iteration order, and a set of strings iterates in a different
    order in another process (hash randomisation): the same workflow enqueued again from
    another process (a retried web request) raises ``WorkflowConflict``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outputs = []
    for seed in ("1", "2", "3"):
        done = subprocess.run(
            [sys.executable, "-c", _ENQUEUE_NAMED, redis_server.url, queue_name],
            env={**env, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=30,
        )
        outputs.append(done.stdout.strip() or done.stderr.strip().splitlines()[-1])
    queue = Queue(redis_server.url, name=queue_name)
    await queue.purge()
    await queue.close()
    assert outputs == ["['report-1:1']"] * 3, outputs


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "case",
    [
        "group of ints",
        "group of a task",
        "chain of an int",
        "enqueue_flow of a job",
        "enqueue_flow of a list",
        "group_id not a string",
    ],
)
async def test_bad_workflow_input_is_a_typed_error(queue: Queue, case: str) -> None:
    """Malformed workflows raise ``AttributeError``/``TypeError``/``RecursionError`` from
    deep inside the planner instead of a ``ConfigurationError``."""

    @queue.task
    async def one(ctx: Context, x: Any = 0) -> int:
        return 1

    # Typed Any: these are the mistakes mypy would catch, made by untyped callers.
    number: Any = 1
    task: Any = one
    flows: Any = queue

    async def attempt() -> None:
        if case == "group of ints":
            await group([number]).enqueue()
        elif case == "group of a task":
            await group([task]).enqueue()
        elif case == "chain of an int":
            await chain(number).enqueue()
        elif case == "enqueue_flow of a job":
            await flows.enqueue_flow(await one.enqueue())
        elif case == "enqueue_flow of a list":
            await flows.enqueue_flow([one.prepare()])
        else:
            group([one.prepare()], group_id=number)

    await _expect_typed_error(attempt())


_NESTED = """
import asyncio, sys
from aioqueue import AioqueueError, Context, Queue, chain, group
queue = Queue(sys.argv[1], name=sys.argv[2])
@queue.task
async def one(ctx: Context, x: object = 0) -> int:
    return 1
async def main() -> None:
    inner = group([one.partial()])
    for _ in range(500):
        inner = group([chain(group([one.partial()]), inner)])
    try:
        await queue.enqueue_flow(chain(one.prepare(), inner))
        print("no error")
    except AioqueueError:
        print("typed")
    except BaseException as exc:
        print(type(exc).__name__)
    await queue.close()
asyncio.run(main())
"""


@pytest.mark.timeout(60)
async def test_a_deeply_nested_workflow_is_a_typed_error(
    redis_server: RedisServer, queue_name: str
) -> None:
    """500 levels of groups of chains: the planner recurses and raises ``RecursionError``
    (run in a subprocess: a RecursionError upsets CPython 3.11's later ``ast.parse``)."""
    done = subprocess.run(
        [sys.executable, "-c", _NESTED, redis_server.url, queue_name],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.stdout.strip() == "typed", done.stdout + done.stderr[-500:]


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel a helper task and wait (at most 2 s) for it, so no generator is left for the
    GC to finalise in the middle of another test. (A ``queue.events()`` consumer spinning
    on a foreign entry ignores cancellation: hence the bound.)"""
    task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.shield(task), 2)


async def _expect_typed_error(attempt: Any) -> None:
    """Await ``attempt``; fail unless it raises an AioqueueError. Failures are reported
    without a traceback: pytest cannot print some of these (a RecursionError's, or one
    raised inside an async generator trips a CPython 3.11 AST recursion check)."""
    try:
        await attempt
    except AioqueueError:
        return
    except BaseException as exc:
        name = f"{type(exc).__module__}.{type(exc).__name__}"
        pytest.fail(f"{name}: {str(exc)[:300]}", pytrace=False)
    pytest.fail("no error", pytrace=False)


# -- cost ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_finished_callback_does_not_keep_a_copy_of_the_group_results(
    queue: Queue, redis_client: redis.Redis
) -> None:
    """docs/workflows.md: "a group of 100,000 members returning 1 kB each is 100 MB in
    Redis", and "What it costs" lists the member hashes and the group node. A completed
    callback also keeps the whole result array in its ``in:1`` field until ``result_ttl``
    (1 day by default): a third full copy. Measured for 1,000 x 1 kB: members 2.0 MB,
    group node 1.06 MB, callback 1.05 MB, i.e. about 4x the docs' figure."""

    @queue.task
    async def member(ctx: Context, x: int) -> str:
        return "x" * 1_000

    @queue.task
    async def gather(ctx: Context, texts: list[str]) -> int:
        return len(texts)

    job = await group(member.prepare(i) for i in range(1_000)).then(gather).enqueue()
    async with running(queue.worker(concurrency=50)):
        assert await job.result(timeout=WAIT) == 1_000
    kept = int(redis_client.hstrlen(_key(queue, job.id), "in:1"))
    assert kept == 0, f"the finished callback still holds {kept / 1e6:.1f} MB of input"
