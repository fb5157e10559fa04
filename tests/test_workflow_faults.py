"""Workflows under faults, on the real redis-server: lost replies on every script that moves
a workflow on (the fault-injecting proxy drops the reply after Redis ran the script and
redis-py re-sends it), takeovers, forged stream entries. The callback is enqueued exactly
once and every member is counted once."""

from __future__ import annotations

import pytest
import redis
from faultproxy import FaultProxy

from aioqueue.brokers.base import Delivery, Done, Finished, FlowNode, NewJob, Recorded
from aioqueue.brokers.redis import RedisBroker
from aioqueue.brokers.redis.keys import GROUP
from aioqueue.serialization import decode_result, encode

pytestmark = pytest.mark.timeout(30)

A, B = "worker-a", "worker-b"


def lose(proxy: FaultProxy, broker: RedisBroker, script: str) -> bytes:
    match = broker._scripts[script].sha.encode()
    proxy.lose_reply(match)
    return match


def chord(members: int, policy: str = "wait") -> list[NewJob]:
    """Members m1..mN, group node g, callback cb fed the group's results."""
    jobs = [
        NewJob(f"m{i}", b"member", flow=FlowNode(next=(("g", i),))) for i in range(1, members + 1)
    ]
    jobs.append(
        NewJob(
            "g",
            b"group",
            flow=FlowNode(kind="group", policy=policy, pending=members, next=(("cb", 1),)),
        )
    )
    jobs.append(NewJob("cb", b"callback", flow=FlowNode(feed=True, pending=1)))
    return jobs


def fields(client: redis.Redis, broker: RedisBroker, job_id: str) -> dict[str, bytes]:
    raw = client.hgetall(broker.keys.job(job_id))
    return {k.decode(): v for k, v in raw.items()}


def stream_ids(client: redis.Redis, broker: RedisBroker) -> list[str]:
    return [f[b"j"].decode() for _, f in client.xrange(broker.keys.stream)]


