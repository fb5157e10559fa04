"""One broker contract, two brokers: every test here runs against Redis and ``memory://``.

The tests speak the :class:`~aioqueue.brokers.base.Broker` protocol directly (consumers are
just names, envelopes opaque bytes), so the in-process broker cannot drift from the Lua
scripts. The last few run the same Queue/Worker scenario on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from helpers import eventually, running

from aioqueue import Backoff, Context, JobAborted, JobStatus, Queue, QueueFull
from aioqueue.brokers.base import (
    Again,
    Broker,
    CronClaim,
    CronRun,
    Delivery,
    Done,
    Finished,
    Limits,
    NewJob,
    QueueCounts,
    Recorded,
)
from aioqueue.brokers.memory import MemoryBroker, reset_stores
from aioqueue.brokers.redis import RedisBroker
from aioqueue.serialization import Envelope, encode

WAIT = 10.0
"""Longest any single wait in these tests may take before the test fails."""


def now_ms() -> int:
    return int(time.time() * 1000)


LEASE_MS = 30_000
"""A lease no test outlives: a running previous cron run holds its lease throughout."""


def job(
    job_id: str, run_at_ms: int = 0, *, delay_ms: int = 0, envelope: bytes | None = None
) -> NewJob:
    body = f"envelope of {job_id}".encode() if envelope is None else envelope
    return NewJob(job_id, body, run_at_ms, delay_ms)


def entries(deliveries: list[Delivery]) -> list[str]:
    return [d.entry_id for d in deliveries]


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.job_id for d in deliveries]


async def next_millisecond() -> None:
    """Wait until the wall clock has moved to a later millisecond (ordering by time)."""
    start = now_ms()
    await eventually(lambda: now_ms() > start, timeout=WAIT, interval=0.001)


class Brokers:
    """Opens brokers on one fresh queue of the storage under test."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.opened: list[Broker] = []

    async def open(self, result_ttl: float = 86_400.0) -> Broker:
        """A connected broker, made the way workers make theirs (``Queue.new_broker``)."""
        broker = Queue(self.url, name=self.queue, result_ttl=result_ttl).new_broker()
        await broker.connect()
        await broker.ensure_group()
        self.opened.append(broker)
        return broker

    async def close(self) -> None:
        for broker in self.opened:
            await broker.close()


@pytest.fixture
def storage_url(every_storage_url: str) -> str:
    """The contract holds on a single Redis, the memory store and a Redis Cluster."""
    return every_storage_url


@pytest.fixture
async def brokers(storage_url: str, queue_name: str) -> AsyncIterator[Brokers]:
    opened = Brokers(storage_url, queue_name)
    yield opened
    await opened.close()


@pytest.fixture
async def broker(brokers: Brokers) -> Broker:
    return await brokers.open()


@contextlib.asynccontextmanager
async def abort_listener(broker: Broker) -> AsyncIterator[list[str]]:
    """Listen for abort requests for the duration of the block; yields the ids heard."""
    heard: list[str] = []
    ready = asyncio.Event()
    task = asyncio.create_task(broker.listen_aborts(heard.append, ready.set))
    try:
        await asyncio.wait_for(ready.wait(), WAIT)
        yield heard
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def dead_letter(broker: Broker, job_id: str) -> None:
    await broker.enqueue([job(job_id)], 0)
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    await broker.settle("c1", [Finished(delivery, "dead", b"boom", "retries used up")])


# -- the broker kinds ----------------------------------------------------------------------


async def test_a_memory_url_gives_a_memory_broker_and_a_redis_url_a_redis_one(
    storage_url: str, broker: Broker
) -> None:
    expected = MemoryBroker if storage_url.startswith("memory://") else RedisBroker
    assert isinstance(broker, expected)


# -- enqueue -------------------------------------------------------------------------------


async def test_enqueue_reports_new_jobs_and_ignores_known_ids(broker: Broker) -> None:
    before = now_ms()
    assert await broker.enqueue([job("a"), job("b")], 0) == [True, True]
    other = job("a", envelope=b"another envelope")
    assert await broker.enqueue([other, job("c"), job("c")], 0) == [False, True, False]
    record = await broker.record("a")
    assert record is not None
    assert (record.status, record.attempt, record.deliveries) == ("queued", 1, 0)
    assert record.envelope == b"envelope of a"
    assert record.enqueued_ms is not None
    assert record.enqueued_ms >= before
    assert (record.started_ms, record.finished_ms, record.result, record.error) == (None,) * 4
    assert await broker.counts() == QueueCounts(ready=3, pending=0, delayed=0, dead=0)


async def test_enqueueing_the_same_job_again_reports_it_created_once_more(
    broker: Broker,
) -> None:
    # The envelope holds the id and the enqueue time: the same bytes again are the same
    # enqueue repeated after a lost reply, not a second job.
    assert await broker.enqueue([job("a"), job("later", delay_ms=60_000)], 0) == [True, True]
    assert await broker.enqueue([job("a"), job("later", delay_ms=60_000)], 0) == [True, True]
    assert await broker.enqueue([job("a", envelope=b"another job")], 0) == [False]
    assert await broker.counts() == QueueCounts(ready=1, pending=0, delayed=1, dead=0)
    record = await broker.record("a")
    assert record is not None
    assert record.envelope == b"envelope of a"
    # Repeated once it ran, it is still the same job: nothing runs twice.
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    assert await broker.settle("c1", [Done(delivery, b"")]) == [Recorded.YES]
    assert await broker.enqueue([job("a")], 0) == [True]
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=1, dead=0)


async def test_a_job_id_stays_taken_while_its_finished_record_is_kept(broker: Broker) -> None:
    await broker.enqueue([job("a")], 0)
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    assert await broker.settle("c1", [Done(delivery, b"result")]) == [Recorded.YES]
    assert await broker.enqueue([job("a", envelope=b"another envelope")], 0) == [False]
    record = await broker.record("a")
    assert record is not None
    assert record.status == "complete"
    assert (await broker.counts()).ready == 0


async def test_queue_full_refuses_the_whole_batch_and_writes_nothing(broker: Broker) -> None:
    await broker.enqueue([job("ready"), job("later", now_ms() + 60_000)], 3)
    with pytest.raises(QueueFull):
        await broker.enqueue([job("x"), job("y")], 3)
    assert await broker.record("x") is None
    assert await broker.record("y") is None
    assert await broker.counts() == QueueCounts(ready=1, pending=0, delayed=1, dead=0)
    assert await broker.enqueue([job("z")], 3) == [True]
    with pytest.raises(QueueFull):
        await broker.enqueue([job("w", now_ms() + 60_000)], 3)


async def test_known_ids_do_not_count_against_max_size(broker: Broker) -> None:
    await broker.enqueue([job("a"), job("b")], 2)
    assert await broker.enqueue([job("a"), job("b")], 2) == [True, True]
    assert await broker.enqueue([job("a", envelope=b"other")], 2) == [False]
    with pytest.raises(QueueFull):
        await broker.enqueue([job("a"), job("c")], 2)
    assert await broker.record("c") is None


