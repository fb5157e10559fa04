"""Debounce and throttle per key, atomic in the broker (docs/flow-control.md#debounce-and-throttle).

A debounced burst runs once, with the last arguments, and every handle of the burst gets
that run's result; a throttle writes one job per window and hands every caller its handle.
The scenarios run on the real redis-server and on ``memory://``; a lost reply goes through
the fault-injecting proxy on Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis
from conftest import RedisServer
from faultproxy import FaultProxy
from helpers import eventually, run_cli, running

from aioqueue import (
    ConfigurationError,
    Context,
    DependencyFailed,
    Job,
    JobStatus,
    Queue,
    QueueFull,
    group,
)
from aioqueue.brokers.base import Broker, Keyed, NewJob
from aioqueue.brokers.redis import RedisBroker
from aioqueue.brokers.redis.access import acl_rules
from aioqueue.serialization import Envelope, encode

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0
"""Longest any single wait may take before the test fails."""


@pytest.fixture
async def queue(storage_url: str, queue_name: str) -> AsyncIterator[Queue]:
    """A queue on Redis, then on memory:// (the test runs on both)."""
    made = Queue(storage_url, name=queue_name)
    yield made
    await made.close()


async def test_fifty_enqueues_for_one_key_run_once_with_the_last_arguments(queue: Queue) -> None:
    runs: list[int] = []

    @queue.task()
    async def digest(ctx: Context, n: int) -> str:
        runs.append(n)
        return f"digest {n}"

    window = 1.0
    burst_start = time.time()
    jobs = []
    for n in range(50):
        last_enqueue = time.time()
        jobs.append(await digest.options(debounce=window, key="user:1").enqueue(n))
    assert time.time() - burst_start < 1.0
    assert len({job.id for job in jobs}) == 50
    async with running(queue.worker(poll_interval=0.05)):
        results = await asyncio.wait_for(
            asyncio.gather(*(job.result(timeout=WAIT) for job in jobs)), WAIT
        )
        assert results == ["digest 49"] * 50
        assert runs == [49]
        started = await jobs[-1].info()
        assert started.started_at is not None
        assert started.started_at.timestamp() >= last_enqueue + window - 0.001
        # Nothing else is left to run: the 49 others ended when they were replaced.
        counts = await queue.counts()
        assert (counts.ready, counts.delayed) == (0, 0)
    for earlier, later in itertools.pairwise(jobs):
        info = await earlier.info()
        assert (info.status, info.reason, info.replaced_by) == (
            JobStatus.ABORTED,
            "debounced",
            later.id,
        )
        assert await earlier.status() is JobStatus.ABORTED
    assert await jobs[-1].status() is JobStatus.COMPLETE


async def test_keys_and_tasks_do_not_interfere(queue: Queue) -> None:
    runs: list[tuple[str, str, int]] = []

    @queue.task()
    async def digest(ctx: Context, key: str, n: int) -> None:
        runs.append(("digest", key, n))

    @queue.task()
    async def report(ctx: Context, key: str, n: int) -> None:
        runs.append(("report", key, n))

    jobs = []
    for n in range(5):
        for task in (digest, report):
            for key in ("a", "b"):
                jobs.append(await task.options(debounce=0.3, key=key).enqueue(key, n))
    async with running(queue.worker(poll_interval=0.05)):
        await asyncio.wait_for(asyncio.gather(*(job.result(timeout=WAIT) for job in jobs)), WAIT)
    assert sorted(runs) == [
        ("digest", "a", 4),
        ("digest", "b", 4),
        ("report", "a", 4),
        ("report", "b", 4),
    ]


async def test_a_running_job_is_not_replaced_and_the_next_enqueue_opens_a_new_window(
    queue: Queue,
) -> None:
    started: list[int] = []
    release = asyncio.Event()

    @queue.task()
    async def digest(ctx: Context, n: int) -> int:
        started.append(n)
        await release.wait()
        return n

    async with running(queue.worker(poll_interval=0.05)):
        first = await digest.options(debounce=0.1, key="k").enqueue(1)
        await eventually(lambda: started == [1], timeout=WAIT)
        second = await digest.options(debounce=0.1, key="k").enqueue(2)
        assert await first.status() is JobStatus.RUNNING
        release.set()
        assert await first.result(timeout=WAIT) == 1
        assert await second.result(timeout=WAIT) == 2
    assert started == [1, 2]


