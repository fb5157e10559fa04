"""Scaffolding shared by every runner (stdlib only: it runs inside each library's venv).

A runner module (``runners/<lib>.py``) provides:

* ``producer(url)`` -- an async context manager yielding an object with
  ``async one(kind, *args)`` (enqueue one job and await the enqueue) and, where the library has a
  bulk/pipelined enqueue API, ``async many(kind, n)``;
* ``async worker(url, concurrency, result_ttl)`` -- runs the library's worker until cancelled
  (aioqueue's also takes ``queues``: W9 runs one worker on three queues);
* task functions named ``noop``, ``sleep`` and ``lat`` that call :func:`hit`, :func:`started`
  and :func:`hit_latency` from this module.

Completion is counted in-process (a global counter and perf_counter timestamps), never with extra
Redis work. Results go to the parent as one JSON line on stdout prefixed with ``@@bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from types import ModuleType
from typing import Any

PREFIX = "@@bench "
CHUNK = 10_000  # jobs per bulk enqueue call
LAT_SPACING_S = 0.005  # W3: one job every 5 ms
LIBRARY_LOGGERS = ("arq", "saq", "streaq", "taskiq", "taskiq_redis", "aioqueue", "coredis", "redis")


class _Counter:
    def __init__(self) -> None:
        self.target = 0
        self.count = 0
        self.first_start: float | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.latencies_ms: list[float] = []
        self.rss_first_kb: int | None = None
        self.cpu_first: float | None = None  # process CPU (all threads) at first completion
        self.cpu_last: float | None = None  # ... and at the target-th completion
        self.done = asyncio.Event()

    def hit(self) -> None:
        now = time.perf_counter()
        if self.count == 0:
            self.first = now
            self.cpu_first = time.process_time()
            self.rss_first_kb = rss_kb()
        self.last = now
        self.count += 1
        if self.count == self.target:
            self.cpu_last = time.process_time()
            self.done.set()


COUNTER = _Counter()


def hit() -> None:
    """Call at the end of every benchmark task."""
    COUNTER.hit()


def started() -> None:
    """Call at the start of a task whose own duration matters (W2 sleep)."""
    if COUNTER.first_start is None:
        COUNTER.first_start = time.perf_counter()


def hit_latency(t0: float) -> None:
    """W3: record start - enqueue (wall clock, both sides on this machine), then count."""
    COUNTER.latencies_ms.append((time.time() - t0) * 1000.0)
    COUNTER.hit()


def rss_kb() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def emit(**payload: Any) -> None:
    sys.stdout.write(PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


def _configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


async def _produce(mod: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    n = args.jobs
    async with mod.producer(args.url) as prod:
        bulk = hasattr(prod, "many")
        t0 = time.perf_counter()
        if args.workload in ("W1", "W2", "W5", "W6", "W9", "W10"):
            kinds = {"W2": "sleep", "W10": "limited"}
            kind = kinds.get(args.workload, "noop")
            if bulk:
                left = n
                while left > 0:
                    batch = min(CHUNK, left)
                    await prod.many(kind, batch)
                    left -= batch
            else:
                for _ in range(n):
                    await prod.one(kind)
        elif args.workload == "W3":
            bulk = False
            for i in range(n):
                await prod.one("lat", time.time())
                delay = t0 + (i + 1) * LAT_SPACING_S - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        elif args.workload == "W4":
            bulk = False
            for _ in range(n):
                await prod.one("noop")
        elif args.workload in ("W7", "W8"):
            # Workflows (aioqueue only): one group of n - 1 members and its callback, or one
            # chain of n steps: n jobs run either way.
            await prod.flow(args.workload, n)
        else:
            raise SystemExit(f"unknown workload {args.workload}")
        elapsed = time.perf_counter() - t0
    return {"n": n, "elapsed_s": elapsed, "rate": n / elapsed if elapsed else None, "bulk": bulk}


async def _work(mod: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    COUNTER.target = args.jobs
    rss_before = rss_kb()
    options: dict[str, Any] = {"concurrency": args.concurrency, "result_ttl": args.result_ttl}
    if args.workload == "W9":
        options["queues"] = 3  # aioqueue only: one worker consuming three queues
    task = asyncio.create_task(mod.worker(args.url, **options))
    emit(event="ready")
    waiter = asyncio.create_task(COUNTER.done.wait())
    finished, _ = await asyncio.wait(
        {task, waiter}, timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED
    )
    rss_end = rss_kb()
    if args.workload == "W6":
        # Let the last jobs' acks/results land before the process ends (the soak then measures
        # Redis memory after expiry); the timestamps above are already taken.
        await asyncio.sleep(2)
    out: dict[str, Any] = {"n": args.jobs, "count": COUNTER.count}
    if waiter in finished:
        out["status"] = "ok"
    elif task in finished:
        exc = task.exception()
        out["status"] = "error"
        out["error"] = f"worker returned early: {exc!r}" if exc else "worker returned early"
    else:
        out["status"] = "timeout"
    begin = COUNTER.first_start if COUNTER.first_start is not None else COUNTER.first
    if begin is not None and COUNTER.last is not None and COUNTER.last > begin:
        out["elapsed_s"] = COUNTER.last - begin
        out["rate"] = COUNTER.count / (COUNTER.last - begin)
    if COUNTER.cpu_first is not None and COUNTER.cpu_last is not None and COUNTER.count > 1:
        cpu = COUNTER.cpu_last - COUNTER.cpu_first
        out["cpu_us_per_job"] = cpu * 1e6 / (COUNTER.count - 1)
    out["latencies_ms"] = COUNTER.latencies_ms
    out["rss_before_kb"] = rss_before
    out["rss_start_kb"] = COUNTER.rss_first_kb
    out["rss_end_kb"] = rss_end
    # The worker task is left running: _entry ends the process right after emitting.
    return out


def main(mod: ModuleType) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["producer", "worker", "check"], required=True)
    p.add_argument("--workload", default="W1")
    p.add_argument("--url", default="")
    p.add_argument("--jobs", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--result-ttl", type=int, default=60)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    _configure_logging()
    if args.role == "check":
        emit(event="result", status="ok")
        return
    asyncio.run(_entry(mod, args))


async def _entry(mod: ModuleType, args: argparse.Namespace) -> None:
    # Results are emitted and the process ends from inside the loop, so that library teardown
    # (background threads, pools, asyncio.run's executor shutdown) can never hang a run.
    try:
        if args.role == "producer":
            result = await _produce(mod, args)
        else:
            result = await _work(mod, args)
    except BaseException as exc:
        emit(event="result", status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        sys.stderr.flush()
        os._exit(1)
    result.setdefault("status", "ok")
    emit(event="result", **result)
    sys.stderr.flush()
    os._exit(0)
