"""How many workers? ``aioqueue info``'s arrival rate, settle rate, mean job time,
utilisation and the workers that keep the lag flat (Little's law), on both brokers.

Workers here run with a short lease so that they heartbeat (and sample arrivals) every half
second; a task sleeps to have a known duration; a producer enqueues on a fixed schedule.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from conftest import RedisServer
from helpers import eventually, run_cli, running

from aioqueue import Context, Queue
from aioqueue.brokers.base import ArrivalSample, Broker, NewJob
from aioqueue.stats import QueueStats, arrival_rate, lag_growing, workers_needed
from aioqueue.task import Task

LEASE = 1.5
"""Heartbeats (and arrival samples) every min(lease / 3, 5 s) = 0.5 s."""


def samples(*pairs: tuple[float, int]) -> list[ArrivalSample]:
    """Samples from (seconds, entries added) pairs."""
    return [ArrivalSample(int(seconds * 1000), added) for seconds, added in pairs]


@pytest.mark.parametrize(
    ("given", "now_s", "rate"),
    [
        ([], 100, None),
        (samples((99, 10)), 100, None),
        # Closer together than a second: two workers beating at once tell no rate.
        (samples((99.5, 10), (99.9, 14)), 100, None),
        (samples((90, 10), (100, 60)), 100, 5.0),
        # Order does not matter: workers' samples interleave.
        (samples((100, 60), (90, 10), (95, 30)), 100, 5.0),
        # Over the last minute up to the newest sample: from the newest sample at or before
        # its start, not from the oldest.
        (samples((0, 0), (30, 900), (40, 1000), (100, 1600)), 100, 10.0),
        (samples((0, 0), (39, 1000), (41, 1100), (100, 1600)), 101, 600 / 61),
        # The stream was deleted and made again: only samples since its counter restarted.
        (samples((0, 500), (50, 900), (60, 3), (70, 23)), 70, 2.0),
        (samples((0, 500), (50, 900), (69.5, 3), (70, 23)), 70, None),
        # The newest sample is older than the window: no live worker samples any more.
        (samples((0, 0), (10, 100)), 71, None),
        (samples((0, 0), (10, 100)), 70, 10.0),
    ],
)
def test_arrival_rate_is_taken_over_the_last_minute_of_samples(
    given: list[ArrivalSample], now_s: float, rate: float | None
) -> None:
    found = arrival_rate(given, int(now_s * 1000))
    assert found == (None if rate is None else pytest.approx(rate))


@pytest.mark.parametrize(
    ("arrived", "mean", "slots", "needed"),
    [
        (None, 0.5, 10, None),
        (0.0, None, 10, 0),
        (0.0, 0.5, 0, 0),
        (10.0, None, 10, None),
        (10.0, 0.5, 0, None),
        (10.0, 0.5, 10, 1),
        (20.0, 0.5, 10, 1),
        (20.1, 0.5, 10, 2),
        (100.0, 0.25, 4, 7),
        (0.01, 0.1, 100, 1),
    ],
)
def test_workers_needed_is_arrival_rate_times_job_time_over_slots_rounded_up(
    arrived: float | None, mean: float | None, slots: float, needed: int | None
) -> None:
    assert workers_needed(arrived, mean, slots) == needed


@pytest.mark.parametrize(
    ("ready", "arrived", "settled", "capacity", "growing"),
    [
        (10, 20.0, 8.0, 8.0, True),
        (10, 20.0, 8.0, None, True),
        (10, 0.1, 0.0, None, True),
        # Nothing waits: the workers keep up, whatever the rates say.
        (0, 20.0, 8.0, 8.0, False),
        (10, None, 8.0, 8.0, False),
        # Within the margin: two one-minute estimates of a balanced queue.
        (10, 20.0, 19.5, 19.5, False),
        # A young worker's settlements trail arrivals by a job time; it has room to spare.
        (1, 20.0, 18.6, 26.7, False),
    ],
)
def test_the_lag_grows_when_jobs_wait_and_arrive_faster_than_they_can_settle(
    ready: int, arrived: float | None, settled: float, capacity: float | None, growing: bool
) -> None:
    assert lag_growing(ready, arrived, settled, capacity) is growing


# -- brokers ----------------------------------------------------------------------------------


@pytest.fixture
async def broker(storage_url: str, queue_name: str) -> AsyncIterator[Broker]:
    made = Queue(storage_url, name=queue_name).new_broker()
    await made.connect()
    await made.ensure_group()
    yield made
    await made.purge_queue()
    await made.close()


async def test_each_heartbeat_samples_the_jobs_ever_added_to_the_ready_stream(
    broker: Broker,
) -> None:
    await broker.heartbeat("w1", {"queue": "q"}, ttl=10)
    await broker.enqueue([NewJob(f"j{i}", b"envelope") for i in range(3)], 0)
    await broker.enqueue([NewJob("later", b"envelope", delay_ms=1)], 0)
    await broker.heartbeat("w1", {"queue": "q"}, ttl=10)
    # A delayed job that comes due arrives at the ready stream then, and counts then.
    await eventually(lambda: _promoted(broker))
    await broker.heartbeat("w2", {"queue": "q"}, ttl=10)
    found = sorted(await broker.arrivals(), key=lambda sample: sample.at_ms)
    assert [sample.added for sample in found] == [0, 3, 4]
    assert found[0].at_ms <= found[1].at_ms <= found[2].at_ms <= await broker.now_ms()
    await broker.purge_queue()
    assert await broker.arrivals() == []


async def _promoted(broker: Broker) -> bool:
    await broker.promote_due(10)
    return (await broker.counts()).delayed == 0


# -- what info shows --------------------------------------------------------------------------


async def _enqueue_steadily(task: Task[[], None], per_second: float, count: int) -> None:
    """The known arrival pattern: ``count`` jobs at ``per_second``, on a fixed schedule."""
    start = time.monotonic()
    for i in range(count):
        delay = start + i / per_second - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await task.enqueue()


async def _sampling(queue: Queue) -> bool:
    """A worker's heartbeat has taken an arrival sample: the arrival window has begun."""
    return bool(await (await queue.connected_broker()).arrivals())


