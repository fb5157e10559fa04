"""Leases at scale: many long jobs on one worker, more than one renewal chunk in flight,
takeovers counted against the concurrency, and a worker's own jobs after an outage.

Every job body here counts its starts and its cancellations in this process, so a job that a
healthy worker runs twice, or cancels as lost, shows up as a number, not a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable

import pytest
import redis
import redis.asyncio as aioredis
from conftest import RedisServer
from helpers import eventually, running

from aioqueue import Context, JobStatus, Queue
from aioqueue.brokers.redis.keys import GROUP, Keys

pytestmark = pytest.mark.slow


class Bodies:
    """Counts starts, cancellations and completions per job id, and the running peak."""

    def __init__(self) -> None:
        self.starts: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.active = 0
        self.peak = 0
        self.release = asyncio.Event()

    async def run(self, ctx: Context, seconds: float) -> str:
        """A job body that lasts ``seconds``."""
        return await self._body(ctx, asyncio.sleep(seconds))

    async def hold(self, ctx: Context) -> str:
        """A job body that lasts until ``release`` is set."""
        return await self._body(ctx, self.release.wait())

    async def _body(self, ctx: Context, work: Awaitable[object]) -> str:
        self.starts[ctx.job_id] += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await work
        except asyncio.CancelledError:
            self.cancelled[ctx.job_id] += 1
            raise
        finally:
            self.active -= 1
        self.finished[ctx.job_id] += 1
        return "done"

    def twice(self) -> dict[str, int]:
        """Job ids whose body started more than once, with their number of starts."""
        return {job_id: n for job_id, n in self.starts.items() if n > 1}

    def reruns(self) -> str:
        """The jobs started more than once, summed up for an assertion message."""
        twice = self.twice()
        return (
            f"{len(twice)} of {len(self.starts)} job bodies started more than once "
            f"(up to {max(twice.values(), default=1)} times)"
        )


async def _records(queue: Queue, job_ids: list[str]) -> list[tuple[JobStatus, int]]:
    infos = await asyncio.gather(*(queue.job(job_id).info() for job_id in job_ids))
    return [(info.status, info.deliveries) for info in infos]


async def _all_complete(queue: Queue, job_ids: list[str]) -> bool:
    return all(status is JobStatus.COMPLETE for status, _ in await _records(queue, job_ids))


@pytest.mark.timeout(40)
async def test_a_healthy_worker_never_reruns_its_own_long_jobs(queue: Queue) -> None:
    # Twenty jobs, each running three and a half leases, all in flight at once on one
    # worker that nothing disturbs: every lease must be renewed, not just one per round.
    bodies = Bodies()

    @queue.task(retries=0)
    async def long_job(ctx: Context, seconds: float) -> str:
        return await bodies.run(ctx, seconds)

    jobs = await queue.enqueue_many([long_job.prepare(3.5) for _ in range(20)])
    ids = [job.id for job in jobs]
    worker = queue.worker(concurrency=50, lease=1.0, shutdown_grace=0.5)
    async with running(worker):
        await eventually(lambda: _all_complete(queue, ids), timeout=25, interval=0.2)
        assert bodies.twice() == {}, bodies.reruns()
        assert dict(bodies.cancelled) == {}, (
            f"{len(bodies.cancelled)} jobs cancelled as lost by the worker that owns them"
        )
        assert set(bodies.finished) == set(ids)
        deliveries = Counter(d for _, d in await _records(queue, ids))
        assert deliveries == {1: 20}, f"deliveries per job: {dict(deliveries)}"
        assert await queue.dead_letters() == []


@pytest.mark.timeout(50)
async def test_more_than_five_hundred_jobs_in_flight_on_one_worker_all_keep_their_lease(
    queue: Queue,
) -> None:
    # 650 jobs in flight at once renew in two chunks (500 + 150); each job outlives one lease,
    # so a job whose renewal is skipped, or that is reported lost, shows.
    bodies = Bodies()

    @queue.task(retries=0)
    async def long_job(ctx: Context, seconds: float) -> str:
        return await bodies.run(ctx, seconds)

    jobs = await queue.enqueue_many([long_job.prepare(2.5) for _ in range(650)])
    ids = [job.id for job in jobs]
    worker = queue.worker(concurrency=700, lease=2.0, shutdown_grace=0.5)
    async with running(worker):
        await eventually(lambda: len(bodies.finished) == 650 or bool(bodies.cancelled), timeout=30)
        assert bodies.peak > 500, f"only {bodies.peak} jobs ran at once"
        assert dict(bodies.cancelled) == {}, (
            f"{len(bodies.cancelled)} jobs cancelled as lost by the worker that owns them"
        )
        assert bodies.twice() == {}, bodies.reruns()
        await eventually(lambda: _all_complete(queue, ids), timeout=10, interval=0.2)
        deliveries = Counter(d for _, d in await _records(queue, ids))
        assert deliveries == {1: 650}, f"deliveries per job: {dict(deliveries)}"


def _read_is_blocked(redis_client: redis.Redis) -> bool:
    return any(
        client["cmd"] == "xreadgroup" and "b" in client["flags"]
        for client in redis_client.client_list()
    )


@pytest.mark.timeout(40)
async def test_concurrency_is_never_exceeded_counting_takeovers(
    queue: Queue, redis_client: redis.Redis
) -> None:
    # Eight jobs were read by a worker that died before running them. A new worker with
    # concurrency 8 starts, finds the queue empty and blocks on its read; then the dead
    # worker's leases expire (its reclaim loop takes the eight over) and new jobs arrive
    # (its blocked read returns some). Both loops must share the same eight slots.
    concurrency = 8
    bodies = Bodies()

    @queue.task(retries=0)
    async def hold(ctx: Context, seconds: float) -> str:
        return await bodies.run(ctx, seconds)

    keys = Keys(queue.name)
    orphans = await queue.enqueue_many([hold.prepare(1.5) for _ in range(concurrency)])
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: enqueue made it already
        redis_client.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    read = redis_client.xreadgroup(GROUP, "dead-worker", {keys.stream: ">"}, count=concurrency)
    entries = [entry_id for entry_id, _ in read[0][1]]
    assert len(entries) == concurrency

    worker = queue.worker(concurrency=concurrency, lease=2.0)
    async with running(worker):
        await eventually(lambda: _read_is_blocked(redis_client), timeout=10)
        # The dead worker's leases expire now: idle for a minute, still its entries.
        redis_client.xclaim(keys.stream, GROUP, "dead-worker", 0, entries, idle=60_000, justid=True)
        await eventually(lambda: bodies.active > 0, timeout=10)
        fresh = await queue.enqueue_many([hold.prepare(0.5) for _ in range(concurrency)])
        ids = [job.id for job in orphans + fresh]
        await eventually(lambda: _all_complete(queue, ids), timeout=20, interval=0.1)
    assert bodies.peak <= concurrency, (
        f"{bodies.peak} job bodies ran at once on a worker with concurrency {concurrency}"
    )
    assert set(bodies.finished) == set(ids)


async def _idle_ms(client: aioredis.Redis, stream: str) -> int:
    """How long the one pending entry has gone without a renewal of its lease."""
    (row,) = await client.xpending_range(stream, GROUP, "-", "+", 1)
    return int(row["time_since_delivered"])


async def _next_renewal(client: aioredis.Redis, stream: str) -> None:
    """Return right after the entry's idle time drops: its lease was just renewed."""
    last = await _idle_ms(client, stream)
    while True:
        await asyncio.sleep(0.005)
        idle = await _idle_ms(client, stream)
        if idle < last:
            return
        last = idle