async def test_a_debounce_window_can_be_a_timedelta_and_the_job_waits_for_it(
    queue: Queue,
) -> None:
    @queue.task()
    async def digest(ctx: Context) -> None:
        pass

    job = await digest.options(debounce=timedelta(minutes=5), key="k").enqueue()
    info = await job.info()
    assert info.status is JobStatus.SCHEDULED
    assert info.run_at is not None
    assert info.enqueued_at is not None
    assert info.run_at - info.enqueued_at == timedelta(minutes=5)


async def test_jobs_waiting_on_a_replaced_job_get_its_outcome(queue: Queue) -> None:
    @queue.task()
    async def digest(ctx: Context) -> None:
        pass

    @queue.task()
    async def after(ctx: Context) -> None:
        pass

    first = await digest.options(debounce=60, key="k").enqueue()
    waiting = await after.options(depends_on=[first]).enqueue()
    assert await waiting.status() is JobStatus.WAITING
    await digest.options(debounce=60, key="k").enqueue()
    with pytest.raises(DependencyFailed, match="aborted"):
        await waiting.result(timeout=WAIT)


async def test_throttle_writes_one_job_per_window_and_every_handle_names_it(
    queue: Queue,
) -> None:
    runs: list[int] = []

    @queue.task()
    async def sync_account(ctx: Context, n: int) -> int:
        runs.append(n)
        return n

    window = 1.0
    window_start = time.time()
    jobs = [await sync_account.options(throttle=window, key="acct:7").enqueue(n) for n in range(20)]
    assert time.time() - window_start < window
    assert {job.id for job in jobs} == {jobs[0].id}
    counts = await queue.counts()
    assert (counts.ready, counts.delayed) == (1, 0)
    async with running(queue.worker(poll_interval=0.05)):
        results = await asyncio.gather(*(job.result(timeout=WAIT) for job in jobs))
        assert results == [0] * 20
        assert runs == [0]

        # Once the window has passed, the next enqueue is written (a condition, not a sleep:
        # every enqueue before then answers the first job again and writes nothing).
        latest = jobs[0]

        async def accepted_anew() -> bool:
            nonlocal latest
            latest = await sync_account.options(throttle=window, key="acct:7").enqueue(99)
            return latest.id != jobs[0].id

        await eventually(accepted_anew, timeout=WAIT, interval=0.05)
        assert time.time() - window_start >= window
        assert await latest.result(timeout=WAIT) == 99
    assert runs == [0, 99]


async def test_a_full_queue_refuses_a_new_keyed_job_but_a_debounce_may_replace_one(
    storage_url: str, queue_name: str
) -> None:
    queue = Queue(storage_url, name=queue_name, max_size=1)
    try:

        @queue.task()
        async def digest(ctx: Context, n: int) -> None:
            pass

        first = await digest.options(debounce=60, key="a").enqueue(1)
        second = await digest.options(debounce=60, key="a").enqueue(2)
        assert await first.status() is JobStatus.ABORTED
        assert (await queue.counts()).delayed == 1
        with pytest.raises(QueueFull):
            await digest.options(debounce=60, key="b").enqueue(3)
        with pytest.raises(QueueFull):
            await digest.options(throttle=60, key="c").enqueue(4)
        assert await second.status() is JobStatus.SCHEDULED
        assert (await queue.counts()).delayed == 1
    finally:
        await queue.close()


async def test_a_debounce_records_the_replacement_and_a_repeat_changes_nothing(
    queue: Queue,
) -> None:
    broker = await queue.connected_broker()
    key = Keyed("debounce", "task", "k", 60_000)
    assert await broker.enqueue_keyed(NewJob("a", envelope(1)), key, 0) == "a"
    assert await broker.enqueue_keyed(NewJob("b", envelope(2)), key, 0) == "b"
    expected = [
        ("a", "enqueued", ("scheduled",)),
        ("b", "enqueued", ("scheduled",)),
        ("a", "aborted", ("debounced",)),
    ]
    events = [(e.job_id, e.kind, e.details) for e in await broker.events("0-0/*", 100, None)]
    assert events == expected
    replaced = await broker.record("a")
    assert replaced is not None
    assert (replaced.status, replaced.reason, replaced.replaced_by) == (
        "aborted",
        "debounced",
        "b",
    )
    assert replaced.finished_ms is not None
    # The same call again (its reply lost) answers the same and records nothing more.
    assert await broker.enqueue_keyed(NewJob("b", envelope(2)), key, 0) == "b"
    events = [(e.job_id, e.kind, e.details) for e in await broker.events("0-0/*", 100, None)]
    assert events == expected
    assert (await broker.counts()).delayed == 1


