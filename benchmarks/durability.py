"""What ``wait_replicas`` costs: enqueue and drain rates with wait_replicas=0 and =1.

    .venv/bin/python benchmarks/durability.py [--repeat 3] [--enqueues 40000] [--producers 50]
                                              [--jobs 100000] [--concurrency 100]

Starts its own primary and one replica (``redis-server --save '' --appendonly no``, the replica
with ``--replicaof``, free loopback ports, temp dirs) and waits until the replica's
``master_link_status`` is ``up``. Then, for wait_replicas 0 and 1, interleaved over
``--repeat`` rounds (the order alternates from round to round):

* **enqueue**: ``--enqueues`` single ``await task.enqueue()`` calls from one process, run by
  ``--producers`` concurrent coroutines: jobs/s and the p50 / p99 latency of one call. With
  wait_replicas=1 every call is one round trip of ``EVALSHA enqueue`` + ``WAIT 1 1000``.
* **drain**: ``--jobs`` no-op jobs enqueued beforehand (and replicated: ``WAIT`` before the
  worker starts), then one worker process (``queue.worker(concurrency=100)``, this script run
  with ``--role worker``) runs them: jobs/s from the first completion to the moment the last
  outcome is written (the worker forgets a job when its settle round trip has returned; with
  wait_replicas=1 each settle batch ends with ``WAIT``).

Prints one line per run and a markdown table of the medians (min to max of the runs), with the
ratio to wait_replicas=0 and the ``WAIT`` commands the primary executed (``INFO
commandstats``, reset before each run). Stops both servers at the end, also on Ctrl-C.
``AIOQUEUE_*`` environment variables are dropped (they would beat the arguments). It measures
the aioqueue the interpreter imports; to measure another tree, put that checkout first on
``PYTHONPATH`` (the worker inherits it; the header says which one was imported). See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Resp, RespError, free_port

import aioqueue
from aioqueue import Context, Queue

QUEUE = "durability"
PREFIX = "@@durability "
MODES = (0, 1)  # wait_replicas values compared; the first is the reference
WARMUP = 200  # untimed enqueues before each timed enqueue run (connections, scripts)
CHUNK = 10_000  # jobs per enqueue_many call when filling the queue for a drain


# --------------------------------------------------------------------------- servers


class ReplicatedRedis:
    """A private primary and one replica of it, non-persistent, on free loopback ports."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found on PATH")
        self.tmp = Path(tempfile.mkdtemp(prefix="aioqueue-durability-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clients: list[Resp] = []
        self.primary_port = self._start(binary, "primary")
        self.primary = self._connect(self.primary_port)
        self.replica_port = self._start(
            binary, "replica", "--replicaof", "127.0.0.1", str(self.primary_port)
        )
        self.replica = self._connect(self.replica_port)
        self.url = f"redis://127.0.0.1:{self.primary_port}/0"
        self._wait_link_up(30.0)

    def _start(self, binary: str, name: str, *extra: str) -> int:
        port = free_port()
        workdir = self.tmp / name
        workdir.mkdir()
        # Its own session: a Ctrl-C in the terminal reaches this script, which stops the
        # servers itself (see stop()), instead of racing it to them.
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                # the first full sync starts at once instead of after the default 5 s
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                str(workdir),
                "--logfile",
                str(workdir / "redis.log"),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return port

    def _connect(self, port: int) -> Resp:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = Resp(port)
                if client("PING") == "PONG":
                    self.clients.append(client)
                    return client
            except (OSError, RespError):
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit(f"redis-server on port {port} did not start (see {self.tmp})")
            time.sleep(0.05)

    def _wait_link_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.replica.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise SystemExit("the replica did not reach master_link_status:up")
            time.sleep(0.05)

    def version(self) -> str:
        return self.primary.info("server").get("redis_version", "?")

    def flushall(self) -> None:
        self.primary("FLUSHALL")
        self.wait_replicated()

    def wait_replicated(self) -> None:
        """Until the replica has everything the primary wrote (WAIT 1 from a side client)."""
        if int(self.primary("WAIT", 1, 30_000)) < 1:
            raise RuntimeError("the replica did not acknowledge within 30 s")

    def reset_stats(self) -> None:
        self.primary("CONFIG", "RESETSTAT")

    def calls(self, command: str) -> int:
        """How often the primary executed ``command`` since the last reset_stats()."""
        stats = self.primary.info("commandstats").get(f"cmdstat_{command.lower()}", "")
        fields = dict(part.split("=", 1) for part in stats.split(",") if "=" in part)
        return int(fields.get("calls", 0))

    def cpu_seconds(self) -> float:
        info = self.primary.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the queue


class Counter:
    """Completions of the no-op task, counted in-process (no Redis work per job)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.first = 0.0
        self.cpu_first = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        if self.count == 0:
            self.first = time.perf_counter()
            self.cpu_first = time.process_time()
        self.count += 1
        if self.count == self.target:
            self.done.set()


def make_queue(url: str, wait_replicas: int, counter: Counter | None = None) -> Queue:
    queue = Queue(url, name=QUEUE, result_ttl=60, wait_replicas=wait_replicas)
    # main() drops AIOQUEUE_* variables (they beat code): this must be the private primary.
    if (queue.settings.redis_url, queue.settings.wait_replicas) != (url, wait_replicas):
        raise SystemExit(f"settings differ from the arguments: {queue.settings!r}")

    @queue.task(name="noop")
    async def noop(ctx: Context) -> None:
        if counter is not None:
            counter.hit()

    return queue


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def enqueue_run(
    url: str, wait_replicas: int, n: int, producers: int, timed: Callable[[], None]
) -> dict[str, Any]:
    """n single ``await task.enqueue()`` calls spread over ``producers`` coroutines;
    ``timed()`` is called when the warm-up is over and the timed part starts."""
    queue = make_queue(url, wait_replicas)
    task = queue.tasks["noop"]
    latencies: list[float] = []

    async def produce(count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            await task.enqueue()
            latencies.append(time.perf_counter() - t0)

    async with queue:
        # Warm-up, as many at once as will be timed: the pool opens its connections and
        # the scripts are loaded and checked before the clock starts.
        await asyncio.gather(*(task.enqueue() for _ in range(max(WARMUP, producers))))
        latencies.clear()
        timed()
        shares = [n // producers + (1 if i < n % producers else 0) for i in range(producers)]
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(produce(k) for k in shares if k))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    return {
        "rate": n / wall,
        "p50_ms": quantile(latencies, 0.50) * 1000,
        "p99_ms": quantile(latencies, 0.99) * 1000,
        "cpu_us_per_job": cpu * 1e6 / n,
    }


async def fill(url: str, n: int) -> None:
    """Enqueue n no-op jobs in bulk (not measured)."""
    queue = make_queue(url, 0)
    task = queue.tasks["noop"]
    async with queue:
        for start in range(0, n, CHUNK):
            await queue.enqueue_many([task.prepare() for _ in range(min(CHUNK, n - start))])


async def drain(url: str, wait_replicas: int, n: int, concurrency: int) -> dict[str, Any]:
    """The worker process (``--role worker``): run n queued no-op jobs, time them."""
    counter = Counter(n)
    queue = make_queue(url, wait_replicas, counter)
    worker = queue.worker(concurrency=concurrency)
    if (worker.settings.redis_url, worker.settings.wait_replicas) != (url, wait_replicas):
        raise SystemExit(f"worker settings differ from the arguments: {worker.settings!r}")
    running = asyncio.create_task(worker.run(handle_signals=False))
    done = asyncio.create_task(counter.done.wait())
    await asyncio.wait({running, done}, return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        done.cancel()
        await running  # raises what stopped the worker
        raise SystemExit("the worker stopped before running every job")
    # Every job has run; a job leaves in_flight once its settle round trip has returned.
    while worker.in_flight:
        await asyncio.sleep(0.0005)
    end = time.perf_counter()
    cpu = time.process_time() - counter.cpu_first
    worker.stop()
    await running
    await queue.close()
    return {
        "rate": (n - 1) / (end - counter.first),
        "count": counter.count,
        "aioqueue": aioqueue.__file__,
        "cpu_us_per_job": cpu * 1e6 / n,
    }


def worker_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = asyncio.run(drain(args.url, args.wait_replicas, args.jobs, args.concurrency))
    print(PREFIX + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- one run each


@contextlib.contextmanager
def worker_process(
    url: str, wait_replicas: int, n: int, concurrency: int
) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """This script as ``--role worker`` in its own session, killed (group) when done."""
    # closed below, after the process is gone
    stderr = tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--role",
            "worker",
            "--url",
            url,
            "--wait-replicas",
            str(wait_replicas),
            "--jobs",
            str(n),
            "--concurrency",
            str(concurrency),
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    try:
        yield proc, stderr
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        stderr.close()


def run_enqueue(srv: ReplicatedRedis, wait_replicas: int, n: int, producers: int) -> dict[str, Any]:
    srv.flushall()
    run = asyncio.run(enqueue_run(srv.url, wait_replicas, n, producers, srv.reset_stats))
    run["waits"] = srv.calls("wait")
    return run


def run_drain(srv: ReplicatedRedis, wait_replicas: int, n: int, concurrency: int) -> dict[str, Any]:
    srv.flushall()
    asyncio.run(fill(srv.url, n))
    srv.wait_replicated()  # the replica starts level in both modes
    srv.reset_stats()
    redis_cpu0 = srv.cpu_seconds()
    with worker_process(srv.url, wait_replicas, n, concurrency) as (proc, stderr):
        try:
            out, _ = proc.communicate(timeout=60 + n / 200)
        except subprocess.TimeoutExpired:
            return {"status": "timeout"}
        lines = [ln for ln in out.decode().splitlines() if ln.startswith(PREFIX)]
        if proc.returncode != 0 or not lines:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            return {"status": "error", "error": " | ".join(tail) or f"exit {proc.returncode}"}
    run: dict[str, Any] = json.loads(lines[-1][len(PREFIX) :])
    if run.get("aioqueue") != aioqueue.__file__:  # PYTHONPATH must reach the worker too
        return {"status": "error", "error": f"the worker imported {run.get('aioqueue')}"}
    run["redis_cpu_us_per_job"] = (srv.cpu_seconds() - redis_cpu0) * 1e6 / n
    run["waits"] = srv.calls("wait")
    run["status"] = "ok"
    return run


# --------------------------------------------------------------------------- report


def spread(runs: list[dict[str, Any]], key: str, fmt: str) -> str:
    vals = [r[key] for r in runs]
    text = fmt.format(statistics.median(vals))
    if len(vals) > 1:
        text += f" ({fmt.format(min(vals))} to {fmt.format(max(vals))})"
    return text


def render(results: dict[int, dict[str, list[dict[str, Any]]]], enqueues: int, jobs: int) -> str:
    ok = {
        mode: {
            phase: [r for r in runs if r.get("status", "ok") == "ok"] for phase, runs in r.items()
        }
        for mode, r in results.items()
    }

    def median(mode: int, phase: str, key: str) -> float | None:
        runs = ok[mode][phase]
        return statistics.median(r[key] for r in runs) if runs else None

    ref = MODES[0]
    lines = [
        "| wait_replicas | enqueue/s | enqueue p50 / p99 ms | drain jobs/s "
        f"| enqueue/s vs {ref} | drain vs {ref} | WAITs: enqueue / drain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        enq, dr = ok[mode]["enqueue"], ok[mode]["drain"]
        cells = [str(mode)]
        if enq:
            p50, p99 = median(mode, "enqueue", "p50_ms"), median(mode, "enqueue", "p99_ms")
            cells += [spread(enq, "rate", "{:,.0f}"), f"{p50:.2f} / {p99:.2f}"]
        else:
            cells += ["error", "-"]
        cells.append(spread(dr, "rate", "{:,.0f}") if dr else "error")
        for phase in ("enqueue", "drain"):
            a, b = median(ref, phase, "rate"), median(mode, phase, "rate")
            cells.append(f"{b / a:.2f}" if a and b else "-")
        waits = [median(mode, phase, "waits") for phase in ("enqueue", "drain")]
        cells.append(" / ".join("-" if w is None else f"{w:,.0f}" for w in waits))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"enqueue: {enqueues:,} single enqueues; drain: {jobs:,} jobs, one worker."]
    for mode in MODES[1:]:
        for phase, what in (("enqueue", "per enqueue (producer)"), ("drain", "per job drained")):
            a, b = median(ref, phase, "rate"), median(mode, phase, "rate")
            if a and b:
                lines.append(
                    f"- wait_replicas={mode}: {1e6 / b - 1e6 / a:+,.1f} µs of wall time {what}"
                )
        dr = ok[mode]["drain"]
        w = median(mode, "drain", "waits")
        if dr and w:
            lines.append(
                f"- wait_replicas={mode}: {jobs / w:,.0f} jobs per settle WAIT "
                f"(settle batches of that size on average)"
            )
        for phase in ("enqueue", "drain"):
            a, b = median(ref, phase, "cpu_us_per_job"), median(mode, phase, "cpu_us_per_job")
            if a and b:
                lines.append(
                    f"- {phase} client CPU µs/job: {a:,.1f} (wait_replicas={ref}) → {b:,.1f} "
                    f"(wait_replicas={mode})"
                )
        a, b = (
            median(ref, "drain", "redis_cpu_us_per_job"),
            median(mode, "drain", "redis_cpu_us_per_job"),
        )
        if a and b:
            lines.append(
                f"- drain primary redis-server CPU µs/job: {a:,.1f} → {b:,.1f} "
                f"(wait_replicas={mode})"
            )
    return "\n".join(lines)


def describe(phase: str, run: dict[str, Any]) -> str:
    if run.get("status", "ok") != "ok":
        return f"{run.get('status')}: {run.get('error')}"
    text = f"{run['rate']:,.0f} jobs/s"
    if phase == "enqueue":
        text += f", p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms"
    text += f", client CPU {run['cpu_us_per_job']:,.1f} µs/job"
    if "redis_cpu_us_per_job" in run:
        text += f", primary CPU {run['redis_cpu_us_per_job']:,.1f} µs/job"
    return text + f", WAIT calls {run['waits']:,}"


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="rounds; medians reported (default 3)")
    p.add_argument("--enqueues", type=int, default=40_000, help="single enqueues per run")
    p.add_argument("--producers", type=int, default=50, help="concurrent enqueue coroutines")
    p.add_argument("--jobs", type=int, default=100_000, help="jobs the worker drains per run")
    p.add_argument("--concurrency", type=int, default=100, help="worker concurrency")
    p.add_argument("--role", choices=("main", "worker"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--wait-replicas", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse_args()
    if args.role == "worker":
        return worker_main(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Stop the servers on Ctrl-C and SIGTERM, even when started with SIGINT ignored (``&``).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    # AIOQUEUE_* variables beat code: one naming another Redis must not be benchmarked.
    for name in [name for name in os.environ if name.startswith("AIOQUEUE_")]:
        print(f"[setup] ignoring {name} from the environment", flush=True)
        del os.environ[name]
    results: dict[int, dict[str, list[dict[str, Any]]]] = {
        mode: {"enqueue": [], "drain": []} for mode in MODES
    }
    load0 = os.getloadavg()[0]
    started = time.monotonic()
    srv = ReplicatedRedis()
    try:
        print(
            f"[setup] redis-server {srv.version()}: primary 127.0.0.1:{srv.primary_port}, "
            f"replica 127.0.0.1:{srv.replica_port} (master_link_status:up)",
            flush=True,
        )
        for rep in range(args.repeat):
            order = MODES if rep % 2 == 0 else MODES[::-1]  # ABBA: drift hits both alike
            for mode in order:
                run = run_enqueue(srv, mode, args.enqueues, args.producers)
                results[mode]["enqueue"].append(run)
                print(
                    f"  [{rep + 1}/{args.repeat}] enqueue wait_replicas={mode}: "
                    + describe("enqueue", run),
                    flush=True,
                )
            for mode in order:
                run = run_drain(srv, mode, args.jobs, args.concurrency)
                results[mode]["drain"].append(run)
                print(
                    f"  [{rep + 1}/{args.repeat}] drain   wait_replicas={mode}: "
                    + describe("drain", run),
                    flush=True,
                )
        version = srv.version()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the servers", file=sys.stderr)
        return 130
    finally:
        srv.stop()
    print(
        f"\ndurability benchmark: redis-server {version}, primary + 1 replica on loopback, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}; repeat={args.repeat} "
        f"(median, min to max), producers={args.producers}, worker concurrency="
        f"{args.concurrency}; load average {load0:.2f} → {os.getloadavg()[0]:.2f}; "
        f"{time.monotonic() - started:.0f} s\naioqueue imported from "
        f"{Path(aioqueue.__file__).parent}\n"
    )
    print(render(results, args.enqueues, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