@pytest.mark.timeout(30)
async def test_a_worker_does_not_take_over_its_own_jobs_after_an_outage_longer_than_the_lease(
    queue: Queue, redis_server: RedisServer
) -> None:
    # CLIENT PAUSE stalls every client, renewals included, for longer than the lease: the
    # job's entry goes idle past its lease while the worker that owns it is healthy. When
    # Redis answers again, the worker's renewal and its sweep for expired leases both go
    # through, in whichever order they were sent; the sweep finds the job's entry expired.
    # The first pause lands at a random point of the two loops' cycles; it leaves both in
    # step (both resume when it ends), so the next pause starts just after a renewal, when
    # the sweep is due before the next renewal.
    lease = 1.0
    bodies = Bodies()

    @queue.task(retries=0)
    async def held(ctx: Context) -> str:
        return await bodies.hold(ctx)

    stream = Keys(queue.name).stream
    client = aioredis.Redis(port=redis_server.port)
    job = await held.enqueue()
    worker = queue.worker(lease=lease, shutdown_grace=0.5)
    try:
        async with running(worker):
            await eventually(lambda: bodies.active == 1, timeout=10)
            for _ in range(3):
                await _next_renewal(client, stream)
                await client.execute_command("CLIENT", "PAUSE", int(lease * 1200), "ALL")
                await client.ping()  # answered once the pause is over
                # Past the renewal that went through when the pause ended.
                await eventually(
                    lambda: _idle_below(client, stream, lease / 6), timeout=5, interval=0.005
                )
                if bodies.twice():
                    break
            bodies.release.set()
            assert await job.result(timeout=10) == "done"
            assert bodies.starts[job.id] == 1, (
                f"the job body started {bodies.starts[job.id]} times on one worker"
            )
            assert dict(bodies.cancelled) == {}
            info = await job.info()
            assert info.status is JobStatus.COMPLETE
            assert info.deliveries == 1
    finally:
        await client.aclose()


async def _idle_below(client: aioredis.Redis, stream: str, seconds: float) -> bool:
    return await _idle_ms(client, stream) < seconds * 1000