async def test_a_repeated_refused_throttle_answers_the_same_after_the_window(
    queue: Queue,
) -> None:
    """The broker call of a refused throttle, re-sent (its reply lost) once the window has
    passed, still answers the job that held the key, and writes nothing."""
    broker = await queue.connected_broker()
    key = Keyed("throttle", "task", "k", 200)
    holder = NewJob("holder", envelope(1))
    refused = NewJob("refused", envelope(2))
    assert await broker.enqueue_keyed(holder, key, 0) == "holder"
    assert await broker.enqueue_keyed(refused, key, 0) == "holder"
    await eventually(  # the window passes: a new request is accepted
        lambda: accepted(broker, key), timeout=WAIT, interval=0.05
    )
    assert await broker.enqueue_keyed(refused, key, 0) == "holder"
    assert await broker.record("refused") is None


async def accepted(broker: Broker, key: Keyed) -> bool:
    """Whether a new request for ``key`` is written (it then holds the key)."""
    fresh = NewJob(f"probe-{time.monotonic_ns()}", envelope(time.monotonic_ns()))
    return await broker.enqueue_keyed(fresh, key, 0) == fresh.job_id


def envelope(n: int) -> bytes:
    return encode(Envelope("task", (n,), {}, 1_700_000_000_000, None, None, None))


async def test_concurrent_producers_debouncing_one_key_get_one_run(
    storage_url: str, queue_name: str
) -> None:
    producers = [Queue(storage_url, name=queue_name) for _ in range(3)]
    runs: list[tuple[int, int]] = []
    for producer in producers:

        @producer.task(name="digest")
        async def digest(ctx: Context, producer: int, n: int) -> tuple[int, int]:
            runs.append((producer, n))
            return producer, n

    async def burst(index: int) -> list[Job[tuple[int, int]]]:
        task = producers[index].tasks["digest"]
        return [await task.options(debounce=0.5, key="k").enqueue(index, n) for n in range(20)]

    try:
        handles = [job for jobs in await asyncio.gather(*map(burst, range(3))) for job in jobs]
        async with running(producers[0].worker(poll_interval=0.05)):
            results = await asyncio.gather(*(job.result(timeout=WAIT) for job in handles))
            assert len(runs) == 1
            assert results == [runs[0]] * 60
            counts = await producers[0].counts()
            assert (counts.ready, counts.delayed) == (0, 0)
    finally:
        for producer in producers:
            await producer.close()


async def test_a_producer_with_exactly_its_acl_rights_can_debounce_and_throttle(
    redis_server: RedisServer, redis_client: redis.Redis, queue_name: str
) -> None:
    name = f"producer-{queue_name}"
    rules = acl_rules("producer", [queue_name]).split()
    redis_client.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
    url = f"redis://{name}:pw@127.0.0.1:{redis_server.port}/0"
    producer = Queue(url, name=queue_name)
    try:

        @producer.task()
        async def digest(ctx: Context) -> None:
            pass

        first = await digest.options(debounce=60, key="k").enqueue()
        await digest.options(debounce=60, key="k").enqueue()
        assert await first.status() is JobStatus.ABORTED
        held = await digest.options(throttle=60, key="k").enqueue()
        assert (await digest.options(throttle=60, key="k").enqueue()).id == held.id
    finally:
        await producer.close()
        redis_client.acl_deluser(name)


# -- lost replies (real Redis, through the fault-injecting proxy) ---------------------------


def lose(proxy: FaultProxy, broker: RedisBroker) -> bytes:
    match = broker._scripts["keyed"].sha.encode()
    proxy.lose_reply(match)
    return match


