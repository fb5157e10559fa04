"""Redis Cluster: queues in different slots served by one worker, results and aborts over
sharded pub/sub, and producers and workers that keep going through a manual failover and a
killed master (docs/deploying.md#redis-cluster)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest
from conftest import RedisServer
from deployments import ClusterDeployment, command
from failover import run_through_failover
from helpers import eventually, running

from aioqueue import (
    AuthenticationFailed,
    ConfigurationError,
    Context,
    JobAborted,
    Queue,
    RedisUnavailable,
)
from aioqueue.brokers.base import Done, Finished, NewJob, Recorded
from aioqueue.brokers.redis import RedisBroker, connection
from aioqueue.partitions import fitted, partition_tags

pytestmark = pytest.mark.timeout(90)


def names_on_every_master(cluster: ClusterDeployment, count: int = 3) -> list[str]:
    """Queue names whose slots lie on ``count`` different masters."""
    found: dict[int, str] = {}
    while len(found) < count:
        name = f"c-{uuid.uuid4().hex[:8]}"
        found.setdefault(cluster.master_of_slot(cluster.slot_of(f"aioqueue:{{{name}}}:x")), name)
    return list(found.values())


async def test_one_worker_serves_queues_on_three_masters_in_strict_order(
    redis_cluster: ClusterDeployment,
) -> None:
    started: list[str] = []
    queues = [Queue(redis_cluster.url, name=n) for n in names_on_every_master(redis_cluster)]
    for level, queue in zip(("high", "default", "low"), queues, strict=True):

        @queue.task(name="work")
        async def work(ctx: Context, n: int, level: str = level) -> int:
            started.append(level)
            return n

    for queue in queues:
        await queue.enqueue_many([queue.tasks["work"].prepare(i) for i in range(100)])
    worker = queues[0].worker(concurrency=8, also=queues[1:])
    async with running(worker):
        await eventually(lambda: len(started) == 300, timeout=60)
    assert started == ["high"] * 100 + ["default"] * 100 + ["low"] * 100
    for queue in queues:
        await queue.close()


async def test_an_idle_worker_wakes_for_a_job_on_any_of_its_queues(
    redis_cluster: ClusterDeployment,
) -> None:
    queues = [Queue(redis_cluster.url, name=n) for n in names_on_every_master(redis_cluster)]
    for queue in queues:

        @queue.task(name="echo")
        async def echo(ctx: Context, n: int) -> int:
            return n

    # A long block: a wake-up that waited for the read to time out would fail the deadline.
    worker = queues[0].worker(concurrency=4, also=queues[1:], block=30)
    async with running(worker):
        for round_ in range(3):
            for queue in reversed(queues):
                job = await queue.tasks["echo"].enqueue(round_)
                assert await job.result(timeout=5) == round_
    for queue in queues:
        await queue.close()


async def test_weighted_queues_on_three_masters_share_the_worker(
    redis_cluster: ClusterDeployment,
) -> None:
    started: list[int] = []
    queues = [Queue(redis_cluster.url, name=n) for n in names_on_every_master(redis_cluster)]
    for index, queue in enumerate(queues):

        @queue.task(name="work")
        async def work(ctx: Context, n: int, index: int = index) -> int:
            started.append(index)
            await asyncio.sleep(0.001)
            return n

    for queue in queues:
        await queue.enqueue_many([queue.tasks["work"].prepare(i) for i in range(400)])
    worker = queues[0].worker(concurrency=10, also=queues[1:], weights=[6, 3, 1])
    async with running(worker):
        await eventually(lambda: len(started) >= 400, timeout=60)
    first = Counter(started[:400])
    # While all three have work they share it 6:3:1 (within a batch's rounding).
    assert 200 <= first[0] <= 280, first
    assert 90 <= first[1] <= 150, first
    assert 20 <= first[2] <= 70, first
    for queue in queues:
        await queue.close()


async def test_results_and_aborts_travel_over_sharded_pub_sub(
    redis_cluster: ClusterDeployment,
) -> None:
    queue = Queue(redis_cluster.url, name=names_on_every_master(redis_cluster, 1)[0])
    started = asyncio.Event()

    @queue.task()
    async def hang(ctx: Context) -> None:
        started.set()
        await asyncio.sleep(60)

    @queue.task()
    async def double(ctx: Context, n: int) -> int:
        return 2 * n

    async with running(queue.worker(concurrency=4)):
        assert await (await double.enqueue(21)).result(timeout=10) == 42
        job = await hang.enqueue()
        await asyncio.wait_for(started.wait(), 10)
        await job.abort()
        with pytest.raises(JobAborted):
            await job.result(timeout=10)
    await queue.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_producer_and_worker_go_on_through_a_killed_master(
    fresh_cluster: ClusterDeployment, wait_replicas: int
) -> None:
    name = names_on_every_master(fresh_cluster, 1)[0]
    master = fresh_cluster.master_of_slot(fresh_cluster.slot_of(f"aioqueue:{{{name}}}:x"))

    async def kill_master() -> None:
        await asyncio.to_thread(fresh_cluster.kill, master)
        await asyncio.to_thread(fresh_cluster.wait_promoted, master)
        # Back as a replica of its successor: with wait_replicas=1 enqueues and settles
        # are refused (NotReplicated) until it is.
        await asyncio.to_thread(fresh_cluster.restart, master)

    outcome = await run_through_failover(
        fresh_cluster.url, name, kill_master, wait_replicas=wait_replicas, deadline=100
    )
    print(
        f"cluster master SIGKILL, wait_replicas={wait_replicas}: {outcome.acknowledged} "
        f"acknowledged, {len(outcome.lost)} lost, {outcome.ran_twice} ran twice, "
        f"{outcome.refused} refused"
    )
    assert outcome.acknowledged == 300
    if wait_replicas:
        assert outcome.lost == []


@pytest.mark.timeout(120)
async def test_producer_and_worker_go_on_through_a_manual_cluster_failover(
    fresh_cluster: ClusterDeployment,
) -> None:
    name = names_on_every_master(fresh_cluster, 1)[0]
    master = fresh_cluster.master_of_slot(fresh_cluster.slot_of(f"aioqueue:{{{name}}}:x"))

    async def fail_over() -> None:
        await asyncio.to_thread(fresh_cluster.failover, master)

    outcome = await run_through_failover(fresh_cluster.url, name, fail_over, wait_replicas=1)
    assert outcome.acknowledged == 300
    assert outcome.lost == []


@pytest.mark.timeout(150)
@pytest.mark.parametrize("partitions", [1, 3])
async def test_moving_the_queue_slot_while_jobs_flow_loses_nothing(
    redis_cluster: ClusterDeployment, partitions: int
) -> None:
    name = names_on_every_master(redis_cluster, 1)[0]
    # Partitioned: the second partition's slot moves, the others' stay.
    tag = partition_tags(name, partitions)[partitions // 2]
    slot = redis_cluster.slot_of(f"aioqueue:{{{tag}}}:x")
    source = redis_cluster.master_of_slot(slot)
    target = next(port for port in redis_cluster.masters() if port != source)
    moved: list[int] = []

    def migrate() -> None:
        # Key by key, a few at a time: jobs are enqueued, begun and settled while the
        # queue's keys lie partly on each node (ASK, TRYAGAIN and the scripts' guard).
        redis_cluster.begin_migration(slot, target)
        while batch := redis_cluster.move_keys(slot, batch=2):
            moved.append(batch)
            time.sleep(0.02)
        redis_cluster.finish_migration(slot)

    async def move_slot() -> None:
        await asyncio.to_thread(migrate)

    outcome = await run_through_failover(
        redis_cluster.url,
        name,
        move_slot,
        jobs=600,
        deadline=100,
        settle_within=20,
        partitions=partitions,
    )
    print(
        f"slot migration ({partitions} partitions): {sum(moved)} keys in {len(moved)} "
        f"batches, {outcome.acknowledged} acknowledged, {len(outcome.lost)} lost, "
        f"{outcome.ran_twice} ran twice"
    )
    assert len(moved) > 3
    assert redis_cluster.master_of_slot(slot) == target
    assert outcome.acknowledged == 600
    assert outcome.lost == []
    assert outcome.ran_twice == 0


async def test_a_script_stopped_by_a_moving_slot_has_written_nothing(
    redis_cluster: ClusterDeployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """settle.lua records the outcome, then acks the entry in its priority lane, a key it
    finds through the entry's token. With that lane already moved to the importing node and
    the queue's other keys still here, the script would stop after the record was written;
    the guard in _prelude.lua stops it before anything is."""
    name = names_on_every_master(redis_cluster, 1)[0]
    broker = RedisBroker(redis_cluster.url, name, result_ttl=60)
    await broker.connect()
    await broker.ensure_group()
    keys = broker.keys
    slot = redis_cluster.slot_of(keys.stream)
    source = redis_cluster.master_of_slot(slot)
    target = next(port for port in redis_cluster.masters() if port != source)
    try:
        # Every key settle.lua is given exists here: the migration's check of declared
        # keys lets it run.
        far = 10**13
        await broker.enqueue([NewJob("later", b"e", run_at_ms=far), NewJob("doomed", b"e")], 0)
        (doomed,) = await broker.fetch("c1", 1, 0, 5)
        await broker.settle("c1", [Finished(doomed, "dead", b"boom", "test")])
        await broker.enqueue([NewJob("urgent", b"e", priority=5)], 0)
        (urgent,) = await broker.fetch("c1", 1, 0, 5)

        redis_cluster.begin_migration(slot, target)
        command(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", keys.lane(5))
        monkeypatch.setattr(connection, "MOVING_PATIENCE", 0.0)
        with pytest.raises(RedisUnavailable, match="moving the queue's slot"):
            await broker.settle("c1", [Done(urgent, b"result")])
        assert command(source, "HGET", keys.job("urgent"), "status") == "running"

        redis_cluster.finish_migration(slot)
        monkeypatch.setattr(connection, "MOVING_PATIENCE", 30.0)
        assert await broker.settle("c1", [Done(urgent, b"result")]) == [Recorded.YES]
        record = await broker.record("urgent")
        assert record is not None
        assert record.status == "complete"
    finally:
        await broker.close()


@pytest.mark.timeout(120)
async def test_the_other_partitions_go_on_while_one_partitions_slot_is_down(
    fresh_cluster: ClusterDeployment, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker serves each partition as a source of its own: with one partition's master
    and replica both gone (its slot served by nobody), the jobs of the other partitions
    still run, including their settles and result notifications, and the worker's fetch
    loop never backs off as from an outage of all of them."""
    for port in fresh_cluster.ports:
        command(port, "CONFIG", "SET", "cluster-require-full-coverage", "no")
    name = f"p-{uuid.uuid4().hex[:8]}"
    tags = partition_tags(name, 3)
    queue = Queue(fresh_cluster.url, name=name, partitions=3)

    @queue.task()
    async def double(ctx: Context, n: int) -> int:
        return 2 * n

    async with running(queue.worker(concurrency=10, lease=5)):
        assert await (await double.enqueue(1)).result(timeout=10) == 2
        master = fresh_cluster.master_of_slot(fresh_cluster.slot_of(f"aioqueue:{{{tags[1]}}}:x"))
        replica = fresh_cluster.replica_of(master)
        fresh_cluster.kill(replica)
        fresh_cluster.kill(master)
        for n in range(10):
            partition = (0, 2)[n % 2]
            job = await double.options(job_id=fitted(f"job-{n}", 3, partition)).enqueue(n)
            assert await job.result(timeout=20) == 2 * n
        with pytest.raises(RedisUnavailable):
            await double.options(job_id=fitted("lost", 3, 1)).enqueue(0)
    await queue.close()
    messages = [record.getMessage() for record in caplog.records]
    assert any("the other queues go on" in m for m in messages)
    assert not any("reconnecting with backoff" in m for m in messages)