async def _measure(queue: Queue) -> QueueStats:
    """The first snapshot in which info knows the arrival rate and the mean job time."""
    found: list[QueueStats] = []

    async def known() -> bool:
        stats = await queue.stats()
        if stats.arrived_per_second is not None and stats.mean_job_seconds is not None:
            found.append(stats)
        return bool(found)

    await eventually(known)
    return found[0]


async def test_info_measures_arrivals_settlements_job_time_and_the_workers_that_keep_up(
    storage_url: str, queue_name: str
) -> None:
    queue = Queue(storage_url, name=queue_name)

    @queue.task()
    async def work(ctx: Context) -> None:
        await asyncio.sleep(0.3)

    # 20 jobs/s of 0.3 s keep 6 slots busy: 2 workers of 4 (1.5 workers' worth).
    first, second = (
        queue.worker(concurrency=4, lease=LEASE),
        queue.worker(concurrency=4, lease=LEASE),
    )
    async with running(first), running(second):
        await eventually(lambda: _sampling(queue))
        await _enqueue_steadily(work, per_second=20, count=100)
        stats = await _measure(queue)
        assert stats.arrived_per_second == pytest.approx(20, rel=0.15)
        assert stats.settled_per_second == pytest.approx(20, rel=0.25)
        assert stats.completed_per_second == stats.settled_per_second
        assert stats.failed_per_second == 0
        assert stats.mean_job_seconds is not None
        assert 0.3 <= stats.mean_job_seconds <= 0.4
        assert stats.utilisation is not None
        # About 6 of 8 slots, give or take a job starting or being settled.
        assert 0.5 <= stats.utilisation <= 1.25
        assert stats.workers_needed == 2
        assert len(stats.workers) == 2
        assert not stats.lag_growing
        assert all(w.busy_last_minute > 0 for w in stats.workers)
    await queue.close()