async def test_a_lost_reply_on_a_debounced_enqueue_neither_creates_nor_replaces_twice(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    key = Keyed("debounce", "task", "user:1", 60_000)
    assert await broker.enqueue_keyed(NewJob("a", envelope(1)), key, 0) == "a"
    match = lose(fault_proxy, broker)
    assert await broker.enqueue_keyed(NewJob("b", envelope(2)), key, 0) == "b"
    assert fault_proxy.fired(match) == 1
    assert [m.decode() for m in redis_client.zrange(broker.keys.delayed, 0, -1)] == ["b"]
    a = redis_client.hgetall(broker.keys.job("a"))
    assert (a[b"status"], a[b"reason"], a[b"replaced_by"]) == (b"aborted", b"debounced", b"b")
    assert redis_client.hget(broker.keys.job("b"), "status") == b"scheduled"
    events = [(e.job_id, e.kind, e.details) for e in await broker.events("0-0/*", 100, None)]
    assert events == [
        ("a", "enqueued", ("scheduled",)),
        ("b", "enqueued", ("scheduled",)),
        ("a", "aborted", ("debounced",)),
    ]


async def test_a_lost_reply_on_a_throttled_enqueue_writes_one_job(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    key = Keyed("throttle", "task", "acct:7", 60_000)
    match = lose(fault_proxy, broker)
    assert await broker.enqueue_keyed(NewJob("a", envelope(1)), key, 0) == "a"
    assert fault_proxy.fired(match) == 1
    lose(fault_proxy, broker)
    assert await broker.enqueue_keyed(NewJob("b", envelope(2)), key, 0) == "a"
    assert fault_proxy.fired(match) == 2  # counted since the proxy started
    assert redis_client.xlen(broker.keys.stream) == 1
    assert not redis_client.exists(broker.keys.job("b"))
    events = [(e.job_id, e.kind) for e in await broker.events("0-0/*", 100, None)]
    assert events == [("a", "enqueued")]


# -- bad options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"debounce": 5}, "debounce needs a key"),
        ({"throttle": 5}, "throttle needs a key"),
        ({"key": "user:1"}, "give debounce= or throttle="),
        ({"debounce": 5, "throttle": 5, "key": "k"}, "either debounce or throttle"),
        ({"debounce": 5, "key": "k", "delay": 1}, "cannot be combined with delay"),
        ({"throttle": 5, "key": "k", "job_id": "j"}, "cannot be combined with job_id"),
        ({"debounce": 5, "key": "k", "depends_on": ["j"]}, "cannot be combined with depends_on"),
        ({"debounce": 0, "key": "k"}, "between 1 ms"),
        ({"throttle": -1, "key": "k"}, "between 1 ms"),
        ({"debounce": float("nan"), "key": "k"}, "between 1 ms"),
        ({"debounce": timedelta(days=400), "key": "k"}, "between 1 ms"),
        ({"debounce": "5", "key": "k"}, "seconds or a timedelta"),
        ({"debounce": True, "key": "k"}, "seconds or a timedelta"),
        ({"debounce": 5, "key": ""}, "key: 1 to 200"),
        ({"debounce": 5, "key": "user\n1"}, "key: 1 to 200"),
        ({"debounce": 5, "key": "k" * 201}, "key: 1 to 200"),
    ],
)
def test_bad_debounce_and_throttle_options_are_refused(
    options: dict[str, object], message: str
) -> None:
    queue = Queue("memory://bad-options")

    @queue.task()
    async def digest(ctx: Context) -> None:
        pass

    with pytest.raises(ConfigurationError, match=message):
        digest.options(**options)
    with pytest.raises(ConfigurationError, match=message):
        queue.options(**options)


async def test_a_workflow_refuses_debounced_and_throttled_steps(queue: Queue) -> None:
    @queue.task()
    async def digest(ctx: Context, n: int) -> int:
        return n

    debounced = digest.options(debounce=5, key="k").prepare(1)
    with pytest.raises(ConfigurationError, match="not to the steps of a group or a chain"):
        await group([digest.prepare(0), debounced]).enqueue()
    throttled = digest.options(throttle=5, key="k").prepare(1)
    with pytest.raises(ConfigurationError, match="not to the steps of a group or a chain"):
        await throttled.then(digest.partial()).enqueue()
    counts = await queue.counts()
    assert (counts.ready, counts.delayed) == (0, 0)


@pytest.mark.timeout(60)
async def test_aioqueue_job_shows_which_job_replaced_a_debounced_one(
    redis_server: RedisServer,
) -> None:
    url, name = redis_server.url, f"deb-cli-{uuid.uuid4().hex[:8]}"
    queue = Queue(url, name=name)
    try:
        first = await queue.options(debounce=30, key="k").enqueue("sleep_then_return", 0, 1)
        second = await queue.options(debounce=30, key="k").enqueue("sleep_then_return", 0, 2)
        assert first.id != second.id
        text = await asyncio.to_thread(
            run_cli, "job", "basic_app:queue", first.id, url=url, queue=name
        )
        assert text.returncode == 0, text.stderr
        assert f"replaced by {second.id}" in text.stdout
        assert "run at" not in text.stdout  # it is aborted: it will not run
        shown = await asyncio.to_thread(
            run_cli, "job", "basic_app:queue", first.id, "--json", url=url, queue=name
        )
        assert json.loads(shown.stdout)["replaced_by"] == second.id
    finally:
        await queue.purge()
        await queue.close()