async def test_running_jobs_count_against_max_size_until_settled(broker: Broker) -> None:
    await broker.enqueue([job("a")], 1)
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    with pytest.raises(QueueFull):
        await broker.enqueue([job("b")], 1)
    assert await broker.settle("c1", [Done(delivery, b"")]) == [Recorded.YES]
    assert await broker.enqueue([job("b")], 1) == [True]


async def test_an_overflowing_batch_larger_than_one_script_call_writes_nothing(
    broker: Broker,
) -> None:
    # The protocol promises "writing nothing of the batch", however large the batch is.
    with pytest.raises(QueueFull):
        await broker.enqueue([job(f"j{i}") for i in range(700)], 600)
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=0)


# -- fetch ---------------------------------------------------------------------------------


async def test_fetch_hands_out_no_more_jobs_than_asked_oldest_first(broker: Broker) -> None:
    await broker.enqueue([job(f"j{i}") for i in range(5)], 0)
    deliveries = await broker.fetch("c1", 2, 1.0, 5)
    assert ids(deliveries) == ["j0", "j1"]
    first = deliveries[0]
    assert (first.envelope, first.attempt, first.deliveries) == (b"envelope of j0", 1, 1)
    assert await broker.counts() == QueueCounts(ready=3, pending=2, delayed=0, dead=0)
    record = await broker.record("j0")
    assert record is not None
    assert (record.status, record.worker, record.deliveries) == ("running", "c1", 1)
    assert record.started_ms is not None
    assert ids(await broker.fetch("c2", 10, 1.0, 5)) == ["j2", "j3", "j4"]


async def test_fetch_on_an_empty_queue_returns_nothing_once_its_block_is_over(
    broker: Broker,
) -> None:
    started = time.monotonic()
    assert await asyncio.wait_for(broker.fetch("c1", 1, 0.2, 5), WAIT) == []
    assert time.monotonic() - started >= 0.15


async def test_fetch_without_block_time_returns_at_once_on_an_empty_queue(broker: Broker) -> None:
    # "Wait up to block seconds": 0 means do not wait (not "wait forever").
    assert await asyncio.wait_for(broker.fetch("c1", 1, 0.0, 5), 2.0) == []


async def test_blocked_fetch_wakes_as_soon_as_a_job_is_enqueued(brokers: Brokers) -> None:
    producer, consumer = await brokers.open(), await brokers.open()
    started = time.monotonic()
    fetch = asyncio.create_task(consumer.fetch("c1", 5, 30.0, 5))
    await producer.enqueue([job("a")], 0)
    assert ids(await asyncio.wait_for(fetch, WAIT)) == ["a"]
    assert time.monotonic() - started < WAIT


async def test_blocked_fetch_wakes_when_a_delayed_job_is_promoted(brokers: Brokers) -> None:
    producer, consumer = await brokers.open(), await brokers.open()
    await producer.enqueue([job("later", delay_ms=60_000)], 0)
    fetch = asyncio.create_task(consumer.fetch("c1", 5, 30.0, 5))
    assert await producer.promote_due(10, early=True) is None
    assert ids(await asyncio.wait_for(fetch, WAIT)) == ["later"]


async def test_blocked_fetch_wakes_when_another_consumer_releases_its_jobs(
    brokers: Brokers,
) -> None:
    first, second = await brokers.open(), await brokers.open()
    await first.enqueue([job("a")], 0)
    assert ids(await first.fetch("c1", 1, 1.0, 5)) == ["a"]
    fetch = asyncio.create_task(second.fetch("c2", 5, 30.0, 5))
    assert await first.release("c1") == 1
    assert ids(await asyncio.wait_for(fetch, WAIT)) == ["a"]


# -- deliveries, leases and ownership -------------------------------------------------------


async def test_each_takeover_counts_a_delivery_until_the_job_is_dead_lettered(
    broker: Broker,
) -> None:
    await broker.enqueue([job("a")], 0)
    waiter = asyncio.create_task(broker.wait_final("a", WAIT))
    assert [d.deliveries for d in await broker.fetch("c1", 1, 1.0, 2)] == [1]
    assert [d.deliveries for d in await broker.reclaim("c2", 10, 0.0, 2)] == [2]
    assert await broker.reclaim("c3", 10, 0.0, 2) == []
    record = await asyncio.wait_for(waiter, WAIT)
    assert record is not None
    assert (record.status, record.reason, record.deliveries) == ("dead", "worker lost 2 times", 3)
    assert record.worker == "c3"
    assert record.finished_ms is not None
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=1)
    assert await broker.dead_ids() == ["a"]


async def test_reclaim_takes_only_leases_idle_longer_than_min_idle(broker: Broker) -> None:
    await broker.enqueue([job("idle"), job("renewed")], 0)
    deliveries = await broker.fetch("c1", 2, 1.0, 5)
    renewed = deliveries[1]
    assert await broker.reclaim("c2", 10, 60.0, 5) == []
    taken: list[Delivery] = []

    async def renew_then_reclaim() -> bool:
        assert await broker.renew("c1", [renewed]) == ([], [])
        taken.extend(await broker.reclaim("c2", 10, 0.3, 5))
        return bool(taken)

    await eventually(renew_then_reclaim, timeout=WAIT)
    assert ids(taken) == ["idle"]
    assert (taken[0].entry_id, taken[0].deliveries) == (deliveries[0].entry_id, 2)
    record = await broker.record("idle")
    assert record is not None
    assert record.worker == "c2"


async def test_reclaim_drops_entries_of_jobs_that_are_already_final(broker: Broker) -> None:
    await broker.enqueue([job("a")], 0)
    await broker.fetch("c1", 1, 1.0, 5)
    assert await broker.abort("a") == "running"
    assert await broker.reclaim("c2", 10, 0.0, 5) == []
    assert (await broker.counts()).pending == 0
    record = await broker.record("a")
    assert record is not None
    assert record.status == "aborted"


async def test_outcomes_from_a_consumer_that_lost_its_lease_are_ignored(
    brokers: Brokers,
) -> None:
    stale, current = await brokers.open(), await brokers.open()
    await stale.enqueue([job("a"), job("b"), job("c")], 0)
    old = await stale.fetch("c1", 3, 1.0, 5)
    new = await current.reclaim("c2", 10, 0.0, 5)
    assert ids(new) == ["a", "b", "c"]
    outcomes = await stale.settle(
        "c1",
        [
            Done(old[0], b"stale result"),
            Again(old[1], 0, b"err", "stale retry"),
            Finished(old[2], "failed", b"err", "stale failure"),
        ],
    )
    assert outcomes == [Recorded.LOST] * 3
    for job_id in ("a", "b", "c"):
        record = await stale.record(job_id)
        assert record is not None
        assert (record.status, record.worker, record.result) == ("running", "c2", None)
    assert await stale.counts() == QueueCounts(ready=0, pending=3, delayed=0, dead=0)
    assert await stale.renew("c1", old) == (entries(old), [])
    assert await current.settle("c2", [Done(d, b"ok") for d in new]) == [Recorded.YES] * 3
    record = await current.record("a")
    assert record is not None
    assert (record.status, record.result) == ("complete", b"ok")
    assert await current.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=0)


