"""Adversarial regression tests for flow control (issue 12): priority lanes, several queues,
pause, rate and concurrency limits, on a real redis-server and on the memory broker.

Each test here reproduces a defect found in review; it fails until the defect is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aredis
from helpers import eventually, running

from aioqueue import Context, Queue
from aioqueue.brokers.redis.lifecycle import Lifecycle

pytestmark = pytest.mark.timeout(120)


async def _blocked_in_xreadgroup(url: str) -> bool:
    """Whether some client of this Redis is blocked in XREADGROUP (an idle worker)."""
    client = aredis.Redis.from_url(url)
    try:
        return any(
            c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
            for c in await client.client_list()
        )
    finally:
        await client.aclose()


# -- a job of a priority never used before waits out the whole blocking read ----------------


async def test_first_job_of_a_new_priority_wakes_an_idle_worker_at_once(storage_url: str) -> None:
    """docs/flow-control.md#priorities: "the worker blocks in one XREADGROUP naming every
    lane, so a job of any priority wakes it at once; there is no polling and no per-lane
    latency". The blocking read names only the lanes fetch.lua saw (the members of
    '<stream>:lanes' at that moment), so the first job of a priority nobody used before
    is not seen until the read times out (settings.block, 5 s by default; 30 s here)."""
    queue = Queue(storage_url, name=f"lane-{uuid.uuid4().hex[:8]}")
    started: dict[int, float] = {}

    @queue.task(name="work", retries=0)
    async def work(ctx: Context, n: int) -> None:
        started[n] = time.monotonic()

    try:
        worker = queue.worker(concurrency=4, block=30.0)
        async with running(worker):
            await work.enqueue(0)
            await eventually(lambda: 0 in started, timeout=10)
            if storage_url.startswith("redis"):
                # The worker found nothing more and waits in its blocking read.
                await eventually(lambda: _blocked_in_xreadgroup(storage_url), timeout=10)
            sent = time.monotonic()
            await work.options(priority=7).enqueue(7)
            await eventually(lambda: 7 in started, timeout=40)
            latency = started[7] - sent
        assert latency < 2.0, f"a priority-7 job waited {latency:.1f}s for an idle worker"
    finally:
        await queue.close()


async def test_first_job_of_a_new_priority_on_a_later_queue_wakes_the_worker(
    storage_url: str,
) -> None:
    """The same with one worker on several queues: the blocking read names the lanes of
    every queue as fetch.lua last saw them, so a new priority on the second queue waits
    out the read too."""
    tag = uuid.uuid4().hex[:8]
    first = Queue(storage_url, name=f"first-{tag}")
    second = Queue(storage_url, name=f"second-{tag}")
    started: dict[int, float] = {}

    @first.task(name="work", retries=0)
    async def work_first(ctx: Context, n: int) -> None:
        started[n] = time.monotonic()

    @second.task(name="work", retries=0)
    async def work_second(ctx: Context, n: int) -> None:
        started[n] = time.monotonic()

    try:
        worker = first.worker(concurrency=4, also=[second], block=30.0)
        async with running(worker):
            await work_second.enqueue(0)
            await eventually(lambda: 0 in started, timeout=10)
            if storage_url.startswith("redis"):
                await eventually(lambda: _blocked_in_xreadgroup(storage_url), timeout=10)
            sent = time.monotonic()
            await work_second.options(priority=-4).enqueue(-4)
            await eventually(lambda: -4 in started, timeout=40)
            latency = started[-4] - sent
        assert latency < 2.0, f"a priority -4 job waited {latency:.1f}s for an idle worker"
    finally:
        await first.close()
        await second.close()


# -- entries a blocking read returned beyond ``count`` are begun without free slots ---------


def _arrive_before_the_blocking_read(
    monkeypatch: pytest.MonkeyPatch, arrive: Any
) -> dict[str, bool]:
    """Make jobs arrive in the gap between fetch.lua (which found nothing) and the blocking
    XREADGROUP that follows it, once, when armed: exactly what happens when producers
    enqueue into several lanes (or queues) within one round trip of an idle worker, and on
    Redis >= 7.2 whenever one script writes into several lanes while the worker blocks
    (a served XREADGROUP is re-run over every stream it names)."""
    state = {"armed": False, "fired": False}
    original = Lifecycle._read_blocking

    async def _read_blocking(self: Lifecycle, *args: Any, **kwargs: Any) -> Any:
        if state["armed"] and not state["fired"]:
            state["fired"] = True
            await arrive()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(Lifecycle, "_read_blocking", _read_blocking)
    return state


async def test_a_blocking_read_over_several_lanes_never_runs_more_than_concurrency(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """guarantees.md #8: "A worker never runs more jobs at once than its concurrency".
    XREADGROUP's COUNT applies per stream, so one blocking read over 19 lanes returns up to
    ``count`` entries of each. _block begins ``count`` and keeps the rest in ``_held``;
    the next fetch_many begins every held entry at once, whatever the free slots: with
    concurrency 4 (count 1) the worker runs 19 jobs at once."""
    queue = Queue(redis_server.url, name=f"held-{uuid.uuid4().hex[:8]}")
    priorities = list(range(-9, 10))
    gate = asyncio.Event()
    now = peak = 0
    done: list[int] = []

    @queue.task(name="work", retries=0)
    async def work(ctx: Context, n: int) -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        try:
            if n >= 100:
                await gate.wait()
        finally:
            now -= 1
        done.append(n)

    async def arrive() -> None:
        for p in priorities:
            await work.options(priority=p).enqueue(100 + p)

    state = _arrive_before_the_blocking_read(monkeypatch, arrive)
    try:
        # Every lane in use (and known to the worker) before the test proper.
        await queue.enqueue_many([work.options(priority=p).prepare(p) for p in priorities])
        worker = queue.worker(concurrency=4)
        async with running(worker):
            await eventually(lambda: len(done) == len(priorities), timeout=20)
            state["armed"] = True
            await eventually(lambda: state["fired"], timeout=20)
            await eventually(lambda: now >= 4, timeout=20)
            # The next fetch_many begins the held entries: wait (bounded) for more than
            # four to run; a correct worker never gets there and the wait times out.
            with contextlib.suppress(AssertionError):
                await eventually(lambda: peak > 4, timeout=5)
            seen_peak, in_flight = peak, worker.in_flight
            gate.set()
            await eventually(lambda: len(done) == 2 * len(priorities), timeout=30)
        assert seen_peak <= 4, f"{seen_peak} jobs ran at once on a worker of concurrency 4"
        assert in_flight <= 4
    finally:
        gate.set()
        await queue.close()


async def test_held_entries_of_a_later_queue_never_start_before_an_earlier_queues_ready_jobs(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/flow-control.md: "Strict: a job of `default` starts only while `high` has none
    ready". When the blocking read answers for both queues, the entry of the later queue
    is held and begun by the next fetch_many before fetch.lua looks at the earlier queue
    again, which still has ready jobs."""
    tag = uuid.uuid4().hex[:8]
    high = Queue(redis_server.url, name=f"high-{tag}")
    low = Queue(redis_server.url, name=f"low-{tag}")
    order: list[str] = []

    @high.task(name="work", retries=0)
    async def work_high(ctx: Context, n: int) -> None:
        order.append("high")
        await asyncio.sleep(0.05)

    @low.task(name="work", retries=0)
    async def work_low(ctx: Context, n: int) -> None:
        order.append("low")

    async def arrive() -> None:
        await high.enqueue_many([work_high.prepare(n) for n in range(10)])
        await work_low.enqueue(0)

    state = _arrive_before_the_blocking_read(monkeypatch, arrive)
    try:
        worker = high.worker(concurrency=1, also=[low], block=1.0)
        async with running(worker):
            await eventually(lambda: _blocked_in_xreadgroup(redis_server.url), timeout=20)
            state["armed"] = True
            # The armed hook runs at the next blocking read (the current one times out).
            await eventually(lambda: len(order) == 11, timeout=30)
        assert order == ["high"] * 10 + ["low"], order
    finally:
        await high.close()
        await low.close()


