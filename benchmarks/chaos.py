"""Chaos run: worker processes under faults, then an audit of every job.

    python benchmarks/chaos.py [--scenarios kill,long-jobs,lost-replies,outage,sigstop]
                               [--workers 3] [--lease 2] [--kill-jobs 20000] [--kill-every 2]
                               [--deadline 90] [--seed N] [--keep-logs]

Starts a private redis-server and runs each scenario against it, on a queue of its own, with
worker subprocesses (``python -m aioqueue run chaos_app:worker``, logs at INFO in one file per
process). Scenarios:

- ``kill``: short jobs; a random worker is SIGKILLed every few seconds and restarted.
- ``long-jobs``: no faults; jobs last several leases, 60 in flight per worker.
- ``lost-replies``: workers and producer reach Redis through a FaultProxy that keeps dropping
  the replies to aioqueue's scripts (EVALSHA), XREADGROUP and XAUTOCLAIM.
- ``outage``: workers reach Redis through a FaultProxy that black-holes it twice for longer
  than the lease while long jobs run.
- ``sigstop``: one worker is SIGSTOPped for longer than its lease while it runs long jobs,
  then SIGCONTed.

The job body (``chaos_app.py``) records every start and finish with plain Redis commands
outside aioqueue's keys. Per scenario the audit prints: jobs, completed, lost (not final by the
deadline; must be 0), bodies that ran more than once (must be 0 unless a worker was killed or
stopped), dead letters that should not exist (must be 0), and checks that every completed job
has exactly one recorded outcome, from the run that owned it, with its attempt and delivery
counters where they should be. Exit code 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from aioqueue import JobOptions, JobRequest, Queue
from aioqueue.brokers.redis import scripts
from aioqueue.brokers.redis.keys import Keys
from aioqueue.errors import RedisUnavailable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from faultproxy import FaultProxy  # noqa: E402  (lives with the tests, not in the package)

APP = "chaos_app:worker"
TASK = "work"
FINAL = frozenset({"complete", "failed", "dead", "aborted"})
# Long-job scenarios enqueue LONG_PER_WORKER jobs per worker, all at once, and want at least
# MIN_IN_FLIGHT of them running on every worker. Workers must also keep spare slots: a full
# worker never runs its takeover sweep (XAUTOCLAIM), and without a sweep a lapsed lease would
# go unnoticed instead of showing up as a second run.
LONG_PER_WORKER = 60
MIN_IN_FLIGHT = 50
# Worker log lines the audit reads (aioqueue's own wording, see worker.py).
COMPLETE_LINE = re.compile(rb" aioqueue\.jobs: work (\S+) complete in ")
REFUSED_LINE = re.compile(rb"job (\S+): outcome not recorded, its lease was lost")
LEASE_LOST_LINE = re.compile(rb"lease of job (\S+) was lost to another worker; cancelling")


# --------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    binary = shutil.which("redis-server") or "redis-server"
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis(port=port).ping():
                return process, port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class WorkerProcess:
    """One ``aioqueue run`` subprocess and the file its log goes to."""

    process: subprocess.Popen[bytes]
    log: Path
    sigkilled: bool = False  # by the kill scenario, on purpose
    hung: bool = False  # did not exit within 30 s of SIGTERM

    @property
    def pid(self) -> int:
        return self.process.pid

    def consuming(self) -> bool:
        """Whether the worker got as far as consuming (its first log line says so)."""
        with self.log.open("rb") as log:
            return b" consuming queue " in log.read(4096)


@dataclass
class WorkerSpec:
    """How a scenario's workers are started."""

    queue: str
    url: str  # where aioqueue reaches Redis (maybe through a proxy)
    lease: float
    concurrency: int