async def test_renew_keeps_owned_leases_and_reports_aborted_jobs(broker: Broker) -> None:
    await broker.enqueue([job("a"), job("b")], 0)
    deliveries = await broker.fetch("c1", 2, 1.0, 5)
    assert await broker.renew("c1", deliveries) == ([], [])
    assert await broker.abort("a") == "running"
    assert await broker.renew("c1", deliveries) == ([], [deliveries[0].entry_id])
    assert await broker.renew("c2", deliveries) == (entries(deliveries), [])
    assert await broker.renew("c1", []) == ([], [])


async def test_release_hands_jobs_back_without_counting_the_cut_short_delivery(
    broker: Broker,
) -> None:
    await broker.enqueue([job("a"), job("b"), job("other")], 0)
    mine = await broker.fetch("c1", 2, 1.0, 5)
    await broker.fetch("c2", 1, 1.0, 5)
    assert await broker.release("c1") == 2
    assert await broker.renew("c1", mine) == (entries(mine), [])
    for job_id in ("a", "b"):
        record = await broker.record(job_id)
        assert record is not None
        assert (record.status, record.deliveries) == ("queued", 0)
    assert await broker.counts() == QueueCounts(ready=2, pending=1, delayed=0, dead=0)
    again = await broker.fetch("c3", 5, 1.0, 5)
    assert [(d.job_id, d.deliveries) for d in again] == [("a", 1), ("b", 1)]
    assert {d.entry_id for d in again}.isdisjoint(d.entry_id for d in mine)
    assert await broker.release("nobody") == 0


async def test_release_does_not_bring_back_an_aborted_job(broker: Broker) -> None:
    await broker.enqueue([job("a")], 0)
    await broker.fetch("c1", 1, 1.0, 5)
    await broker.abort("a")
    assert await broker.release("c1") == 0
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=0)
    record = await broker.record("a")
    assert record is not None
    assert record.status == "aborted"


async def test_beginning_the_same_delivery_again_counts_it_once(broker: Broker) -> None:
    # A delivery is (consumer, entry): begun again (a begin whose reply was lost, adopted
    # afterwards) it is handed back as it stands.
    await broker.enqueue([job("a")], 0)
    (first,) = await broker.fetch("c1", 1, 1.0, 5)
    assert await broker.adopt("c1", (), 10, 5) == [first]
    assert await broker.adopt("c1", (), 10, 5) == [first]
    record = await broker.record("a")
    assert record is not None
    assert (record.status, record.worker, record.deliveries, record.attempt) == (
        "running",
        "c1",
        1,
        1,
    )
    assert await broker.counts() == QueueCounts(ready=0, pending=1, delayed=0, dead=0)


async def test_reclaiming_own_idle_entries_returns_them_without_a_new_delivery(
    broker: Broker,
) -> None:
    await broker.enqueue([job("a"), job("b")], 0)
    mine = await broker.fetch("c1", 2, 1.0, 5)
    assert sorted(ids(await broker.reclaim("c1", 10, 0.0, 5))) == ["a", "b"]
    again = await broker.reclaim("c1", 10, 0.0, 5)
    assert sorted(again, key=lambda d: d.job_id) == mine
    for job_id in ("a", "b"):
        record = await broker.record(job_id)
        assert record is not None
        assert (record.status, record.worker, record.deliveries) == ("running", "c1", 1)
    assert await broker.renew("c1", mine) == ([], [])
    assert await broker.settle("c1", [Done(d, b"") for d in mine]) == [Recorded.YES, Recorded.YES]


async def test_adopt_begins_the_entries_this_consumer_holds_but_does_not_know(
    brokers: Brokers,
) -> None:
    broker = await brokers.open()
    await broker.enqueue([job(f"j{i}") for i in range(4)], 0)
    mine = await broker.fetch("c1", 3, 1.0, 5)
    theirs = await broker.fetch("c2", 1, 1.0, 5)
    known = {mine[0].entry_id}
    assert await broker.adopt("c1", known, 10, 5) == mine[1:]
    assert await broker.adopt("c1", known, 1, 5) == mine[1:2]
    assert await broker.adopt("c1", entries(mine), 10, 5) == []
    assert await broker.adopt("c3", (), 10, 5) == []
    assert await broker.adopt("c2", (), 10, 5) == theirs
    # The entry of a job aborted meanwhile is dropped, not adopted.
    assert await broker.abort("j1") == "running"
    assert await broker.adopt("c1", known, 10, 5) == [mine[2]]
    assert await broker.counts() == QueueCounts(ready=0, pending=3, delayed=0, dead=0)
    for job_id in ("j0", "j2"):
        record = await broker.record(job_id)
        assert record is not None
        assert (record.status, record.deliveries) == ("running", 1)


async def test_renew_keeps_every_lease_of_a_long_list(broker: Broker) -> None:
    # More entries than one script call takes (500): none may be reported lost.
    await broker.enqueue([job(f"j{i}") for i in range(700)], 0)
    mine = await broker.fetch("c1", 700, 1.0, 5)
    assert len(mine) == 700
    assert await broker.renew("c1", mine) == ([], [])
    assert await broker.renew("c2", mine) == (entries(mine), [])
    assert await broker.abort("j650") == "running"
    assert await broker.renew("c1", mine) == ([], [mine[650].entry_id])


async def test_release_keeps_the_entries_it_is_told_to_keep(broker: Broker) -> None:
    await broker.enqueue([job("a"), job("b"), job("c")], 0)
    kept, *handed = await broker.fetch("c1", 3, 1.0, 5)
    assert await broker.release("c1", keep={kept.entry_id}) == 2
    assert await broker.counts() == QueueCounts(ready=2, pending=1, delayed=0, dead=0)
    assert await broker.renew("c1", [kept, *handed]) == (entries(handed), [])
    record = await broker.record("a")
    assert record is not None
    assert (record.status, record.worker, record.deliveries) == ("running", "c1", 1)
    assert await broker.settle("c1", [Done(kept, b"kept")]) == [Recorded.YES]
    assert await broker.release("c1") == 0
    assert ids(await broker.fetch("c2", 5, 1.0, 5)) == ["b", "c"]


async def test_release_hands_back_only_jobs_still_unsettled(broker: Broker) -> None:
    await broker.enqueue([job("done"), job("retry"), job("running")], 0)
    done, retry, _ = await broker.fetch("c1", 3, 1.0, 5)
    assert await broker.settle("c1", [Done(done, b"")]) == [Recorded.YES]
    assert await broker.settle("c1", [Again(retry, 60_000, b"", "ValueError")]) == [Recorded.YES]
    assert await broker.release("c1") == 1
    assert await broker.release("c1") == 0
    record = await broker.record("retry")
    assert record is not None
    assert (record.status, record.attempt) == ("retrying", 2)
    assert ids(await broker.fetch("c2", 5, 1.0, 5)) == ["running"]