async def fetch_all(broker: RedisBroker, consumer: str, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < n:
        batch = await broker.fetch(consumer, n - len(got), 0.2, 5)
        assert batch, f"only {len(got)} of {n} jobs arrived"
        got += batch
    return got


async def test_enqueue_repeated_writes_each_job_and_edge_once(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    await broker.enqueue([NewJob("earlier", b"x")], 0)
    jobs = chord(3)
    jobs[-1] = NewJob(
        "cb", b"callback", flow=FlowNode(feed=True, pending=2, after=(("earlier", 2),))
    )
    match = lose(fault_proxy, broker, "enqueue")
    assert await broker.enqueue(jobs, 0) == [True] * 5
    assert fault_proxy.fired(match) == 1
    assert sorted(stream_ids(redis_client, broker)) == ["earlier", "m1", "m2", "m3"]
    # The edge onto the job that existed before was appended once, not twice.
    (line,) = fields(redis_client, broker, "earlier")["next"].split(b"\n")
    assert line == b"cb\t2\t" + fields(redis_client, broker, "cb")["enqueued"]
    assert fields(redis_client, broker, "g")["pending"] == b"3"


async def test_lost_reply_on_the_last_members_settle_enqueues_the_callback_once(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    await broker.enqueue(chord(3), 0)
    deliveries = await fetch_all(broker, A, 3)
    await broker.settle(A, [Done(d, encode(int(d.job_id[1:]))) for d in deliveries[:2]])
    match = lose(fault_proxy, broker, "settle")
    assert await broker.settle(A, [Done(deliveries[2], encode(3))]) == [Recorded.YES]
    assert fault_proxy.fired(match) == 1
    assert stream_ids(redis_client, broker) == ["cb"]
    assert fields(redis_client, broker, "g")["status"] == b"complete"
    (callback,) = await broker.fetch(B, 10, 0.2, 5)
    assert callback.job_id == "cb"
    assert callback.input is not None
    assert decode_result(callback.input) == [1, 2, 3]


async def test_lost_reply_on_a_dead_lettering_begin_counts_the_member_once(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    await broker.enqueue(chord(2, policy="pass"), 0)
    first, second = await fetch_all(broker, A, 2)
    # The worker running m1 died; B's takeover finds it over max_deliveries (1) and buries
    # it, and the reply of that begin is lost.
    match = lose(fault_proxy, broker, "begin")
    assert await broker.reclaim(B, 1, 0, max_deliveries=1) == []
    assert fault_proxy.fired(match) == 1
    assert fields(redis_client, broker, "g")["pending"] == b"1"
    await broker.settle(A, [Done(second, encode("two"))])
    group = fields(redis_client, broker, "g")
    assert group["status"] == b"complete"
    values = decode_result(group["result"])
    assert values[1] == "two"
    assert (values[0].status, values[0].job_id, values[0].type) == (
        "dead",
        first.job_id,
        "WorkerLost",
    )
    assert stream_ids(redis_client, broker) == ["cb"]


async def test_lost_reply_on_abort_counts_the_aborted_member_once(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    await broker.enqueue(chord(2, policy="pass"), 0)
    match = lose(fault_proxy, broker, "abort")
    assert await broker.abort("m1") == "queued"
    assert fault_proxy.fired(match) == 1
    assert fields(redis_client, broker, "g")["pending"] == b"1"
    (delivery,) = await broker.fetch(A, 10, 0.2, 5)
    assert delivery.job_id == "m2"
    await broker.settle(A, [Done(delivery, encode(2))])
    values = decode_result(fields(redis_client, broker, "g")["result"])
    assert values[0].status == "aborted"
    assert values[1] == 2


async def test_taken_over_member_counts_once(
    broker: RedisBroker, redis_client: redis.Redis
) -> None:
    await broker.enqueue(chord(1), 0)
    (slow,) = await fetch_all(broker, A, 1)
    # A's lease expired; B takes the member over and completes it.
    (taken,) = await broker.reclaim(B, 10, 0, 5)
    assert await broker.settle(B, [Done(taken, encode("b"))]) == [Recorded.YES]
    # A's late outcome is refused: it must not count a second time.
    assert await broker.settle(A, [Finished(slow, "dead", b"\x93\xa1E\xa1m\xa0", "late")]) == [
        Recorded.LOST
    ]
    assert decode_result(fields(redis_client, broker, "g")["result"]) == ["b"]
    assert stream_ids(redis_client, broker) == ["cb"]


async def test_forged_entry_for_a_waiting_job_does_not_run_it(
    broker: RedisBroker, redis_client: redis.Redis
) -> None:
    await broker.enqueue(chord(1), 0)
    redis_client.xadd(broker.keys.stream, {"j": "cb"})
    delivered = await fetch_all(broker, A, 1)
    assert [d.job_id for d in delivered] == ["m1"]
    assert await broker.fetch(A, 10, 0.1, 5) == []
    assert fields(redis_client, broker, "cb")["status"] == b"waiting"
    assert redis_client.xpending(broker.keys.stream, GROUP)["pending"] == 1


async def test_requeued_dead_member_replaces_its_value_without_counting_twice(
    broker: RedisBroker, redis_client: redis.Redis
) -> None:
    await broker.enqueue(chord(2, policy="pass"), 0)
    first, second = await fetch_all(broker, A, 2)
    await broker.settle(A, [Finished(first, "dead", b"\x93\xa1E\xa1m\xa0", "gave up")])
    assert fields(redis_client, broker, "g")["pending"] == b"1"
    assert await broker.requeue_dead(["m1"]) == 1
    (again,) = await broker.fetch(A, 10, 0.2, 5)
    await broker.settle(A, [Done(again, encode("one"))])
    # Still waiting for m2: the second outcome of m1 replaced the first, uncounted.
    assert fields(redis_client, broker, "g")["pending"] == b"1"
    await broker.settle(A, [Done(second, encode("two"))])
    assert decode_result(fields(redis_client, broker, "g")["result"]) == ["one", "two"]