# -- a long job's concurrency slot disappears with its key ---------------------------------


@pytest.mark.timeout(150)
async def test_a_concurrency_slot_holds_for_a_job_running_longer_than_two_leases_and_a_minute(
    storage_url: str,
) -> None:
    """docs/flow-control.md: "`concurrency_limit` caps how many of the task's jobs run at
    once"; "Lease renewal extends a slot". renew.lua extends the holder's score in
    '<queue>conc:<key>' but never the key's TTL, which only flush_limits sets (lease * 2 +
    60 s) when some job is admitted. A holder that runs longer than that, with nobody
    admitted meanwhile, loses its slot when the key expires, and the next job of the task
    starts beside it. With lease=1 s: the second job starts about 62 s after the first,
    while the first still runs."""
    queue = Queue(storage_url, name=f"slot-{uuid.uuid4().hex[:8]}")
    live: set[str] = set()
    overlaps: list[set[str]] = []

    @queue.task(name="heavy", retries=0, concurrency_limit=1)
    async def heavy(ctx: Context, seconds: float) -> None:
        live.add(ctx.job_id)
        if len(live) > 1:
            overlaps.append(set(live))
        try:
            await asyncio.sleep(seconds)
        finally:
            live.discard(ctx.job_id)

    try:
        first = await heavy.enqueue(80.0)
        worker = queue.worker(concurrency=4, lease=1.0)
        async with running(worker):
            await eventually(lambda: first.id in live, timeout=10)
            second = await heavy.enqueue(0.0)
            # The second job may start only once the first has finished.
            await eventually(lambda: bool(second.id in live or overlaps or not live), timeout=90)
            assert not overlaps, f"two jobs of a concurrency_limit=1 task ran at once: {overlaps}"
            await second.result(timeout=30)
    finally:
        await queue.close()