async def test_forget_dead_consumers_removes_only_idle_empty_consumers_of_gone_workers(
    broker: Broker,
) -> None:
    await broker.enqueue([job("a"), job("b"), job("c")], 0)
    (a,) = await broker.fetch("gone", 1, 1.0, 5)
    (b,) = await broker.fetch("alive", 1, 1.0, 5)
    await broker.fetch("holding", 1, 1.0, 5)
    await broker.heartbeat("alive", {"pid": 1}, 30.0)
    assert await broker.settle("gone", [Done(a, b"")]) == [Recorded.YES]
    assert await broker.settle("alive", [Done(b, b"")]) == [Recorded.YES]
    assert await broker.forget_dead_consumers(60.0) == 0
    assert await broker.forget_dead_consumers(0.0) == 1
    assert await broker.forget_dead_consumers(0.0) == 0
    # A stopping worker that holds nothing takes its consumer with it.
    await broker.forget_worker("alive")
    assert await broker.forget_dead_consumers(0.0) == 0
    # A consumer still holding an entry is never removed: its entry would go with it.
    await broker.forget_worker("holding")
    assert await broker.counts() == QueueCounts(ready=0, pending=1, delayed=0, dead=0)
    assert ids(await broker.reclaim("next", 10, 0.0, 5)) == ["c"]


# -- settling ------------------------------------------------------------------------------


async def test_a_settled_job_keeps_its_result_and_leaves_the_queue(broker: Broker) -> None:
    await broker.enqueue([job("a")], 0)
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    before = now_ms()
    assert await broker.settle("c1", [Done(delivery, b"the result")]) == [Recorded.YES]
    record = await broker.record("a")
    assert record is not None
    assert (record.status, record.result, record.worker) == ("complete", b"the result", "c1")
    assert record.finished_ms is not None
    assert record.finished_ms >= before
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=0)


async def test_a_retry_waits_in_the_delayed_set_and_runs_as_the_next_attempt(
    broker: Broker,
) -> None:
    await broker.enqueue([job("a")], 0)
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    before = await broker.now_ms()
    assert await broker.settle("c1", [Again(delivery, 60_000, b"error", "ValueError")]) == [
        Recorded.YES
    ]
    after = await broker.now_ms()
    record = await broker.record("a")
    assert record is not None
    assert (record.status, record.attempt, record.deliveries) == ("retrying", 2, 0)
    assert (record.error, record.reason) == (b"error", "ValueError")
    assert record.run_at_ms is not None
    assert before + 60_000 <= record.run_at_ms <= after + 60_000
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=1, dead=0)
    assert await broker.fetch("c1", 1, 0.05, 5) == []
    next_due = await broker.promote_due(10)
    assert next_due is not None
    assert 50.0 < next_due <= 60.0
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=1, dead=0)
    assert await broker.promote_due(10, early=True) is None
    (retry,) = await broker.fetch("c1", 1, 1.0, 5)
    assert (retry.job_id, retry.attempt, retry.deliveries) == ("a", 2, 1)
    assert retry.entry_id != delivery.entry_id


async def test_settling_again_after_a_lost_reply_changes_nothing(broker: Broker) -> None:
    await broker.enqueue([job("retry"), job("done")], 0)
    retry, done = await broker.fetch("c1", 2, 1.0, 5)
    settlements = [Again(retry, 60_000, b"error", "ValueError"), Done(done, b"result")]
    assert await broker.settle("c1", settlements) == [Recorded.YES, Recorded.YES]
    first = await broker.record("retry")
    assert await broker.settle("c1", settlements) == [Recorded.YES, Recorded.YES]
    record = await broker.record("retry")
    assert record == first
    assert record is not None
    assert (record.status, record.attempt) == ("retrying", 2)
    done_record = await broker.record("done")
    assert done_record is not None
    assert (done_record.status, done_record.result) == ("complete", b"result")
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=1, dead=0)


async def test_a_consumer_that_lost_the_entry_cannot_settle_it(brokers: Brokers) -> None:
    broker = await brokers.open()
    await broker.enqueue([job("a")], 0)
    (old,) = await broker.fetch("c1", 1, 1.0, 5)
    (new,) = await broker.reclaim("c2", 10, 0.0, 5)
    assert await broker.settle("c1", [Done(old, b"stale")]) == [Recorded.LOST]
    assert await broker.settle("c2", [Done(new, b"fresh")]) == [Recorded.YES]
    assert await broker.settle("c1", [Done(old, b"stale")]) == [Recorded.LOST]
    record = await broker.record("a")
    assert record is not None
    assert (record.status, record.result, record.worker) == ("complete", b"fresh", "c2")
    assert await broker.settle("c1", []) == []


async def test_failed_and_dead_settlements_record_error_and_reason(broker: Broker) -> None:
    await broker.enqueue([job("failed"), job("dead")], 0)
    failed, dead = await broker.fetch("c1", 2, 1.0, 5)
    outcomes = await broker.settle(
        "c1",
        [
            Finished(failed, "failed", b"e1", "Fail raised"),
            Finished(dead, "dead", b"e2", "retries used up"),
        ],
    )
    assert outcomes == [Recorded.YES, Recorded.YES]
    record = await broker.record("failed")
    assert record is not None
    assert (record.status, record.error, record.reason) == ("failed", b"e1", "Fail raised")
    record = await broker.record("dead")
    assert record is not None
    assert (record.status, record.error, record.reason) == ("dead", b"e2", "retries used up")
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=1)
    assert await broker.dead_ids() == ["dead"]


async def test_an_aborted_job_is_not_overwritten_by_a_late_outcome(broker: Broker) -> None:
    await broker.enqueue([job("a"), job("b"), job("c")], 0)
    a, b, c = await broker.fetch("c1", 3, 1.0, 5)
    for job_id in ("a", "b", "c"):
        assert await broker.abort(job_id) == "running"
    outcomes = await broker.settle(
        "c1",
        [
            Done(a, b"late"),
            Again(b, 0, b"late", "late retry"),
            Finished(c, "failed", b"late", "late failure"),
        ],
    )
    # Acked (this consumer's), but not applied: the job stays aborted.
    assert outcomes == [Recorded.ABORTED] * 3
    for job_id in ("a", "b", "c"):
        record = await broker.record(job_id)
        assert record is not None
        assert (record.status, record.result, record.error) == ("aborted", None, None)
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=0)


async def test_an_aborted_job_may_be_settled_as_aborted(broker: Broker) -> None:
    await broker.enqueue([job("a")], 0)
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    await broker.abort("a")
    outcomes = await broker.settle(
        "c1", [Finished(delivery, "aborted", b"cancelled", "on request")]
    )
    assert outcomes == [Recorded.YES]
    record = await broker.record("a")
    assert record is not None
    assert (record.status, record.error, record.reason) == ("aborted", b"cancelled", "on request")
    assert (await broker.counts()).pending == 0


# -- delayed jobs --------------------------------------------------------------------------