async def test_workers_needed_rises_above_the_live_ones_when_jobs_arrive_faster_than_they_settle(
    storage_url: str, queue_name: str, redis_server: RedisServer
) -> None:
    queue = Queue(storage_url, name=queue_name)

    @queue.task()
    async def work(ctx: Context) -> None:
        await asyncio.sleep(0.25)

    # One worker of 2 slots settles 8 jobs/s; 20 jobs/s of 0.25 s need 5 slots: 3 workers.
    async with running(queue.worker(concurrency=2, lease=LEASE)):
        await eventually(lambda: _sampling(queue))
        await _enqueue_steadily(work, per_second=20, count=80)
        stats = await _measure(queue)
        assert stats.arrived_per_second == pytest.approx(20, rel=0.15)
        assert stats.settled_per_second <= 8.5
        assert stats.mean_job_seconds is not None
        assert 0.25 <= stats.mean_job_seconds <= 0.35
        assert stats.workers_needed is not None
        assert stats.workers_needed >= 3 > len(stats.workers)
        assert stats.ready > 0
        assert stats.lag_growing
        assert stats.utilisation is not None
        assert stats.utilisation >= 0.5
        if storage_url == redis_server.url:
            shown = await asyncio.to_thread(_info, redis_server, queue_name)
            assert "lag growing: jobs arrive at " in shown
            assert "workers would keep up (1 live)" in shown
    await queue.close()


async def test_an_idle_queue_shows_zero_rates_and_unknowns_as_dashes(
    storage_url: str, queue_name: str, redis_server: RedisServer
) -> None:
    queue = Queue(storage_url, name=queue_name)
    on_redis = storage_url == redis_server.url
    stats = await queue.stats()
    assert (stats.arrived_per_second, stats.settled_per_second) == (None, 0.0)
    assert (stats.mean_job_seconds, stats.utilisation, stats.workers_needed) == (None, None, None)
    assert not stats.lag_growing
    if on_redis:
        shown = await asyncio.to_thread(_info, redis_server, queue_name)
        assert "- " in _capacity_row(shown)
        assert "no live workers" in shown
    async with running(queue.worker(concurrency=3, lease=LEASE)):

        async def sampled() -> bool:
            return (await queue.stats()).arrived_per_second is not None

        await eventually(sampled)
        stats = await queue.stats()
        assert stats.arrived_per_second == 0.0
        assert stats.settled_per_second == 0.0
        assert stats.mean_job_seconds is None
        assert stats.utilisation == 0.0
        assert stats.workers_needed == 0
        assert not stats.lag_growing
        if on_redis:
            listing = await asyncio.to_thread(_info, redis_server, queue_name, "--json")
            shape = json.loads(listing)
            assert shape["arrived_per_second"] == 0.0
            assert shape["settled_per_second"] == 0.0
            assert shape["mean_job_seconds"] is None
            assert shape["utilisation"] == 0.0
            assert shape["workers_needed"] == 0
            assert shape["lag_growing"] is False
            assert shape["workers"][0]["busy_last_minute"] == 0.0
            row = _capacity_row(await asyncio.to_thread(_info, redis_server, queue_name))
            assert row.split() == ["0.0", "0.0", "-", "0%", "0", "(1", "live)"]
    await queue.close()


def _info(server: RedisServer, queue_name: str, *args: str) -> str:
    shown = run_cli("info", "basic_app:queue", *args, url=server.url, queue=queue_name)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def _capacity_row(table: str) -> str:
    """The values row of the capacity table, cell borders removed."""
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if "arrived/s" in line)
    return lines[header + 2].replace("│", " ")
