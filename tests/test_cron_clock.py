"""Cron ticks are decided on the clock every worker shares (Redis TIME), claimed until
claimed, and a claim is safe to repeat.

- The scheduler reads the broker's clock, never the worker's, so a worker whose clock runs an
  hour ahead neither claims future ticks nor blocks correct workers.
- A claim that fails because Redis is unreachable is tried again until Redis answers; then
  the latest due tick is claimed once (no backlog).
- A unique job's previous run counts as unfinished while its stream entry is pending and
  younger than the lease, whatever became of its worker's heartbeat.
- ``cron_claim`` repeated (the reply was lost, or the broker called twice) answers what it
  answered the first time and enqueues one run.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis
from conftest import RedisServer
from faultproxy import FaultProxy
from helpers import ROOT, eventually, running, wait_exit, worker_env

from aioqueue import Context, Queue, cron
from aioqueue.brokers.base import Broker, CronClaim, Done, NewJob, Recorded
from aioqueue.brokers.redis import RedisBroker
from aioqueue.brokers.redis.keys import GROUP, Keys
from aioqueue.errors import RedisUnavailable
from aioqueue.scheduler import (
    EARLY_PAUSE,
    RETRY_CAP,
    CronScheduler,
    from_ms,
    next_wake,
    retry_delay,
    to_ms,
)

pytestmark = pytest.mark.timeout(60)

LEASE_MS = 30_000
"""A lease no test outlives."""

WAIT = 10.0


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def tick(name: str, fire_ms: int) -> NewJob:
    return NewJob(f"cron:{name}:{fire_ms}", f"envelope of {name} at {fire_ms}".encode())


async def claim(
    broker: Broker, name: str, fire_ms: int, *, unique: bool = True, lease_ms: int = LEASE_MS
) -> CronClaim:
    return await broker.claim_tick(name, fire_ms, tick(name, fire_ms), unique, lease_ms)


# -- the scheduler's decisions, on a clock the test moves ------------------------------------


class Finished(Exception):
    """The fake clock reached the end of the scenario."""


class FakeBroker:
    """The two broker calls the scheduler makes, on a fake shared clock with outages.

    ``claim_tick`` behaves like ``cron_claim``: EARLY before the fire time (on the script's
    clock, which may lag the clock ``now_ms`` reads by ``lag_ms``), TAKEN for a tick at or
    before the last claimed one, else CLAIMED.
    """

    def __init__(self, start_ms: int) -> None:
        self.clock_ms = start_ms
        self.outages: list[tuple[int, int]] = []
        self.lag_ms = 0
        self.failing_claims = 0
        self.claimed: dict[str, int] = {}
        self.runs: list[int] = []
        self.calls: list[tuple[int, int, NewJob]] = []
        """(clock ms, fire ms, run) of every claim attempt."""

    def down(self) -> bool:
        return any(start <= self.clock_ms < end for start, end in self.outages)

    async def now_ms(self) -> int:
        if self.down():
            raise RedisUnavailable("Redis unavailable while reading the Redis clock")
        return self.clock_ms

    async def claim_tick(
        self, name: str, fire_ms: int, job: NewJob, unique: bool, lease_ms: int
    ) -> CronClaim:
        self.calls.append((self.clock_ms, fire_ms, job))
        if self.down() or self.failing_claims > 0:
            self.failing_claims -= 1
            raise RedisUnavailable("Redis unavailable while claiming a cron tick")
        if fire_ms > self.clock_ms - self.lag_ms:
            return CronClaim.EARLY
        if self.claimed.get(name, -1) >= fire_ms:
            return CronClaim.TAKEN
        self.claimed[name] = fire_ms
        self.runs.append(fire_ms)
        return CronClaim.CLAIMED


async def run_scheduler(
    broker: FakeBroker, schedule: timedelta, until_ms: int, *, name: str = "beat"
) -> None:
    """Run a scheduler with one cron job against ``broker`` until its clock passes
    ``until_ms``; every sleep moves the fake clock instead of waiting."""

    async def beat(ctx: Context) -> None:
        return None

    queue = Queue("memory://scheduler-unit", name=f"q-{uuid.uuid4().hex[:8]}")

    async def sleep(seconds: float) -> None:
        assert seconds > 0
        broker.clock_ms += math.ceil(seconds * 1000)
        if broker.clock_ms > until_ms:
            raise Finished
        await asyncio.sleep(0)

    scheduler = CronScheduler(queue, [cron(schedule, beat, name=name)], sleep=sleep)
    with pytest.raises(Finished):
        await scheduler.run(broker, LEASE_MS)  # type: ignore[arg-type]


# An epoch instant that is a whole multiple of 3 s (and so of 1 s).
BASE = 3000 * 566_666_667


async def test_ticks_are_decided_on_the_broker_clock_from_the_start_on() -> None:
    # The broker's clock is years away from this machine's: only the broker's counts.
    broker = FakeBroker(BASE + 300)
    await run_scheduler(broker, timedelta(seconds=1), BASE + 5_500)
    assert broker.runs == [BASE + 1000 * i for i in range(1, 6)]
    # Each tick was claimed once, when it was due on the broker's clock, not before.
    assert [fire for _, fire, _ in broker.calls] == broker.runs
    assert all(fire <= at < fire + 50 for at, fire, _ in broker.calls)


async def test_a_worker_starting_on_a_tick_schedules_only_later_ticks() -> None:
    broker = FakeBroker(BASE)
    await run_scheduler(broker, timedelta(seconds=1), BASE + 2_500)
    assert broker.runs == [BASE + 1000, BASE + 2000]


async def test_a_claim_that_fails_in_an_outage_is_retried_until_redis_answers() -> None:
    broker = FakeBroker(BASE + 100)
    broker.outages = [(BASE + 2_500, BASE + 4_000)]  # spans the tick at BASE + 3000
    await run_scheduler(broker, timedelta(seconds=3), BASE + 9_500)
    assert broker.runs == [BASE + 3000, BASE + 6000, BASE + 9000]
    # Claimed soon after Redis answered again (the backoff is capped).
    (claimed_at,) = [at for at, fire, _ in broker.calls if fire == BASE + 3000]
    assert BASE + 4_000 <= claimed_at <= BASE + 4_000 + RETRY_CAP * 1000 + 50


async def test_a_claim_whose_call_fails_is_sent_again_unchanged_until_it_succeeds() -> None:
    broker = FakeBroker(BASE + 100)
    broker.failing_claims = 4  # Redis answered TIME, then went away before the claim
    await run_scheduler(broker, timedelta(seconds=3), BASE + 6_500)
    assert broker.runs == [BASE + 3000, BASE + 6000]
    attempts = [run for _, fire, run in broker.calls if fire == BASE + 3000]
    assert len(attempts) == 5
    # The very same call each time (job id and envelope), so the claim script recognises a
    # repeat of a call whose reply was lost.
    assert len(set(attempts)) == 1


async def test_after_an_outage_over_several_ticks_only_the_latest_is_claimed() -> None:
    broker = FakeBroker(BASE + 100)
    broker.outages = [(BASE + 2_500, BASE + 7_000)]  # spans BASE + 3000 and BASE + 6000
    await run_scheduler(broker, timedelta(seconds=3), BASE + 9_500)
    assert broker.runs == [BASE + 6000, BASE + 9000]


async def test_an_early_answer_keeps_the_tick_and_claims_it_when_due() -> None:
    broker = FakeBroker(BASE + 100)
    broker.lag_ms = 30  # the script's clock lags the TIME reading (a failover, say)
    await run_scheduler(broker, timedelta(seconds=1), BASE + 3_500)
    assert broker.runs == [BASE + 1000, BASE + 2000, BASE + 3000]
    for fire in broker.runs:
        attempts = [at for at, f, _ in broker.calls if f == fire]
        assert len(attempts) == 2
        assert attempts[1] - attempts[0] <= EARLY_PAUSE * 1000 + 1


def test_retry_delays_double_up_to_the_cap_and_never_spin() -> None:
    for failures in range(1, 12):
        ceiling = min(RETRY_CAP, 0.1 * 2 ** (failures - 1))
        for _ in range(50):
            assert ceiling / 2 <= retry_delay(failures) <= ceiling
    assert max(retry_delay(30) for _ in range(100)) <= RETRY_CAP


def test_next_wake_is_the_earliest_tick_after_both_the_last_claim_and_now() -> None:
    async def f(ctx: Context) -> None:
        return None

    every_second = cron(timedelta(seconds=1), f, name="a")
    every_minute = cron("* * * * *", f, name="b")
    now = from_ms(BASE + 400)
    last = {"a": now, "b": now}
    assert next_wake([every_second, every_minute], last, now) == from_ms(BASE + 1000)
    # A tick claimed ahead of now (never by this scheduler, but safe): wake after it.
    assert next_wake([every_second], {"a": from_ms(BASE + 5000)}, now) == from_ms(BASE + 6000)
    assert to_ms(from_ms(BASE + 1)) == BASE + 1
    assert from_ms(0) == datetime(1970, 1, 1, tzinfo=timezone.utc)


# -- cron_claim on both brokers --------------------------------------------------------------


@pytest.fixture
async def open_broker(
    storage_url: str, queue_name: str
) -> AsyncIterator[Callable[[], Awaitable[Broker]]]:
    opened: list[Broker] = []

    async def open_one() -> Broker:
        broker = Queue(storage_url, name=queue_name).new_broker()
        await broker.connect()
        await broker.ensure_group()
        opened.append(broker)
        return broker

    yield open_one
    for broker in opened:
        await broker.close()


async def test_a_claim_repeated_by_its_claimer_answers_claimed_again_and_enqueues_once(
    open_broker: Callable[[], Awaitable[Broker]],
) -> None:
    broker, other = await open_broker(), await open_broker()
    fire = 1_000_000
    assert await claim(broker, "beat", fire) is CronClaim.CLAIMED
    assert await claim(broker, "beat", fire) is CronClaim.CLAIMED
    assert await claim(other, "beat", fire) is CronClaim.TAKEN
    assert (await broker.counts()).ready == 1
    run = (await broker.cron_runs(["beat"]))["beat"]
    assert (run.fire_ms, run.job_id) == (fire, f"cron:beat:{fire}")


async def test_an_overlap_repeated_by_its_claimer_answers_overlap_again(
    open_broker: Callable[[], Awaitable[Broker]],
) -> None:
    broker, other = await open_broker(), await open_broker()
    assert await claim(broker, "u", 1_000) is CronClaim.CLAIMED
    assert await claim(broker, "u", 2_000) is CronClaim.OVERLAP
    assert await claim(broker, "u", 2_000) is CronClaim.OVERLAP
    assert await claim(other, "u", 2_000) is CronClaim.TAKEN
    assert await broker.record("cron:u:2000") is None
    assert (await broker.counts()).ready == 1
    assert (await broker.cron_runs(["u"]))["u"].job_id == "cron:u:1000"


async def test_a_tick_later_than_the_broker_clock_is_refused_and_blocks_nobody(
    open_broker: Callable[[], Awaitable[Broker]],
) -> None:
    ahead, correct = await open_broker(), await open_broker()
    now = await correct.now_ms()
    # A worker whose clock runs an hour ahead asks for the tick it thinks is due.
    assert await claim(ahead, "beat", now + 3_600_000) is CronClaim.EARLY
    assert (await correct.cron_runs(["beat"]))["beat"].fire_ms is None
    # The correct worker still claims the tick that is due.
    assert await claim(correct, "beat", now - 1) is CronClaim.CLAIMED
    assert (await correct.counts()).ready == 1


async def test_a_run_stalled_past_its_heartbeat_but_within_its_lease_still_blocks_the_next(
    open_broker: Callable[[], Awaitable[Broker]],
) -> None:
    broker = await open_broker()
    assert await claim(broker, "u", 1_000) is CronClaim.CLAIMED
    (delivery,) = await broker.fetch("w1", 1, 1.0, 5)
    await broker.heartbeat("w1", {"pid": 1}, 0.2)

    async def heartbeat_expired() -> bool:
        return not await broker.workers()

    # w1 stalls: its heartbeat expires, its lease (the entry's idle time) does not.
    await eventually(heartbeat_expired, timeout=WAIT)
    assert await claim(broker, "u", 2_000) is CronClaim.OVERLAP
    assert await broker.record("cron:u:2000") is None
    # Idle time counts from the last renewal, as lease takeover does.
    await broker.renew("w1", [delivery])
    assert await claim(broker, "u", 3_000, lease_ms=5_000) is CronClaim.OVERLAP
    # Past the lease the worker counts as gone: the next tick runs.
    fire = 3_000

    async def next_tick_claimed() -> bool:
        nonlocal fire
        fire += 1_000
        return await claim(broker, "u", fire, lease_ms=300) is CronClaim.CLAIMED

    await eventually(next_tick_claimed, timeout=WAIT)
    assert await broker.settle("w1", [Done(delivery, b"")]) == [Recorded.YES]


async def test_a_running_previous_run_whose_entry_is_no_longer_pending_does_not_block(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    broker = RedisBroker(redis_server.url, queue_name, result_ttl=60)
    await broker.connect()
    await broker.ensure_group()
    try:
        assert await claim(broker, "u", 1_000) is CronClaim.CLAIMED
        (delivery,) = await broker.fetch("w1", 1, 1.0, 5)
        assert await claim(broker, "u", 2_000) is CronClaim.OVERLAP
        redis_client.xack(broker.keys.stream, GROUP, delivery.entry_id)
        assert await claim(broker, "u", 3_000) is CronClaim.CLAIMED
    finally:
        await broker.close()


async def test_a_lost_claim_reply_is_answered_the_same_when_redis_py_resends_it(
    fault_proxy: FaultProxy, queue_name: str, redis_client: redis.Redis
) -> None:
    broker = RedisBroker(fault_proxy.url, queue_name, result_ttl=60)
    await broker.connect()
    await broker.ensure_group()
    try:
        match = broker._scripts["cron_claim"].sha.encode()
        fault_proxy.lose_reply(match)
        assert await claim(broker, "u", 1_000) is CronClaim.CLAIMED
        assert fault_proxy.fired(match) == 1
        assert redis_client.xlen(broker.keys.stream) == 1
        fault_proxy.lose_reply(match)
        assert await claim(broker, "u", 2_000) is CronClaim.OVERLAP
        assert fault_proxy.fired(match) == 2
        assert redis_client.xlen(broker.keys.stream) == 1
        assert not redis_client.exists(broker.keys.job("cron:u:2000"))
    finally:
        await broker.close()


# -- whole workers ---------------------------------------------------------------------------

# Runs ``aioqueue ARGS`` with this process's clock SHIFT seconds ahead: time.time and
# datetime.now (the clocks Python code reads), patched before aioqueue is imported.
FAST_CLOCK = """
import datetime, sys, time

