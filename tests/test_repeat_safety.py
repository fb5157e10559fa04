"""Every state change is safe to repeat: the reply of each script is lost on its way back
(the fault-injecting proxy closes the connection after Redis ran it), redis-py re-sends the
call, and the state and the answer are what a single run gives."""

from __future__ import annotations

import pytest
import redis
from faultproxy import FaultProxy

from aioqueue.brokers.base import Again, Delivery, Done, Finished, Limits, NewJob, Recorded
from aioqueue.brokers.redis import RedisBroker
from aioqueue.brokers.redis.keys import GROUP, Keys
from aioqueue.errors import RedisUnavailable
from aioqueue.serialization import Envelope, encode

pytestmark = pytest.mark.timeout(30)

CONSUMER = "worker-a"


def sha(broker: RedisBroker, script: str) -> bytes:
    return broker._scripts[script].sha.encode()


def envelope(n: int = 1) -> bytes:
    return encode(Envelope("task", (n,), {}, 1_700_000_000_000, None, None, None))


async def lose_reply(proxy: FaultProxy, broker: RedisBroker, script: str) -> bytes:
    match = sha(broker, script)
    proxy.lose_reply(match)
    return match


def job(client: redis.Redis, keys: Keys, job_id: str) -> dict[str, str]:
    fields = client.hgetall(keys.job(job_id))
    return {k.decode(): v.decode(errors="replace") for k, v in fields.items()}


async def running_job(broker: RedisBroker, job_id: str = "j1") -> Delivery:
    await broker.enqueue([NewJob(job_id, envelope())], 0)
    (delivery,) = await broker.fetch(CONSUMER, 1, 0.1, 5)
    return delivery