async def test_a_delayed_job_waits_until_due_and_promote_reports_the_time_to_the_next(
    broker: Broker,
) -> None:
    first = now_ms() + 60_000
    await broker.enqueue([job("first", first), job("soon", delay_ms=1_000)], 0)
    record = await broker.record("first")
    assert record is not None
    assert (record.status, record.run_at_ms) == ("scheduled", first)
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=2, dead=0)
    assert await broker.fetch("c1", 5, 0.05, 5) == []
    next_due = await broker.promote_due(10)
    assert next_due is not None
    assert 0.0 <= next_due <= 1.0

    async def soon_promoted() -> bool:
        await broker.promote_due(10)
        return (await broker.counts()).ready == 1

    await eventually(soon_promoted, timeout=WAIT)
    record = await broker.record("soon")
    assert record is not None
    assert record.status == "queued"
    assert ids(await broker.fetch("c1", 5, 1.0, 5)) == ["soon"]
    next_due = await broker.promote_due(10)
    assert next_due is not None
    assert 50.0 < next_due <= 60.0
    assert await broker.counts() == QueueCounts(ready=0, pending=1, delayed=1, dead=0)


async def test_promote_early_moves_delayed_jobs_whether_due_or_not(broker: Broker) -> None:
    await broker.enqueue([job("first", delay_ms=60_000), job("second", delay_ms=120_000)], 0)
    next_due = await broker.promote_due(1, early=True)
    assert next_due is not None
    assert 110.0 < next_due <= 120.0
    record = await broker.record("first")
    assert record is not None
    assert record.status == "queued"
    assert ids(await broker.fetch("c1", 5, 1.0, 5)) == ["first"]
    assert await broker.promote_due(10, early=True) is None
    assert await broker.promote_due(10, early=True) is None
    assert ids(await broker.fetch("c1", 5, 1.0, 5)) == ["second"]
    assert await broker.promote_due(10) is None


async def test_promote_moves_at_most_limit_jobs_earliest_first(broker: Broker) -> None:
    due = [job(f"d{i}", delay_ms=60_000 * (i + 1)) for i in range(3)]
    await broker.enqueue(due, 0)
    next_due = await broker.promote_due(2, early=True)
    assert next_due is not None
    assert 170.0 < next_due <= 180.0
    assert await broker.counts() == QueueCounts(ready=2, pending=0, delayed=1, dead=0)
    assert ids(await broker.fetch("c1", 5, 1.0, 5)) == ["d0", "d1"]


async def test_a_job_due_now_or_in_the_past_is_ready_at_once(broker: Broker) -> None:
    await broker.enqueue([job("past", now_ms() - 1_000), job("now", 0, delay_ms=0)], 0)
    assert await broker.counts() == QueueCounts(ready=2, pending=0, delayed=0, dead=0)
    assert await broker.promote_due(10) is None


async def test_a_delay_counts_from_the_broker_clock_and_never_shortens_run_at(
    broker: Broker,
) -> None:
    before = await broker.now_ms()
    far = before + 600_000
    await broker.enqueue(
        [
            job("delayed", delay_ms=60_000),
            job("far", far, delay_ms=60_000),
            job("past", before - 1_000, delay_ms=60_000),
        ],
        0,
    )
    after = await broker.now_ms()
    runs = {}
    for job_id in ("delayed", "far", "past"):
        record = await broker.record(job_id)
        assert record is not None
        assert record.status == "scheduled"
        runs[job_id] = record.run_at_ms
    assert runs["far"] == far
    for job_id in ("delayed", "past"):
        run_at = runs[job_id]
        assert run_at is not None
        assert before + 60_000 <= run_at <= after + 60_000
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=3, dead=0)


async def test_the_broker_clock_is_the_wall_clock(broker: Broker) -> None:
    before = now_ms()
    clock = await broker.now_ms()
    after = now_ms()
    # Redis runs on this machine here: its clock and ours agree within a little slack.
    assert before - 1_000 <= clock <= after + 1_000


# -- abort ---------------------------------------------------------------------------------


async def test_aborting_a_queued_job_takes_it_out_of_the_ready_queue(broker: Broker) -> None:
    await broker.enqueue([job("a"), job("b")], 0)
    async with abort_listener(broker) as heard:
        assert await broker.abort("a") == "queued"
        assert await broker.abort("a") == "aborted"
        assert await broker.counts() == QueueCounts(ready=1, pending=0, delayed=0, dead=0)
        assert ids(await broker.fetch("c1", 5, 1.0, 5)) == ["b"]
    assert heard == []
    record = await broker.record("a")
    assert record is not None
    assert record.status == "aborted"
    assert record.finished_ms is not None


async def test_aborting_a_scheduled_or_retrying_job_takes_it_out_of_the_delayed_set(
    broker: Broker,
) -> None:
    await broker.enqueue([job("scheduled", delay_ms=60_000), job("retrying")], 0)
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    assert await broker.settle("c1", [Again(delivery, 60_000, b"err", "ValueError")]) == [
        Recorded.YES
    ]
    assert await broker.abort("scheduled") == "scheduled"
    assert await broker.abort("retrying") == "retrying"
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=0)
    assert await broker.promote_due(10, early=True) is None
    assert await broker.fetch("c1", 5, 0.05, 5) == []


async def test_aborting_a_running_job_tells_the_abort_listeners(brokers: Brokers) -> None:
    worker, producer = await brokers.open(), await brokers.open()
    await producer.enqueue([job("queued"), job("running")], 0)
    async with abort_listener(worker) as heard:
        assert ids(await worker.fetch("c1", 1, 1.0, 5)) == ["queued"]
        await worker.fetch("c1", 1, 1.0, 5)
        assert await producer.abort("running") == "running"
        await eventually(lambda: heard == ["running"], timeout=WAIT)
    record = await producer.record("running")
    assert record is not None
    assert record.status == "aborted"
    assert (await producer.counts()).pending == 2


async def test_aborting_a_finished_or_unknown_job_changes_nothing(broker: Broker) -> None:
    await broker.enqueue([job("a")], 0)
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    await broker.settle("c1", [Done(delivery, b"kept")])
    assert await broker.abort("a") == "complete"
    record = await broker.record("a")
    assert record is not None
    assert (record.status, record.result) == ("complete", b"kept")
    assert await broker.abort("missing") == "not_found"
    assert await broker.record("missing") is None


# -- waiting for results -------------------------------------------------------------------


async def test_wait_final_returns_a_finished_job_at_once(broker: Broker) -> None:
    await broker.enqueue([job("a")], 0)
    (delivery,) = await broker.fetch("c1", 1, 1.0, 5)
    await broker.settle("c1", [Done(delivery, b"done")])
    record = await asyncio.wait_for(broker.wait_final("a", None), WAIT)
    assert record is not None
    assert record.result == b"done"


async def test_wait_final_of_an_unknown_job_returns_none(broker: Broker) -> None:
    assert await asyncio.wait_for(broker.wait_final("missing", None), WAIT) is None