@pytest.mark.timeout(60)
async def test_a_wrong_url_or_password_for_a_cluster_is_one_clear_error(
    redis_cluster: ClusterDeployment, redis_server: RedisServer
) -> None:
    """Mistakes that never pass by themselves are final errors, not outages retried for
    ever: a plain URL to a cluster node, a wrong password, a cluster URL to a plain Redis."""
    master = redis_cluster.masters()[0]
    name = names_on_every_master(redis_cluster, 3)
    plain = Queue(
        f"redis://127.0.0.1:{master}/0",
        name=next(
            n
            for n in name
            if redis_cluster.master_of_slot(redis_cluster.slot_of(f"aioqueue:{{{n}}}:x")) != master
        ),
    )
    with pytest.raises(ConfigurationError, match="node of a Redis Cluster"):
        await asyncio.wait_for(plain.counts(), 20)
    await plain.close()
    wrong = Queue(redis_cluster.url.replace("://", "://nobody:wrong@"), name="c")
    with pytest.raises(AuthenticationFailed):
        await asyncio.wait_for(wrong.counts(), 20)
    await wrong.close()
    single = Queue(redis_server.url.replace("redis://", "redis+cluster://"), name="c")
    with pytest.raises(ConfigurationError, match="CLUSTER SLOTS"):
        await asyncio.wait_for(single.counts(), 20)
    await single.close()


@pytest.mark.timeout(60)
async def test_a_worker_refused_for_its_partitions_writes_nothing(
    redis_cluster: ClusterDeployment,
) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    three = Queue(redis_cluster.url, name=name, partitions=3)
    await three.counts()  # records 3
    four = Queue(redis_cluster.url, name=name, partitions=4)
    with pytest.raises(ConfigurationError, match="has 3 partitions"):
        await asyncio.wait_for(four.worker().run(handle_signals=False), 20)
    for tag in partition_tags(name, 4):
        port = redis_cluster.master_of_slot(redis_cluster.slot_of(f"aioqueue:{{{tag}}}:x"))
        assert command(port, "EXISTS", f"aioqueue:{{{tag}}}:stream") == 0
    await three.close()
    await four.close()