async def test_enqueue_repeated_writes_one_job_and_answers_created(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    match = await lose_reply(fault_proxy, broker, "enqueue")
    assert await broker.enqueue([NewJob("j1", envelope()), NewJob("j2", envelope(2))], 0) == [
        True,
        True,
    ]
    assert fault_proxy.fired(match) == 1
    assert redis_client.xlen(broker.keys.stream) == 2
    # A different job under an existing id is still refused.
    assert await broker.enqueue([NewJob("j1", envelope(3))], 0) == [False]


async def test_enqueue_to_a_new_lane_repeated_writes_one_entry_and_one_wake(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    match = await lose_reply(fault_proxy, broker, "enqueue")
    assert await broker.enqueue([NewJob("j1", envelope(), priority=3)], 0) == [True]
    assert fault_proxy.fired(match) == 1
    assert redis_client.xlen(broker.keys.lane(3)) == 1
    assert redis_client.xlen(broker.keys.wake) == 1
    assert redis_client.smembers(broker.keys.lanes) == {b"3"}


async def test_settle_repeated_frees_a_concurrency_slot_once(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    broker.configure({"task": Limits(concurrency=1)}, 30_000, lambda: None)
    await broker.enqueue([NewJob("j1", envelope(1)), NewJob("j2", envelope(2))], 0)
    (first,) = await broker.fetch(CONSUMER, 2, 0.1, 5)
    assert job(redis_client, broker.keys, "j2")["status"] == "scheduled"
    match = await lose_reply(fault_proxy, broker, "settle")
    assert await broker.settle(CONSUMER, [Done(first, encode(1))]) == [Recorded.YES]
    assert fault_proxy.fired(match) == 1
    # The slot was freed once and the waiter sent back once: one entry, queued.
    slots = f"{broker.keys.prefix}:conc:task"
    assert redis_client.zcard(slots) == 0
    assert job(redis_client, broker.keys, "j2")["status"] == "queued"
    assert redis_client.xlen(broker.keys.stream) == 1


async def test_a_lost_fetch_reply_is_raised_and_adopting_counts_one_delivery(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    # fetch.lua reads new entries: a repeat would read others, so its lost reply is raised
    # (the worker then adopts what the first run began) instead of being re-sent.
    assert await broker.fetch(CONSUMER, 1, 0.01, 5) == []  # the script is loaded now
    await broker.enqueue([NewJob("j1", envelope())], 0)
    fetch = await lose_reply(fault_proxy, broker, "fetch")
    with pytest.raises(RedisUnavailable):
        await broker.fetch(CONSUMER, 1, 0.1, 5)
    assert fault_proxy.fired(fetch) == 1
    # Adopting re-begins the entry; that begin's reply is lost and re-sent too.
    begin = await lose_reply(fault_proxy, broker, "begin")
    (delivery,) = await broker.adopt(CONSUMER, set(), 10, 5)
    assert fault_proxy.fired(begin) == 1
    assert (delivery.attempt, delivery.deliveries) == (1, 1)
    record = job(redis_client, broker.keys, "j1")
    assert (record["status"], record["deliveries"]) == ("running", "1")


async def test_begin_repeated_at_max_deliveries_does_not_dead_letter(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    assert await broker.fetch(CONSUMER, 1, 0.01, 5) == []  # the script is loaded now
    await broker.enqueue([NewJob("j1", envelope())], 0)
    fetch = await lose_reply(fault_proxy, broker, "fetch")
    with pytest.raises(RedisUnavailable):
        await broker.fetch(CONSUMER, 1, 0.1, max_deliveries=1)
    assert fault_proxy.fired(fetch) == 1
    match = await lose_reply(fault_proxy, broker, "begin")
    (delivery,) = await broker.adopt(CONSUMER, set(), 10, max_deliveries=1)
    assert fault_proxy.fired(match) == 1
    assert delivery.deliveries == 1
    assert redis_client.zcard(broker.keys.dead) == 0


async def test_settle_retry_repeated_uses_one_attempt(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    delivery = await running_job(broker)
    match = await lose_reply(fault_proxy, broker, "settle")
    assert await broker.settle(CONSUMER, [Again(delivery, 60_000, b"err", "ValueError")]) == [
        Recorded.YES
    ]
    assert fault_proxy.fired(match) == 1
    record = job(redis_client, broker.keys, "j1")
    assert (record["status"], record["attempt"]) == ("retrying", "2")
    assert redis_client.zcard(broker.keys.delayed) == 1
    assert redis_client.xlen(broker.keys.stream) == 0
    assert redis_client.xpending(broker.keys.stream, GROUP)["pending"] == 0


@pytest.mark.parametrize("outcome", ["complete", "failed", "dead"])
async def test_settle_repeated_records_one_outcome(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis, outcome: str
) -> None:
    delivery = await running_job(broker)
    settlement = (
        Done(delivery, encode(42))
        if outcome == "complete"
        else Finished(delivery, outcome, b"err", "because")
    )
    match = await lose_reply(fault_proxy, broker, "settle")
    assert await broker.settle(CONSUMER, [settlement]) == [Recorded.YES]
    assert fault_proxy.fired(match) == 1
    assert job(redis_client, broker.keys, "j1")["status"] == outcome
    assert redis_client.zcard(broker.keys.dead) == (1 if outcome == "dead" else 0)
    assert redis_client.xlen(broker.keys.stream) == 0


async def test_settle_from_a_consumer_that_lost_the_job_is_refused(
    broker: RedisBroker, redis_client: redis.Redis
) -> None:
    delivery = await running_job(broker)
    # Another worker took the entry over after the lease expired and began it.
    redis_client.xclaim(broker.keys.stream, GROUP, "worker-b", 0, [delivery.entry_id])
    (taken,) = await broker.reclaim("worker-b", 1, 0, 5)
    assert taken.deliveries == 2
    assert await broker.settle(CONSUMER, [Done(delivery, encode(1))]) == [Recorded.LOST]
    assert job(redis_client, broker.keys, "j1")["status"] == "running"
    assert await broker.settle("worker-b", [Done(taken, encode(2))]) == [Recorded.YES]


async def test_abort_repeated_answers_the_status_it_found(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    await broker.enqueue([NewJob("queued", envelope())], 0)
    match = await lose_reply(fault_proxy, broker, "abort")
    assert await broker.abort("queued") == "queued"
    assert fault_proxy.fired(match) == 1
    assert job(redis_client, broker.keys, "queued")["status"] == "aborted"
    assert redis_client.xlen(broker.keys.stream) == 0
    # A second, separate request finds the job aborted.
    assert await broker.abort("queued") == "aborted"


async def test_requeue_and_purge_repeated_answer_their_counts(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    for job_id in ("d1", "d2"):
        delivery = await running_job(broker, job_id)
        await broker.settle(CONSUMER, [Finished(delivery, "dead", b"err", "why")])
    match = await lose_reply(fault_proxy, broker, "requeue")
    assert await broker.requeue_dead(["d1"]) == 1
    assert fault_proxy.fired(match) == 1
    assert redis_client.xlen(broker.keys.stream) == 1
    match = await lose_reply(fault_proxy, broker, "purge_dead")
    assert await broker.purge_dead(["d2"]) == 1
    assert fault_proxy.fired(match) == 1
    assert redis_client.zcard(broker.keys.dead) == 0


async def test_promote_repeated_adds_one_entry(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    await broker.enqueue([NewJob("later", envelope(), delay_ms=60_000)], 0)
    match = await lose_reply(fault_proxy, broker, "promote")
    assert await broker.promote_due(10, early=True) is None
    assert fault_proxy.fired(match) == 1
    assert redis_client.xlen(broker.keys.stream) == 1
    assert job(redis_client, broker.keys, "later")["status"] == "queued"


async def test_renew_repeated_keeps_every_lease(
    broker: RedisBroker, fault_proxy: FaultProxy
) -> None:
    deliveries = [await running_job(broker, f"j{i}") for i in range(3)]
    match = await lose_reply(fault_proxy, broker, "renew")
    assert await broker.renew(CONSUMER, deliveries) == ([], [])
    assert fault_proxy.fired(match) == 1


async def test_release_repeated_hands_each_job_back_once(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    await running_job(broker)
    match = await lose_reply(fault_proxy, broker, "release")
    assert await broker.release(CONSUMER) == 1
    assert fault_proxy.fired(match) == 1
    record = job(redis_client, broker.keys, "j1")
    assert (record["status"], record["deliveries"]) == ("queued", "0")
    assert redis_client.xlen(broker.keys.stream) == 1


async def test_watch_repeated_registers_one_watcher(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    await broker.enqueue([NewJob("j1", envelope())], 0)
    key = broker.keys.job("j1")
    match = await lose_reply(fault_proxy, broker, "watch")
    for _ in range(2):
        await broker._eval("watch", [key], ["chan"])
    assert fault_proxy.fired(match) == 1
    assert job(redis_client, broker.keys, "j1")["watchers"] == "1"


async def test_forget_consumers_repeated_answers_its_count(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    redis_client.xgroup_createconsumer(broker.keys.stream, GROUP, "gone-worker")
    match = await lose_reply(fault_proxy, broker, "forget_consumers")
    assert await broker.forget_dead_consumers(min_idle=0) == 1
    assert fault_proxy.fired(match) == 1
    assert redis_client.xinfo_consumers(broker.keys.stream, GROUP) == []


async def test_requeue_resent_after_the_job_died_again_does_not_requeue_it_twice(
    broker: RedisBroker, redis_client: redis.Redis
) -> None:
    delivery = await running_job(broker)
    await broker.settle(CONSUMER, [Finished(delivery, "dead", b"err", "why")])
    keys = [broker.keys.stream, broker.keys.dead, broker.keys.events, broker.keys.job("j1")]
    assert await broker._eval("requeue", keys, ["token-1", 0, "j1"]) == 1
    # The requeued job runs and dies again before the lost reply's re-send arrives.
    (again,) = await broker.fetch(CONSUMER, 1, 0.1, 5)
    await broker.settle(CONSUMER, [Finished(again, "dead", b"err", "why")])
    assert await broker._eval("requeue", keys, ["token-1", 0, "j1"]) == 1
    assert job(redis_client, broker.keys, "j1")["status"] == "dead"
    assert redis_client.xlen(broker.keys.stream) == 0


async def test_settle_resent_after_its_retry_was_promoted_still_answers_recorded(
    broker: RedisBroker, redis_client: redis.Redis
) -> None:
    delivery = await running_job(broker)
    retry = Again(delivery, 0, b"err", "ValueError")
    assert await broker.settle(CONSUMER, [retry]) == [Recorded.YES]
    await broker.promote_due(10, early=True)  # the retry has a new entry now
    assert await broker.settle(CONSUMER, [retry]) == [Recorded.YES]
    record = job(redis_client, broker.keys, "j1")
    assert (record["status"], record["attempt"]) == ("queued", "2")


async def test_recording_the_partitions_repeated_answers_the_number_recorded(
    broker: RedisBroker, fault_proxy: FaultProxy, redis_client: redis.Redis
) -> None:
    name = f"{broker.keys.queue}-logical"
    match = await lose_reply(fault_proxy, broker, "partitions")
    assert await broker.claim_partitions(name, 3) == 3
    assert fault_proxy.fired(match) == 1
    assert redis_client.get(Keys(name).partitions) == b"3"
    # A process of another number, after the repeat: refused with the number recorded.
    assert await broker.claim_partitions(name, 4) == 3