async def test_wait_final_wakes_when_the_job_finishes(brokers: Brokers) -> None:
    producer, worker = await brokers.open(), await brokers.open()
    await producer.enqueue([job("a"), job("b")], 0)
    done = asyncio.create_task(producer.wait_final("a", WAIT))
    aborted = asyncio.create_task(producer.wait_final("b", WAIT))
    delivery, _ = await worker.fetch("c1", 2, 1.0, 5)
    await worker.settle("c1", [Done(delivery, b"result")])
    await worker.abort("b")
    record = await asyncio.wait_for(done, WAIT)
    assert record is not None
    assert (record.status, record.result) == ("complete", b"result")
    record = await asyncio.wait_for(aborted, WAIT)
    assert record is not None
    assert record.status == "aborted"


async def test_wait_final_raises_timeout_error_when_the_job_does_not_finish(
    broker: Broker,
) -> None:
    await broker.enqueue([job("a")], 0)
    await broker.fetch("c1", 1, 1.0, 5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(broker.wait_final("a", 0.2), WAIT)
    assert 0.15 <= time.monotonic() - started < WAIT


async def test_finished_records_expire_after_the_result_ttl_but_dead_letters_stay(
    brokers: Brokers,
) -> None:
    broker = await brokers.open(result_ttl=0.3)
    await broker.enqueue([job("complete"), job("failed"), job("dead"), job("aborted")], 0)
    complete, failed, dead = await broker.fetch("c1", 3, 1.0, 5)
    await broker.abort("aborted")
    await broker.settle(
        "c1",
        [
            Done(complete, b""),
            Finished(failed, "failed", b"", "Fail raised"),
            Finished(dead, "dead", b"", "retries used up"),
        ],
    )

    async def expired() -> bool:
        gone = [await broker.record(i) is None for i in ("complete", "failed", "aborted")]
        return all(gone)

    await eventually(expired, timeout=WAIT)
    record = await broker.record("dead")
    assert record is not None
    assert record.status == "dead"
    assert await broker.dead_ids() == ["dead"]
    assert await broker.enqueue([job("complete")], 0) == [True]


# -- dead letters --------------------------------------------------------------------------


async def test_dead_letters_are_listed_most_recent_first_with_offset_and_limit(
    broker: Broker,
) -> None:
    for job_id in ("first", "second", "third"):
        await dead_letter(broker, job_id)
        await next_millisecond()
    assert [r.job_id for r in await broker.dead(0, 2)] == ["third", "second"]
    assert [r.job_id for r in await broker.dead(2, 2)] == ["first"]
    assert await broker.dead(3, 2) == []
    assert await broker.dead_ids() == ["first", "second", "third"]
    (record,) = await broker.dead(0, 1)
    assert (record.status, record.error, record.reason) == ("dead", b"boom", "retries used up")


async def test_asking_for_no_dead_letters_lists_none(broker: Broker) -> None:
    await dead_letter(broker, "dead")
    assert await broker.dead(0, 0) == []


async def test_requeued_dead_jobs_run_again_from_attempt_one(broker: Broker) -> None:
    await broker.enqueue([job("a"), job("alive")], 0)
    delivery, _ = await broker.fetch("c1", 2, 1.0, 5)
    assert await broker.settle("c1", [Again(delivery, 0, b"e1", "ValueError")]) == [Recorded.YES]
    assert await broker.promote_due(10, early=True) is None
    (second,) = await broker.fetch("c1", 1, 1.0, 5)
    await broker.settle("c1", [Finished(second, "dead", b"e2", "retries used up")])
    assert await broker.requeue_dead(["a", "alive", "missing"]) == 1
    record = await broker.record("a")
    assert record is not None
    assert (record.status, record.attempt, record.deliveries) == ("queued", 1, 0)
    assert (record.finished_ms, record.started_ms, record.run_at_ms) == (None, None, None)
    assert record.worker == ""
    assert (record.error, record.reason) == (b"e2", "retries used up")
    assert await broker.counts() == QueueCounts(ready=1, pending=1, delayed=0, dead=0)
    (again,) = await broker.fetch("c1", 1, 1.0, 5)
    assert (again.job_id, again.attempt, again.deliveries) == ("a", 1, 1)
    assert await broker.requeue_dead(["a"]) == 0


async def test_purge_dead_deletes_dead_jobs_and_leaves_other_ids_alone(broker: Broker) -> None:
    await dead_letter(broker, "dead")
    await broker.enqueue([job("alive")], 0)
    assert await broker.purge_dead(["dead", "alive", "missing"]) == 1
    assert await broker.record("dead") is None
    assert await broker.dead_ids() == []
    record = await broker.record("alive")
    assert record is not None
    assert record.status == "queued"
    assert ids(await broker.fetch("c1", 5, 1.0, 5)) == ["alive"]


# -- cron ----------------------------------------------------------------------------------


def tick(name: str, fire_ms: int) -> NewJob:
    return job(f"cron:{name}:{fire_ms}")


async def claim(
    broker: Broker, name: str, fire_ms: int, unique: bool = True, lease_ms: int = LEASE_MS
) -> CronClaim:
    return await broker.claim_tick(name, fire_ms, tick(name, fire_ms), unique, lease_ms)


async def test_each_cron_tick_is_claimed_exactly_once(brokers: Brokers) -> None:
    workers = [await brokers.open() for _ in range(6)]
    fire = 1_000_000
    claims = await asyncio.gather(*(claim(w, "beat", fire) for w in workers))
    assert sorted(c.value for c in claims) == ["claimed"] + ["taken"] * 5
    claimer = workers[claims.index(CronClaim.CLAIMED)]
    other = workers[claims.index(CronClaim.TAKEN)]
    # The claimer repeating its call (a lost reply) hears its own answer again; nobody else.
    assert await claim(claimer, "beat", fire) is CronClaim.CLAIMED
    assert await claim(other, "beat", fire) is CronClaim.TAKEN
    assert await claim(claimer, "beat", fire - 1_000) is CronClaim.TAKEN
    assert await claimer.counts() == QueueCounts(ready=1, pending=0, delayed=0, dead=0)
    run = (await claimer.cron_runs(["beat", "unknown"]))["beat"]
    assert (run.fire_ms, run.job_id) == (fire, "cron:beat:1000000")
    assert run.record is not None
    assert run.record.status == "queued"
    assert (await claimer.cron_runs(["unknown"]))["unknown"] == CronRun(None, None, None)
    assert await claimer.cron_runs([]) == {}


async def test_a_tick_not_due_yet_on_the_broker_clock_is_not_claimed(broker: Broker) -> None:
    fire = await broker.now_ms() + 60_000
    assert await claim(broker, "soon", fire) is CronClaim.EARLY
    assert await broker.cron_runs(["soon"]) == {"soon": CronRun(None, None, None)}
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=0)
    assert await claim(broker, "soon", 1_000) is CronClaim.CLAIMED


