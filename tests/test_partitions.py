"""Partitioned queues: one logical queue over N hash tags, on a single Redis, the memory
store and a Redis Cluster (docs/deploying.md#partitioned-queues)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from conftest import RedisServer
from deployments import ClusterDeployment
from helpers import eventually, run_cli, running

from aioqueue import ConfigurationError, Context, JobAborted, JobFailed, Queue, QueueFull, chain
from aioqueue.partitions import SLOTS, fitted, partition_of, partition_tags

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def storage_url(every_storage_url: str) -> str:
    """Partitioned queues on a single Redis, the memory store and a Redis Cluster."""
    return every_storage_url


def test_partition_tags_spread_over_the_slot_space_and_never_meet_another_queue() -> None:
    from redis.crc import key_slot

    tags = partition_tags("orders", 3)
    assert tags[0].startswith("orders#0")
    for number, tag in enumerate(tags):
        assert number * SLOTS // 3 <= key_slot(tag.encode()) < (number + 1) * SLOTS // 3
    # '#' is no character of a queue name: no queue shares a partition's keys.
    with pytest.raises(ConfigurationError):
        Queue("memory://x", name=tags[1])
    assert partition_tags("orders", 1) == ("orders",)


def test_job_ids_spread_evenly_and_a_fitted_id_lands_where_asked() -> None:
    counts = Counter(partition_of(uuid.uuid4().hex, 4) for _ in range(4000))
    assert all(800 <= counts[p] <= 1200 for p in range(4)), counts
    for p in range(4):
        assert partition_of(fitted("cron:poll:1700000000000", 4, p), 4) == p
    assert fitted("cron:poll:1", 1) == "cron:poll:1"


async def test_a_partitioned_queue_runs_every_job_once_from_every_partition(
    storage_url: str,
) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    queue = Queue(storage_url, name=name, partitions=3)
    runs: Counter[str] = Counter()

    @queue.task()
    async def double(ctx: Context, n: int) -> int:
        runs[ctx.job_id] += 1
        return 2 * n

    jobs = await queue.enqueue_many([double.prepare(n) for n in range(300)])
    assert len({partition_of(job.id, 3) for job in jobs}) == 3
    counts = await queue.counts()
    assert counts.ready == 300
    async with running(queue.worker(concurrency=20)):
        results = await asyncio.gather(*(job.result(timeout=30) for job in jobs))
    assert results == [2 * n for n in range(300)]
    assert set(runs.values()) == {1}
    assert (await queue.job(jobs[7].id).info()).status == "complete"
    await queue.close()


async def test_delayed_jobs_aborts_and_dead_letters_work_across_partitions(
    storage_url: str,
) -> None:
    queue = Queue(storage_url, name=f"p-{uuid.uuid4().hex[:8]}", partitions=3)
    started = asyncio.Event()

    @queue.task(retries=0)
    async def boom(ctx: Context, n: int) -> None:
        raise ValueError(n)

    @queue.task()
    async def hang(ctx: Context) -> None:
        started.set()
        await asyncio.sleep(60)

    @queue.task()
    async def later(ctx: Context) -> str:
        return "on time"

    async with running(queue.worker(concurrency=10)):
        delayed = await later.options(delay=0.3).enqueue()
        failing = await queue.enqueue_many([boom.prepare(n) for n in range(12)])
        assert await delayed.result(timeout=10) == "on time"
        for job in failing:
            with pytest.raises(JobFailed):
                await job.result(timeout=10)
        assert (await queue.counts()).dead == 12
        dead = await queue.dead_letters(limit=100)
        assert {info.id for info in dead} == {job.id for job in failing}
        hung = await hang.enqueue()
        await asyncio.wait_for(started.wait(), 10)
        await hung.abort()
        with pytest.raises(JobAborted):
            await hung.result(timeout=10)
    await queue.close()


async def test_cron_fires_once_per_tick_with_several_workers_of_a_partitioned_queue(
    storage_url: str,
) -> None:
    queue = Queue(storage_url, name=f"p-{uuid.uuid4().hex[:8]}", partitions=3)
    fired: list[str] = []

    @queue.cron(timedelta(seconds=1))
    async def tick(ctx: Context) -> None:
        fired.append(ctx.job_id)

    async with running(queue.worker(concurrency=4)), running(queue.worker(concurrency=4)):
        await eventually(lambda: len(fired) >= 3, timeout=15)
    assert len(fired) == len(set(fired))
    assert all(partition_of(job_id, 3) == 0 for job_id in fired)
    await queue.close()


async def test_changing_the_number_of_partitions_of_a_queue_is_refused(storage_url: str) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    three = Queue(storage_url, name=name, partitions=3)

    @three.task()
    async def noop(ctx: Context) -> None:
        return None

    await noop.enqueue()
    for other in (1, 4):
        with pytest.raises(ConfigurationError, match="has 3 partitions"):
            await Queue(storage_url, name=name, partitions=other).counts()
    await three.close()

    single = Queue(storage_url, name=f"p-{uuid.uuid4().hex[:8]}")
    await single.enqueue("noop")
    with pytest.raises(ConfigurationError, match="has 1 partition in Redis"):
        await Queue(storage_url, name=single.name, partitions=2).counts()
    await single.close()


async def test_workflows_and_debounce_are_refused_on_a_partitioned_queue() -> None:
    queue = Queue(f"memory://{uuid.uuid4().hex}", name="p", partitions=2)

    @queue.task()
    async def step(ctx: Context, n: int) -> int:
        return n

    with pytest.raises(ConfigurationError, match="workflows"):
        await queue.enqueue_flow(chain(step.prepare(1), step))
    with pytest.raises(ConfigurationError, match="debounce"):
        await step.options(debounce=1.0, key="k").enqueue(1)
    await queue.close()


async def test_three_partitions_land_on_the_three_masters(
    redis_cluster: ClusterDeployment,
) -> None:
    queue = Queue(redis_cluster.url, name=f"p-{uuid.uuid4().hex[:8]}", partitions=3)
    masters = {
        redis_cluster.master_of_slot(redis_cluster.slot_of(f"aioqueue:{{{tag}}}:x"))
        for tag in partition_tags(queue.name, 3)
    }
    assert len(masters) == 3
    await queue.close()


async def test_info_dlq_and_purge_cover_every_partition(redis_server: RedisServer) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    queue = Queue(redis_server.url, name=name, partitions=3)

    @queue.task(name="fail", retries=0)
    async def fail(ctx: Context, n: int) -> None:
        raise ValueError(f"boom {n}")

    jobs = await queue.enqueue_many([fail.prepare(n) for n in range(9)])
    assert len({partition_of(job.id, 3) for job in jobs}) == 3
    async with running(queue.worker(concurrency=5)):
        await eventually(lambda: _dead(queue, 9), timeout=20)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "partitioned_app:queue", url=redis_server.url, queue=name)

    info = await asyncio.to_thread(cli, "info", "--json")
    assert info.returncode == 0, info.stderr
    shown = json.loads(info.stdout)
    assert shown["dead"] == 9
    assert shown["partitions"] == list(partition_tags(name, 3))
    text = await asyncio.to_thread(cli, "info")
    assert "3 partitions, keys under {" in text.stdout
    listing = await asyncio.to_thread(cli, "dlq", "list")
    assert listing.returncode == 0, listing.stderr
    assert all(job.id in listing.stdout for job in jobs)
    purged = await asyncio.to_thread(cli, "purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    counts = await queue.counts()
    assert (counts.ready, counts.delayed) == (0, 0)
    await queue.close()


async def _dead(queue: Queue, count: int) -> bool:
    return (await queue.counts()).dead == count


async def test_a_concurrency_limit_holds_across_the_partitions(storage_url: str) -> None:
    """Each partition enforces its share, rounded down (4 // 3 = 1 here: rounded up, the
    three partitions would run 6 at once), so the queue never runs more than the task's
    limit, whichever partitions its jobs landed in."""
    queue = Queue(storage_url, name=f"p-{uuid.uuid4().hex[:8]}", partitions=3)
    now = peak = 0

    @queue.task(concurrency_limit=4)
    async def narrow(ctx: Context, n: int) -> int:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.02)
        now -= 1
        return n

    jobs = await queue.enqueue_many([narrow.prepare(n) for n in range(30)])
    async with running(queue.worker(concurrency=30)):
        for job in jobs:
            await job.result(timeout=30)
    assert 1 <= peak <= 4
    await queue.close()


async def test_a_concurrency_limit_below_the_partitions_is_refused() -> None:
    queue = Queue(f"memory://{uuid.uuid4().hex}", name="p", partitions=3)

    @queue.task(concurrency_limit=2)
    async def narrow(ctx: Context) -> None:
        return None

    with pytest.raises(ConfigurationError, match="concurrency_limit=2 cannot be shared"):
        await asyncio.wait_for(queue.worker().run(handle_signals=False), 10)
    await queue.close()


async def test_max_size_is_shared_out_and_a_full_partition_refuses_in_the_queues_name(
    storage_url: str,
) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    queue = Queue(storage_url, name=name, partitions=3, max_size=30)

    @queue.task()
    async def noop(ctx: Context) -> None:
        return None

    refusals: list[QueueFull] = []
    for _ in range(60):
        try:
            await noop.enqueue()
        except QueueFull as exc:
            refusals.append(exc)
    # The partitions hold 10 each: the queue never holds more than max_size, and the
    # enqueues that found their partition full were refused in the queue's name.
    assert (await queue.counts()).ready == 60 - len(refusals) == 30
    assert {(r.queue, r.max_size) for r in refusals} == {(name, 30)}
    await queue.close()