class Harness:
    """What every scenario shares: the private Redis, a direct client, worker logs."""

    def __init__(self, port: int, logs: Path) -> None:
        self.url = f"redis://127.0.0.1:{port}/0"
        self.port = port
        self.logs = logs
        self.client = aioredis.Redis(port=port)
        self._spawned: Counter[str] = Counter()

    def spawn(self, spec: WorkerSpec) -> WorkerProcess:
        self._spawned[spec.queue] += 1
        log = self.logs / f"{spec.queue}-{self._spawned[spec.queue]}.log"
        env = {
            **os.environ,
            "AIOQUEUE_REDIS_URL": spec.url,
            "AIOQUEUE_QUEUE": spec.queue,
            "AIOQUEUE_LEASE": str(spec.lease),
            "AIOQUEUE_CONCURRENCY": str(spec.concurrency),
            "AIOQUEUE_SHUTDOWN_GRACE": "5",
            "CHAOS_REDIS_URL": self.url,  # the app's bookkeeping never goes through a proxy
            "PYTHONPATH": str(HERE),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "aioqueue", "run", APP, "--log-level", "INFO"],
                cwd=HERE,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return WorkerProcess(process, log)

    async def wait_consuming(self, queue: str, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` workers of ``queue`` have sent a heartbeat."""
        deadline = time.monotonic() + timeout
        while await self.client.zcard(Keys(queue).workers) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} workers of {queue!r} did not start in {timeout}s")
            await asyncio.sleep(0.05)

    async def settled(self, queue: str) -> bool:
        """True once no job of ``queue`` is ready, running or waiting.

        A stream entry leaves the stream only in the script that records its job's outcome,
        so an empty stream (and no delayed job) means every enqueued job is final."""
        keys = Keys(queue)
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(keys.stream)
        pipe.zcard(keys.delayed)
        ready, delayed = await pipe.execute()
        return int(ready) == 0 and int(delayed) == 0

    async def wait_settled(self, queue: str, deadline: float) -> bool:
        while not await self.settled(queue):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True


async def enqueue(url: str, queue: str, jobs: list[tuple[str, float]]) -> None:
    """Enqueue ``(job id, seconds)`` jobs by task name, as a producer without the code.

    When redis-py's own re-sends all lose their replies too, the producer gets
    RedisUnavailable and does what guarantees.md tells producers to do: enqueue the same job
    ids again, which cannot create a job twice."""
    requests = [JobRequest(TASK, (s,), {}, JobOptions(job_id=job_id)) for job_id, s in jobs]
    async with Queue(url, name=queue) as producer:
        for failures in range(1, 11):
            try:
                await producer.enqueue_many(requests)
                return
            except RedisUnavailable:
                if failures == 10:
                    raise
                await asyncio.sleep(0.1 * failures)


async def stop_workers(workers: list[WorkerProcess]) -> None:
    """SIGTERM (graceful shutdown) every live worker; SIGKILL what has not exited in 30 s
    (the audit reports it: with a 5 s grace period and nothing in flight, that is a hang)."""
    live = [w for w in workers if w.process.poll() is None]
    for worker in live:
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGCONT)  # a stopped process cannot shut down
            worker.process.send_signal(signal.SIGTERM)
    for worker in live:
        try:
            await asyncio.to_thread(worker.process.wait, 30)
        except subprocess.TimeoutExpired:
            worker.hung = True
            worker.process.kill()
            worker.process.wait()


# --------------------------------------------------------------------------------------------
# Audit


@dataclass
class Outcome:
    """What a scenario did and what the audit found."""

    name: str
    jobs: int = 0
    completed: int = 0
    lost: list[str] = field(default_factory=list)
    reran: list[str] = field(default_factory=list)
    reruns_allowed: bool = False
    dead: list[str] = field(default_factory=list)  # dead letters that should not exist
    seconds: float = 0.0
    faults: str = ""
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """A scenario's setup as the audit needs it."""

    name: str
    queue: str
    job_ids: list[str]
    workers: list[WorkerProcess]  # every process started, killed ones included
    reruns_allowed: bool
    # Kills leave jobs whose worker was lost: "worker lost N times" dead letters are the
    # documented price there, and a killed worker's last outcomes and log lines may be gone.
    # Nothing else may dead-letter a job that never fails, or leave an outcome unaccounted.
    killed: bool = False


def sample(ids: list[str], limit: int = 8) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def pid_of(worker_id: str) -> int | None:
    """The pid in a worker id (``<host>-<pid>-<hex>``)."""
    parts = worker_id.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def text(value: object) -> str:
    """A Redis reply value as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def per_job(counts: Mapping[Any, Any]) -> dict[str, dict[int, int]]:
    """``{"<job> <pid>": n}`` from chaos_app as ``{job: {pid: n}}``."""
    result: dict[str, dict[int, int]] = defaultdict(dict)
    for key, value in counts.items():
        job_id, pid = text(key).rsplit(" ", 1)
        result[job_id][int(pid)] = int(value)
    return result


def scan_logs(workers: list[WorkerProcess]) -> dict[str, dict[int, Counter[str]]]:
    """Per kind of line (complete, refused, lease lost): {pid: Counter(job id)}."""
    patterns = {"complete": COMPLETE_LINE, "refused": REFUSED_LINE, "lease lost": LEASE_LOST_LINE}
    found: dict[str, dict[int, Counter[str]]] = {kind: {} for kind in patterns}
    for worker in workers:
        text = worker.log.read_bytes()
        for kind, pattern in patterns.items():
            found[kind][worker.pid] = Counter(m.group(1).decode() for m in pattern.finditer(text))
    return found


def log_lines_about(workers: list[WorkerProcess], job_ids: list[str], limit: int = 12) -> list[str]:
    """The first worker log lines, by time, that mention any of ``job_ids`` (to report a
    violation with)."""
    wanted = [job_id.encode() for job_id in job_ids]
    found: list[tuple[bytes, str]] = []
    for worker in workers:
        for line in worker.log.read_bytes().splitlines():
            if any(job_id in line for job_id in wanted):
                found.append((line, f"    [{worker.log.name} pid {worker.pid}] {line.decode()}"))
    return [text for _, text in sorted(found)[:limit]]  # lines start with their timestamp


def exit_problem(worker: WorkerProcess) -> str | None:
    """What went wrong with a worker process's exit, if anything."""
    code = worker.process.returncode
    if worker.hung:
        return "hung at shutdown (SIGKILLed)"
    if code == 0 or worker.sigkilled:
        return None
    if code == -signal.SIGTERM and not worker.consuming():
        # A replacement started just before the end can get SIGTERM before it installed its
        # signal handlers, and die of it: it never ran a job.
        return None
    return f"exited with code {code}"


async def audit(harness: Harness, plan: Plan, outcome: Outcome) -> None:
    """Read every job's record and the app's counts; fill in the outcome's columns."""
    keys = Keys(plan.queue)
    client = harness.client
    pipe = client.pipeline(transaction=False)
    for job_id in plan.job_ids:
        pipe.hmget(keys.job(job_id), "status", "attempt", "deliveries", "worker", "reason")
    records = dict(zip(plan.job_ids, await pipe.execute(), strict=True))
    starts = per_job(await client.hgetall(f"chaos:{plan.queue}:starts"))
    finishes = per_job(await client.hgetall(f"chaos:{plan.queue}:finishes"))
    logs = scan_logs(plan.workers)
    # Scan worker log lines of all of the scenario's processes: a completion line is written
    # only after settle.lua accepted the outcome.
    recorded: dict[str, list[int]] = defaultdict(list)
    for pid, jobs in logs["complete"].items():
        for job_id, times in jobs.items():
            recorded[job_id] += [pid] * times

    outcome.jobs = len(plan.job_ids)
    outcome.reruns_allowed = plan.reruns_allowed
    jumped: list[str] = []
    deliveries_of: list[tuple[int, int]] = []
    worker_lost: list[str] = []  # dead letters a scenario allows (kills only)
    doubled: list[str] = []
    superseded: list[str] = []
    for job_id, (status, attempt, deliveries, worker, reason) in records.items():
        state = status.decode() if status else "missing"
        if state not in FINAL:
            outcome.lost.append(job_id)
        elif state == "complete":
            outcome.completed += 1
        elif plan.killed and state == "dead" and (reason or b"").startswith(b"worker lost"):
            worker_lost.append(job_id)
        else:
            outcome.dead.append(job_id)
        if sum(starts.get(job_id, {}).values()) > 1:
            outcome.reran.append(job_id)
        if state == "complete":
            # attempt/deliveries are written only once they differ from 1/0 (architecture.md).
            tries = int(attempt or 1)
            handed = int(deliveries or 0)
            deliveries_of.append((tries, handed))
            if tries != 1 or (not plan.reruns_allowed and handed != 1):
                jumped.append(f"{job_id} (attempt {tries}, deliveries {handed})")
            pids = recorded.get(job_id, [])
            if len(pids) > 1:
                doubled.append(job_id)
            owner = pid_of(worker.decode()) if worker else None
            if pids and owner is not None and pids[-1] != owner:
                superseded.append(f"{job_id} (recorded by pid {pids[-1]}, owner pid {owner})")

    # A job nobody enqueued (or whose id was lost) would also be a bug: every dead letter of
    # the queue is listed, not only those of known jobs.
    for raw in await client.zrange(keys.dead, 0, -1):
        job_id = text(raw)
        if job_id not in records:
            outcome.dead.append(job_id)

    for worker in plan.workers:
        problem = exit_problem(worker)
        if problem is not None:
            outcome.violations.append(f"worker pid {worker.pid} {problem}")
            tail = worker.log.read_bytes().decode(errors="replace").splitlines()[-5:]
            outcome.notes += [f"    [{worker.log.name} pid {worker.pid}] {line}" for line in tail]
    if outcome.lost:
        outcome.violations.append(f"{len(outcome.lost)} jobs lost: {sample(outcome.lost)}")
        for job_id in outcome.lost[:3]:
            state = records[job_id]
            outcome.notes.append(f"lost {job_id}: status/attempt/deliveries/worker = {state[:4]}")
        outcome.notes += log_lines_about(plan.workers, outcome.lost[:3])
    if outcome.reran and not plan.reruns_allowed:
        outcome.violations.append(
            f"{len(outcome.reran)} job bodies ran more than once: {sample(outcome.reran)}"
        )
        for job_id in outcome.reran[:3]:
            outcome.notes.append(f"re-run {job_id}: starts by pid {starts[job_id]}")
        outcome.notes += log_lines_about(plan.workers, outcome.reran[:3])
    if outcome.dead:
        outcome.violations.append(
            f"{len(outcome.dead)} dead letters that should not exist: {sample(outcome.dead)}"
        )
        outcome.notes += log_lines_about(plan.workers, outcome.dead[:3])
    if doubled:
        outcome.violations.append(
            f"{len(doubled)} jobs have two recorded completions: {sample(doubled)}"
        )
    if superseded:
        outcome.violations.append(
            f"{len(superseded)} outcomes recorded from a run that no longer owned the job: "
            + sample(superseded)
        )
    if jumped:
        outcome.violations.append(
            f"{len(jumped)} completed jobs with jumped counters: " + sample(jumped)
        )

    ran = sum(sum(p.values()) for p in starts.values())
    done = sum(sum(p.values()) for p in finishes.values())
    refused = sum(sum(c.values()) for c in logs["refused"].values())
    logged = sum(len(p) for p in recorded.values())
    outcome.notes.insert(
        0,
        f"bodies started {ran}, finished {done}; outcomes recorded {logged} (worker logs), "
        f"refused as stale {refused}",
    )
    # Every body that returned hands its worker an outcome, which settle either records or
    # refuses (the lease was lost), and the worker logs which. Only a killed worker may take
    # some to its grave.
    if not plan.killed and done != logged + refused:
        outcome.violations.append(
            f"{done - logged - refused} finished runs whose outcome was neither recorded nor "
            "refused"
        )
    spread = Counter(deliveries_of)
    outcome.notes.insert(
        1,
        "completed jobs by attempt/deliveries: "
        + ", ".join(f"{a}/{d}: {n}" for (a, d), n in sorted(spread.items())),
    )
    if worker_lost:
        outcome.notes.append(
            f"{len(worker_lost)} dead letters 'worker lost N times' (allowed: every delivery "
            f"of these jobs died with its worker): {sample(worker_lost)}"
        )
    # A renewal that races the worker's own settle finds the entry already acked and warns
    # that the lease was lost, although nothing was taken over: counted apart, as log noise.
    noise = sum(
        1
        for pid, jobs in logs["lease lost"].items()
        for job_id in jobs
        if job_id in logs["complete"].get(pid, {})
    )
    if noise:
        outcome.notes.append(
            f"{noise} 'lease of job ... was lost' warnings named jobs that the same worker had "
            "just settled itself (its renewal raced its own settle; nothing was taken over)"
        )


# --------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Config:
    workers: int
    lease: float
    deadline: float
    kill_jobs: int
    kill_every: float
    rng: random.Random


async def run_kill(harness: Harness, config: Config, outcome: Outcome) -> Plan:
    """Short jobs; SIGKILL a random worker every ``kill_every`` seconds and start another."""
    queue = "chaos-kill"
    spec = WorkerSpec(queue, harness.url, config.lease, concurrency=50)
    rng = config.rng
    jobs = [(f"kill-{n:06d}", rng.uniform(0, 0.05)) for n in range(config.kill_jobs)]
    plan = Plan("kill", queue, [job_id for job_id, _ in jobs], [], reruns_allowed=True, killed=True)
    await enqueue(harness.url, queue, jobs)
    live = [harness.spawn(spec) for _ in range(config.workers)]
    plan.workers += live
    kills = 0
    deadline = time.monotonic() + config.deadline
    next_kill = time.monotonic() + config.kill_every
    try:
        while not await harness.settled(queue) and time.monotonic() < deadline:
            # Only workers that are consuming are killed: on a loaded machine a replacement
            # can take a couple of seconds to start, and killing it then would test nothing.
            if time.monotonic() >= next_kill and (ready := [w for w in live if w.consuming()]):
                victim = rng.choice(ready)
                victim.sigkilled = True
                victim.process.send_signal(signal.SIGKILL)
                await asyncio.to_thread(victim.process.wait)
                live[live.index(victim)] = replacement = harness.spawn(spec)
                plan.workers.append(replacement)
                kills += 1
                next_kill = time.monotonic() + config.kill_every
            await asyncio.sleep(0.1)
    finally:
        await stop_workers(live)
    outcome.faults = f"{kills} SIGKILLs, 1 every {config.kill_every:g}s"
    return plan


def long_concurrency(workers: int) -> int:
    """The largest concurrency that still leaves MIN_IN_FLIGHT jobs of a wave to every worker
    however unevenly the reads share them out: the others can hold at most this many each.
    (With 3 workers: 65, so 180 jobs leave 15 slots spare for the takeover sweeps.)"""
    return (LONG_PER_WORKER * workers - MIN_IN_FLIGHT) // (workers - 1)


async def start_workers(harness: Harness, spec: WorkerSpec, count: int) -> list[WorkerProcess]:
    """Start ``count`` workers and wait until each is consuming, so that they share the jobs
    enqueued next instead of the first one up taking as many as it has slots."""
    workers = [harness.spawn(spec) for _ in range(count)]
    await harness.wait_consuming(spec.queue, count)
    return workers


async def enqueue_wave(
    harness: Harness,
    spec: WorkerSpec,
    config: Config,
    prefix: str,
    leases: tuple[float, float],
) -> tuple[list[str], dict[int, int]]:
    """Enqueue LONG_PER_WORKER jobs per worker lasting ``leases`` (low, high) leases each, all
    at once, and wait until every one has started. Returns the job ids and how many of them
    each worker process runs (none has finished yet: every job lasts two leases or more)."""
    low, high = leases
    count = LONG_PER_WORKER * config.workers
    jobs = [(f"{prefix}-{n:05d}", config.rng.uniform(low, high) * spec.lease) for n in range(count)]
    await enqueue(harness.url, spec.queue, jobs)
    ids = {job_id for job_id, _ in jobs}
    deadline = time.monotonic() + 20
    while True:
        starts = per_job(await harness.client.hgetall(f"chaos:{spec.queue}:starts"))
        running = [pid for job_id, pids in starts.items() if job_id in ids for pid in pids]
        if len(running) >= count or time.monotonic() > deadline:
            return [job_id for job_id, _ in jobs], dict(Counter(running))
        await asyncio.sleep(0.05)


def split(in_flight: dict[int, int]) -> str:
    return "/".join(str(n) for n in sorted(in_flight.values(), reverse=True))


async def run_long_jobs(harness: Harness, config: Config, outcome: Outcome) -> Plan:
    """No faults: two waves of jobs lasting 4-5 leases each; every lease must hold."""
    queue = "chaos-long-jobs"
    spec = WorkerSpec(queue, harness.url, config.lease, long_concurrency(config.workers))
    plan = Plan("long-jobs", queue, [], [], reruns_allowed=False)
    deadline = time.monotonic() + config.deadline
    workers: list[WorkerProcess] = []
    splits: list[str] = []
    try:
        workers = plan.workers = await start_workers(harness, spec, config.workers)
        for wave in range(2):
            ids, in_flight = await enqueue_wave(harness, spec, config, f"long{wave}", (4, 5))
            plan.job_ids += ids
            splits.append(split(in_flight))
            await harness.wait_settled(queue, deadline)
    finally:
        await stop_workers(workers)
    outcome.faults = "none"
    outcome.notes.append(
        f"jobs in flight per worker (concurrency {spec.concurrency}): " + ", then ".join(splits)
    )
    return plan


def script_shas() -> dict[str, bytes]:
    """SHA1 of every script as aioqueue loads it: what its EVALSHA commands carry."""
    return {
        name: hashlib.sha1(scripts.source(name).encode()).hexdigest().encode()
        for name in scripts.NAMES
    }


async def lose_replies(
    proxy: FaultProxy, matches: dict[str, tuple[bytes, float]], stop: asyncio.Event
) -> None:
    """Keep one lost reply armed per match, re-armed ``gap`` seconds after it fired
    (``matches``: label -> (bytes to match, gap)).

    The gap lets redis-py's own re-send (tens of ms later) through most of the time: a lost
    reply must look like a network blip, not like an outage.
    """
    fired = {match: 0 for match, _ in matches.values()}
    fired_at = {match: -gap for match, gap in matches.values()}
    while not stop.is_set():
        now = time.monotonic()
        for match, gap in matches.values():
            count = proxy.fired(match)
            if count != fired[match]:
                fired[match], fired_at[match] = count, now
            if not proxy.armed(match) and now - fired_at[match] >= gap:
                proxy.lose_reply(match)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)


async def run_lost_replies(harness: Harness, config: Config, outcome: Outcome) -> Plan:
    """Workers and producer behind a proxy that keeps losing replies while jobs run."""
    queue = "chaos-lost-replies"
    plan = Plan("lost-replies", queue, [], [], reruns_allowed=False)
    # Renewals get a longer gap: a renewal whose every re-send loses its reply is skipped,
    # and a few of those in a row would let the lease lapse, which is an outage, not a blip.
    # Every other call is retried by its caller until it goes through.
    matches = {
        f"{name} (EVALSHA)": (sha, 0.5 if name == "renew" else 0.15)
        for name, sha in script_shas().items()
    }
    matches |= {"XREADGROUP": (b"XREADGROUP", 0.15), "XAUTOCLAIM": (b"XAUTOCLAIM", 0.15)}
    proxy = FaultProxy("127.0.0.1", harness.port).start()
    stop = asyncio.Event()
    injector: asyncio.Task[None] | None = None
    workers: list[WorkerProcess] = []
    deadline = time.monotonic() + config.deadline
    try:
        spec = WorkerSpec(queue, proxy.url, config.lease, concurrency=50)
        workers = [harness.spawn(spec) for _ in range(config.workers)]
        plan.workers += workers
        await harness.wait_consuming(queue, config.workers)
        injector = asyncio.create_task(lose_replies(proxy, matches, stop))
        # Jobs from 50 ms to 1.5 leases, in batches while the faults run, so that enqueue,
        # begin, settle and renew all keep losing replies.
        for batch in range(10):
            jobs = [
                (f"lost-{batch:02d}-{n:03d}", config.rng.uniform(0.05, 1.5 * config.lease))
                for n in range(150)
            ]
            await enqueue(proxy.url, queue, jobs)
            plan.job_ids += [job_id for job_id, _ in jobs]
            await asyncio.sleep(1.0)
        await harness.wait_settled(queue, deadline)
    finally:
        stop.set()
        if injector is not None:
            await injector
        proxy.restore()  # a clean shutdown: the faults are for the run, not the exit
        await stop_workers(workers)
        proxy.stop()
    lost = {label: proxy.fired(match) for label, (match, _) in matches.items()}
    outcome.faults = f"{sum(lost.values())} replies lost"
    outcome.notes.append(
        "lost replies: " + ", ".join(f"{label} {n}" for label, n in lost.items() if n)
    )
    return plan


async def run_outage(harness: Harness, config: Config, outcome: Outcome) -> Plan:
    """Workers behind a proxy; Redis is black-holed twice for 2.5 leases while jobs run."""
    queue = "chaos-outage"
    plan = Plan("outage", queue, [], [], reruns_allowed=False)
    proxy = FaultProxy("127.0.0.1", harness.port).start()
    outage = 2.5 * config.lease
    workers: list[WorkerProcess] = []
    deadline = time.monotonic() + config.deadline
    try:
        spec = WorkerSpec(queue, proxy.url, config.lease, long_concurrency(config.workers))
        workers = plan.workers = await start_workers(harness, spec, config.workers)
        # Jobs of 2-7 leases: some finish during each outage and are settled after it.
        plan.job_ids, in_flight = await enqueue_wave(harness, spec, config, "outage", (2, 7))
        for _ in range(2):
            proxy.blackhole(outage)
            await asyncio.to_thread(
                proxy.wait_until_blocking, lambda p: not p.blackholed, outage + 5
            )
            await asyncio.sleep(config.lease)
        await harness.wait_settled(queue, deadline)
    finally:
        proxy.restore()
        await stop_workers(workers)
        proxy.stop()
    outcome.faults = f"2 blackholes of {outage:g}s"
    outcome.notes.append(f"jobs in flight per worker at the first blackhole: {split(in_flight)}")
    return plan


async def run_sigstop(harness: Harness, config: Config, outcome: Outcome) -> Plan:
    """SIGSTOP one worker for three leases while it runs long jobs, then SIGCONT it."""
    queue = "chaos-sigstop"
    plan = Plan("sigstop", queue, [], [], reruns_allowed=True)
    # Room for the other workers to take over every job of the stopped one.
    spec = WorkerSpec(queue, harness.url, config.lease, 2 * LONG_PER_WORKER)
    pause = 3 * config.lease
    workers: list[WorkerProcess] = []
    deadline = time.monotonic() + config.deadline
    try:
        workers = plan.workers = await start_workers(harness, spec, config.workers)
        # Jobs of 2-5 leases: some of the stopped worker's copies end during the stop and
        # try to settle the moment it wakes, racing its own lease renewal.
        plan.job_ids, in_flight = await enqueue_wave(harness, spec, config, "stop", (2, 5))
        victim = max(workers, key=lambda w: in_flight.get(w.pid, 0))
        victim.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(pause)
        victim.process.send_signal(signal.SIGCONT)
        await harness.wait_settled(queue, deadline)
    finally:
        await stop_workers(workers)
    outcome.faults = f"1 SIGSTOP of {pause:g}s"
    starts = per_job(await harness.client.hgetall(f"chaos:{queue}:starts"))
    finishes = per_job(await harness.client.hgetall(f"chaos:{queue}:finishes"))
    mine = [job_id for job_id, pids in starts.items() if victim.pid in pids]
    taken = [job_id for job_id in mine if len(starts[job_id]) > 1]
    stale = [job_id for job_id in taken if victim.pid in finishes.get(job_id, {})]
    outcome.notes.append(
        f"stopped pid {victim.pid} ran {len(mine)} jobs (in flight per worker: "
        f"{split(in_flight)}); {len(taken)} taken over by others; {len(stale)} of its own "
        "copies of those still finished after SIGCONT"
    )
    return plan


Runner = Callable[[Harness, Config, Outcome], Awaitable[Plan]]
SCENARIOS: dict[str, Runner] = {
    "kill": run_kill,
    "long-jobs": run_long_jobs,
    "lost-replies": run_lost_replies,
    "outage": run_outage,
    "sigstop": run_sigstop,
}


# --------------------------------------------------------------------------------------------
# Report


def table(outcomes: list[Outcome]) -> Iterator[str]:
    header = (
        "scenario",
        "jobs",
        "completed",
        "lost",
        "ran more than once",
        "unwarranted dead letters",
        "duration",
        "faults",
    )
    rows = [
        (
            o.name,
            str(o.jobs),
            str(o.completed),
            str(len(o.lost)),
            f"{len(o.reran)} ({'allowed' if o.reruns_allowed else 'must be 0'})",
            str(len(o.dead)),
            f"{o.seconds:.1f}s",
            o.faults,
        )
        for o in outcomes
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    yield "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    yield "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    for row in rows:
        yield "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"


async def run_all(args: argparse.Namespace, names: list[str], logs: Path) -> list[Outcome]:
    config = Config(
        workers=args.workers,
        lease=args.lease,
        deadline=args.deadline,
        kill_jobs=args.kill_jobs,
        kill_every=args.kill_every,
        rng=random.Random(args.seed),
    )
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as directory:
        server, port = start_redis(directory)
        harness = Harness(port, logs)
        try:
            for name in names:
                outcome = Outcome(name)
                started = time.monotonic()
                plan = await SCENARIOS[name](harness, config, outcome)
                outcome.seconds = time.monotonic() - started
                await audit(harness, plan, outcome)
                outcomes.append(outcome)
                verdict = "FAIL" if outcome.violations else "ok"
                print(f"{name}: {verdict} in {outcome.seconds:.1f}s", flush=True)
        finally:
            await harness.client.aclose()
            server.kill()
            server.wait()
    return outcomes


def main() -> None:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated (default: all)"
    )
    parser.add_argument("--workers", type=int, default=3, help="worker processes per scenario")
    parser.add_argument("--lease", type=float, default=2.0, help="seconds (AIOQUEUE_LEASE)")
    parser.add_argument("--kill-jobs", type=int, default=20_000, help="jobs of the kill scenario")
    parser.add_argument("--kill-every", type=float, default=2.0, help="seconds between SIGKILLs")
    parser.add_argument("--deadline", type=float, default=90.0, help="per scenario, seconds")
    parser.add_argument("--seed", type=int, default=None, help="for job durations and victims")
    parser.add_argument("--keep-logs", action="store_true", help="keep worker logs on success")
    args = parser.parse_args()
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    if args.workers < 2:
        parser.error("--workers must be at least 2: takeovers need another worker")

    logs = Path(tempfile.mkdtemp(prefix="aioqueue-chaos-"))
    outcomes = asyncio.run(run_all(args, names, logs))

    print()
    print(f"workers: {args.workers} per scenario, lease: {args.lease:g}s")
    for line in table(outcomes):
        print(line)
    failed = [o for o in outcomes if o.violations]
    for o in outcomes:
        print(f"\n{o.name}:")
        for line in o.violations:
            print(f"  VIOLATION: {line}")
        for line in o.notes:
            print(f"  {line}")
    print()
    if failed or args.keep_logs:
        print(f"worker logs: {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
    if failed:
        print(f"FAIL: {', '.join(o.name for o in failed)}")
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