async def test_a_unique_cron_job_skips_ticks_while_its_previous_run_is_unfinished(
    broker: Broker,
) -> None:
    fires = [1_000_000 + 1_000 * i for i in range(5)]
    assert await claim(broker, "u", fires[0]) is CronClaim.CLAIMED
    # Queued: the next tick is claimed but its run skipped.
    assert await claim(broker, "u", fires[1]) is CronClaim.OVERLAP
    run = (await broker.cron_runs(["u"]))["u"]
    assert (run.fire_ms, run.job_id) == (fires[1], f"cron:u:{fires[0]}")
    assert await broker.record(f"cron:u:{fires[1]}") is None
    # Running within its lease: still skipped.
    (delivery,) = await broker.fetch("w1", 1, 1.0, 5)
    assert await claim(broker, "u", fires[2]) is CronClaim.OVERLAP
    # Finished: the next tick runs.
    assert await broker.settle("w1", [Done(delivery, b"")]) == [Recorded.YES]
    assert await claim(broker, "u", fires[3]) is CronClaim.CLAIMED
    assert (await broker.cron_runs(["u"]))["u"].job_id == f"cron:u:{fires[3]}"
    assert await broker.counts() == QueueCounts(ready=1, pending=0, delayed=0, dead=0)


async def test_a_previous_run_whose_lease_expired_does_not_block_the_next_tick(
    broker: Broker,
) -> None:
    assert await claim(broker, "u", 1_000) is CronClaim.CLAIMED
    await broker.fetch("w1", 1, 1.0, 5)
    fire = 1_000
    claims: list[CronClaim] = []

    async def next_tick_claimed() -> bool:
        nonlocal fire
        fire += 1_000
        claims.append(await claim(broker, "u", fire, lease_ms=300))
        return claims[-1] is CronClaim.CLAIMED

    await eventually(next_tick_claimed, timeout=WAIT)
    assert claims[0] is CronClaim.OVERLAP


async def test_a_non_unique_cron_job_runs_every_tick_even_while_the_last_one_waits(
    broker: Broker,
) -> None:
    for fire in (1_000, 2_000, 3_000):
        assert await claim(broker, "n", fire, unique=False) is CronClaim.CLAIMED
    assert await broker.counts() == QueueCounts(ready=3, pending=0, delayed=0, dead=0)


# -- counts, workers, lag, purge -----------------------------------------------------------


async def test_counts_tell_ready_pending_delayed_and_dead_apart(broker: Broker) -> None:
    await dead_letter(broker, "dead")
    later = now_ms() + 60_000
    await broker.enqueue([job("running"), job("ready"), job("delayed", later)], 0)
    await broker.fetch("c1", 1, 1.0, 5)
    assert await broker.counts() == QueueCounts(ready=1, pending=1, delayed=1, dead=1)


async def test_live_workers_are_listed_until_their_heartbeat_expires_or_they_leave(
    broker: Broker,
) -> None:
    await broker.heartbeat("w1", {"host": "h1", "pid": 42, "beat": 1.5}, 30.0)
    await broker.heartbeat("w2", {"host": "h2", "pid": 43}, 0.3)
    await broker.heartbeat("w1", {"pid": 44}, 30.0)

    async def only_w1_left() -> bool:
        return [w["id"] for w in await broker.workers()] == ["w1"]

    await eventually(only_w1_left, timeout=WAIT)
    assert await broker.workers() == [{"id": "w1", "host": "h1", "pid": "44", "beat": "1.5"}]
    await broker.forget_worker("w1")
    assert await broker.workers() == []


async def test_lag_is_the_age_of_the_oldest_job_not_fetched_yet(broker: Broker) -> None:
    assert await broker.lag_ms() is None
    await broker.enqueue([job("a"), job("later", now_ms() + 60_000)], 0)
    lag = await broker.lag_ms()
    assert lag is not None
    assert 0 <= lag < WAIT * 1000
    await broker.fetch("c1", 1, 1.0, 5)
    assert await broker.lag_ms() is None


async def test_purge_queue_deletes_every_job_and_all_state(broker: Broker) -> None:
    await dead_letter(broker, "dead")
    await broker.enqueue([job("ready"), job("running"), job("later", now_ms() + 60_000)], 0)
    await broker.fetch("c1", 1, 1.0, 5)
    assert await claim(broker, "beat", 1_000) is CronClaim.CLAIMED
    assert await broker.purge_queue() >= 5
    assert await broker.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=0)
    for job_id in ("dead", "ready", "running", "later", "cron:beat:1000"):
        assert await broker.record(job_id) is None
    assert await broker.cron_runs(["beat"]) == {"beat": CronRun(None, None, None)}
    await broker.ensure_group()
    assert await broker.enqueue([job("fresh")], 0) == [True]
    assert ids(await broker.fetch("c1", 5, 1.0, 5)) == ["fresh"]


# -- the same Queue/Worker scenarios on both brokers ----------------------------------------


# -- flow control: priority lanes, pause, limits, several queues ------------------------


def task_envelope(task: str, n: int = 0) -> bytes:
    """An envelope whose head names ``task`` (limits are looked up by it)."""
    return encode(Envelope(task, (n,), {}, 1_700_000_000_000))


async def test_fetch_takes_higher_priorities_first_and_each_lane_in_order(broker: Broker) -> None:
    await broker.enqueue([NewJob(f"low{i}", b"e", priority=-2) for i in range(3)], 0)
    await broker.enqueue([NewJob(f"mid{i}", b"e") for i in range(3)], 0)
    await broker.enqueue([NewJob(f"top{i}", b"e", priority=7) for i in range(3)], 0)
    got = await broker.fetch("c", 4, 0.01, 5)
    assert ids(got) == ["top0", "top1", "top2", "mid0"]
    assert [d.entry_id.endswith("@7") for d in got] == [True, True, True, False]
    got += await broker.fetch("c", 10, 0.01, 5)
    assert ids(got)[4:] == ["mid1", "mid2", "low0", "low1", "low2"]
    assert await broker.settle("c", [Done(d, b"r") for d in got]) == [Recorded.YES] * 9
    assert await broker.counts() == QueueCounts(0, 0, 0, 0)


async def test_a_retried_job_comes_back_in_its_own_lane(broker: Broker) -> None:
    await broker.enqueue([NewJob("a", b"e", priority=3), NewJob("b", b"e")], 0)
    first = await broker.fetch("c", 1, 0.01, 5)
    assert ids(first) == ["a"]
    await broker.settle("c", [Again(first[0], 0, b"err", "boom")])
    await broker.promote_due(10, early=True)
    again = await broker.fetch("c", 1, 0.01, 5)
    assert ids(again) == ["a"]
    assert again[0].entry_id.endswith("@3")


async def test_a_paused_queue_hands_out_nothing_until_resumed(broker: Broker) -> None:
    await broker.enqueue([job("a")], 0)
    assert await broker.pause(True) is False
    assert await broker.pause(True) is True
    assert await broker.paused_since() is not None
    assert await broker.fetch("c", 5, 0.05, 5) == []
    assert (await broker.counts()).ready == 1
    assert await broker.pause(False) is True
    assert await broker.paused_since() is None
    assert ids(await broker.fetch("c", 5, 0.05, 5)) == ["a"]