shift = float(sys.argv.pop(1))
real_time, real_time_ns, Real = time.time, time.time_ns, datetime.datetime
time.time = lambda: real_time() + shift
time.time_ns = lambda: real_time_ns() + int(shift * 1e9)


class _Meta(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, Real)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, Real)


class Shifted(Real, metaclass=_Meta):
    @classmethod
    def now(cls, tz=None):
        return Real.fromtimestamp(time.time(), tz)

    @classmethod
    def utcnow(cls):
        return Real.now(datetime.timezone.utc).replace(tzinfo=None) + datetime.timedelta(
            seconds=shift
        )

    @classmethod
    def today(cls):
        return Real.fromtimestamp(time.time())


datetime.datetime = Shifted
sys.argv[0] = "aioqueue"
from aioqueue.cli import main

main()
"""


def spawn(
    target: str, env: dict[str, str], *, path: Path, clock_ahead: float = 0.0
) -> subprocess.Popen[bytes]:
    """``aioqueue run target`` with ``path`` on the module path, its clock maybe ahead."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(path)}
    if clock_ahead:
        command = [sys.executable, "-c", FAST_CLOCK, str(clock_ahead), "run", target]
    else:
        command = [sys.executable, "-m", "aioqueue", "run", target]
    return subprocess.Popen(
        command, env=full_env, cwd=path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def ticks_run(client: redis.Redis, queue_name: str) -> dict[int, int]:
    """Runs per fire time (ms) that ``tests/apps/cron_app.py`` counted."""
    return {int(k): int(v) for k, v in client.hgetall(f"ticks:{queue_name}").items()}


@pytest.mark.slow
async def test_a_worker_whose_clock_runs_an_hour_ahead_neither_claims_early_nor_blocks(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis
) -> None:
    env = worker_env(redis_server.url, queue_name)
    apps = ROOT / "tests" / "apps"
    cron_key = Keys(queue_name).cron
    ahead = spawn("cron_app:worker", env, path=apps, clock_ahead=3600)
    correct: subprocess.Popen[bytes] | None = None
    try:
        # Alone, the worker whose clock is ahead claims ticks: only due ones.
        await eventually(lambda: redis_client.zscore(cron_key, "tick") is not None, timeout=30)
        claimed = redis_client.zscore(cron_key, "tick")
        assert claimed is not None
        assert claimed <= redis_ms(redis_client)
        correct = spawn("cron_app:worker", env, path=apps)
        count = len(ticks_run(redis_client, queue_name))
        await eventually(lambda: len(ticks_run(redis_client, queue_name)) >= count + 3, timeout=30)
        # The correct worker goes on alone, every tick.
        ahead.send_signal(signal.SIGTERM)
        assert await wait_exit(ahead) == 0
        count = len(ticks_run(redis_client, queue_name))
        await eventually(lambda: len(ticks_run(redis_client, queue_name)) >= count + 3, timeout=30)
        correct.send_signal(signal.SIGTERM)
        assert await wait_exit(correct) == 0
        ticks = ticks_run(redis_client, queue_name)
        fires = sorted(ticks)
        assert all(n == 1 for n in ticks.values()), ticks
        assert [b - a for a, b in itertools.pairwise(fires)] == [1000] * (len(fires) - 1)
        assert fires[-1] <= redis_ms(redis_client)
    finally:
        ahead.kill()
        if correct is not None:
            correct.kill()


@pytest.mark.slow
async def test_a_tick_during_a_redis_outage_runs_once_when_redis_returns(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    queue = Queue(server.url, name="outage")
    fires: list[int] = []

    @queue.cron(timedelta(seconds=3), unique=False)
    async def beat(ctx: Context) -> None:
        assert ctx.fire_time is not None
        fires.append(to_ms(ctx.fire_time))

    try:
        async with running(queue.worker(shutdown_grace=5)):
            await eventually(lambda: len(fires) >= 1, timeout=15)
            missed = fires[0] + 3000
            server.kill()
            # Redis stays down from before the tick until well past it, far longer than
            # redis-py's own retries last.
            await eventually(lambda: time.time() * 1000 > missed + 1000, timeout=10)
            server.start()
            await eventually(lambda: any(f > missed for f in fires), timeout=20)
        assert fires.count(missed) == 1, fires
        assert missed + 3000 in fires
    finally:
        await queue.close()
        server.kill()


STALL_APP = """
import asyncio
import os
from datetime import timedelta

import redis.asyncio as aioredis

from aioqueue import Context, Queue

queue = Queue()


@queue.cron(timedelta(seconds=1))
async def slow(ctx: Context) -> None:
    # Records its start, then runs until the test sets the release key.
    client = aioredis.Redis.from_url(queue.settings.redis_url)
    try:
        fire_ms = int(ctx.fire_time.timestamp() * 1000)
        await client.rpush(f"starts:{queue.name}", f"{fire_ms}:{os.getpid()}")
        while not await client.exists(f"release:{queue.name}"):
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


worker = queue.worker(concurrency=5)
"""


@pytest.mark.slow
async def test_a_unique_run_stalled_past_its_heartbeat_but_within_its_lease_runs_alone(
    redis_server: RedisServer, queue_name: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    (tmp_path / "stall_app.py").write_text(STALL_APP)
    env = worker_env(redis_server.url, queue_name, lease=30)
    keys = Keys(queue_name)
    starts = f"starts:{queue_name}"
    queue = Queue(redis_server.url, name=queue_name)
    stalled = spawn("stall_app:worker", env, path=tmp_path)
    other: subprocess.Popen[bytes] | None = None

    async def live_pids() -> set[str]:
        return {w.get("pid", "") for w in await (await queue.connected_broker()).workers()}

    try:
        await eventually(lambda: redis_client.llen(starts) == 1, timeout=30)
        first = redis_client.lindex(starts, 0)
        assert first is not None
        fire_ms, pid = first.decode().split(":")
        assert pid == str(stalled.pid)
        # The worker running the first run stalls: no heartbeat, no lease renewal.
        stalled.send_signal(signal.SIGSTOP)
        other = spawn("stall_app:worker", env, path=tmp_path)
        started = other

        async def other_is_live() -> bool:
            return str(started.pid) in await live_pids()

        async def heartbeat_expired() -> bool:
            return str(stalled.pid) not in await live_pids()

        await eventually(other_is_live, timeout=30)

        # Its heartbeat expires (10 s with a 30 s lease); its lease has not.
        await eventually(heartbeat_expired, timeout=20)
        after = redis_client.zscore(keys.cron, "slow")
        assert after is not None
        # The other worker claims two more ticks, and skips both.
        await eventually(
            lambda: (redis_client.zscore(keys.cron, "slow") or 0) >= after + 2000, timeout=10
        )
        assert redis_client.llen(starts) == 1
        assert redis_client.hget(keys.cron_runs, "slow") == f"cron:slow:{fire_ms}".encode()
        # Once the run is over, the schedule goes on.
        stalled.send_signal(signal.SIGCONT)
        redis_client.set(f"release:{queue_name}", 1)
        await eventually(lambda: redis_client.llen(starts) >= 2, timeout=20)
        for process in (stalled, other):
            process.send_signal(signal.SIGTERM)
        for process in (stalled, other):
            assert await wait_exit(process) == 0
    finally:
        await queue.close()
        for process in (stalled, other):
            if process is not None:
                process.kill()