async def test_a_job_over_its_rate_limit_is_deferred_without_using_an_attempt(
    broker: Broker,
) -> None:
    deferred: list[None] = []
    broker.configure({"t": Limits(interval_us=60_000_000)}, 30_000, lambda: deferred.append(None))
    await broker.enqueue([NewJob(f"j{i}", task_envelope("t", i)) for i in range(3)], 0)
    got = await broker.fetch("c", 3, 0.01, 5)
    assert ids(got) == ["j0"]
    assert deferred
    counts = await broker.counts()
    assert (counts.ready, counts.pending, counts.delayed) == (0, 1, 2)
    for job_id in ("j1", "j2"):
        record = await broker.record(job_id)
        assert record is not None
        assert (record.status, record.attempt, record.deliveries) == ("scheduled", 1, 0)
        assert record.run_at_ms is not None
    # Held back jobs line up one interval apart.
    one, two = [await broker.record(j) for j in ("j1", "j2")]
    assert one is not None
    assert two is not None
    assert (two.run_at_ms or 0) - (one.run_at_ms or 0) == 60_000


async def test_a_concurrency_slot_is_freed_by_the_outcome_and_wakes_a_waiter(
    broker: Broker,
) -> None:
    broker.configure({"t": Limits(concurrency=1)}, 30_000, lambda: None)
    await broker.enqueue([NewJob(f"j{i}", task_envelope("t", i)) for i in range(2)], 0)
    first = await broker.fetch("c", 2, 0.01, 5)
    assert ids(first) == ["j0"]
    waiting = await broker.record("j1")
    assert waiting is not None
    assert waiting.status == "scheduled"
    await broker.settle("c", [Finished(first[0], "failed", b"err", "boom")])
    # The settle sent the waiter back to the stream at once.
    assert (await broker.counts()).ready == 1
    assert ids(await broker.fetch("c", 2, 0.01, 5)) == ["j1"]


async def test_fetch_many_reads_queues_in_order_or_by_share(brokers: Brokers) -> None:
    first, second = await brokers.open(), None
    other = Brokers(brokers.url, f"{brokers.queue}-2")
    try:
        second = await other.open()
        await first.enqueue([job(f"a{i}") for i in range(4)], 0)
        await second.enqueue([job(f"b{i}") for i in range(4)], 0)
        strict = await first.fetch_many([first, second], "c", 3, None, 0.01, 5)
        assert [(i, d.job_id) for i, d in strict] == [(0, "a0"), (0, "a1"), (0, "a2")]
        shared = await first.fetch_many([first, second], "c", 3, [1, 2], 0.01, 5)
        assert [(i, d.job_id) for i, d in shared] == [(0, "a3"), (1, "b0"), (1, "b1")]
    finally:
        await other.close()


@pytest.fixture
async def queue(storage_url: str, queue_name: str) -> AsyncIterator[Queue]:
    q = Queue(storage_url, name=queue_name)
    yield q
    await q.close()


async def test_a_job_round_trips_through_a_worker(queue: Queue) -> None:
    @queue.task()
    async def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    job_handle = await add.enqueue(2, 3)
    async with running(queue.worker()):
        assert await job_handle.result(timeout=WAIT) == 5
    info = await job_handle.info()
    assert (info.status, info.attempt, info.deliveries) == (JobStatus.COMPLETE, 1, 1)
    assert await queue.counts() == QueueCounts(ready=0, pending=0, delayed=0, dead=0)


async def test_a_failing_job_is_retried_and_then_succeeds(queue: Queue) -> None:
    attempts: list[int] = []

    @queue.task(retries=2, backoff=Backoff(base=0.05, jitter=False))
    async def shaky(ctx: Context) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("upstream hiccup")
        return "ok"

    job_handle = await shaky.enqueue()
    async with running(queue.worker()):
        assert await job_handle.result(timeout=WAIT) == "ok"
    assert attempts == [1, 2]
    assert (await job_handle.info()).attempt == 2


async def test_a_delayed_job_runs_no_earlier_than_its_delay(queue: Queue) -> None:
    started: list[float] = []

    @queue.task()
    async def ping(ctx: Context) -> str:
        started.append(time.time())
        return "pong"

    enqueued = time.time()
    job_handle = await ping.options(delay=0.4).enqueue()
    assert await job_handle.status() is JobStatus.SCHEDULED
    async with running(queue.worker()):
        assert await job_handle.result(timeout=WAIT) == "pong"
    assert started[0] >= enqueued + 0.4


async def test_polling_a_job_in_a_tight_loop_does_not_starve_the_worker(queue: Queue) -> None:
    @queue.task()
    async def quick(ctx: Context) -> str:
        return "done"

    job_handle = await quick.enqueue()

    async def poll() -> None:
        while await job_handle.status() is not JobStatus.COMPLETE:
            pass

    async with running(queue.worker()):
        await asyncio.wait_for(poll(), WAIT)


async def test_aborting_a_running_job_cancels_it_on_its_worker(queue: Queue) -> None:
    started = asyncio.Event()

    @queue.task()
    async def forever(ctx: Context) -> None:
        started.set()
        await asyncio.Event().wait()  # until cancelled

    job_handle = await forever.enqueue()
    async with running(queue.worker()):
        await asyncio.wait_for(started.wait(), WAIT)
        assert await job_handle.abort() is JobStatus.RUNNING
        with pytest.raises(JobAborted):
            await job_handle.result(timeout=WAIT)

        async def settled() -> bool:
            return (await queue.counts()).pending == 0

        await eventually(settled, timeout=WAIT)


# -- memory:// only: stores are shared per URL and belong to one event loop ---------------


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://{uuid.uuid4().hex}"
    yield url
    reset_stores(url)


async def test_brokers_on_one_memory_url_share_jobs_and_other_urls_do_not(
    memory_url: str,
) -> None:
    producer = Queue(memory_url, name="q").new_broker()
    consumer = Queue(memory_url.rstrip("/") + "/", name="q").new_broker()
    other_queue = Queue(memory_url, name="other").new_broker()
    other_store = Queue(f"memory://{uuid.uuid4().hex}", name="q").new_broker()
    await producer.enqueue([job("a")], 0)
    assert await other_queue.record("a") is None
    assert await other_store.record("a") is None
    assert ids(await consumer.fetch("c1", 1, 1.0, 5)) == ["a"]


def test_a_memory_store_moves_to_a_new_event_loop_once_the_old_one_is_closed(
    memory_url: str,
) -> None:
    async def produce() -> None:
        await MemoryBroker(memory_url, "q").enqueue([job("a")], 0)

    async def consume() -> list[str]:
        return ids(await MemoryBroker(memory_url, "q").fetch("c1", 1, 1.0, 5))

    asyncio.run(produce())
    assert asyncio.run(consume()) == ["a"]


def test_a_memory_store_refuses_a_second_running_event_loop(memory_url: str) -> None:
    bound = threading.Event()
    release = threading.Event()

    async def hold_the_store() -> None:
        await MemoryBroker(memory_url, "q").connect()
        bound.set()
        await asyncio.to_thread(release.wait, WAIT)

    thread = threading.Thread(target=asyncio.run, args=(hold_the_store(),))
    thread.start()
    try:
        assert bound.wait(WAIT)
        with pytest.raises(RuntimeError, match="another running event loop"):
            asyncio.run(MemoryBroker(memory_url, "q").enqueue([job("a")], 0))
    finally:
        release.set()
        thread.join(WAIT)
