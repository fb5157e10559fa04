"""How long an urgent job waits behind a backlog: start latency of high-priority jobs while
100,000 low-priority jobs wait on the same queue and one worker keeps busy with them.

    python benchmarks/priority.py [--backlog 100000] [--urgent 200] [--concurrency 20]

Starts a private redis-server, enqueues the backlog (priority -5, each job sleeps 10 ms), runs
one in-process worker, then enqueues one high-priority job (priority 5) every 50 ms and
records, for each, the time from its enqueue call to its first line running. Prints a
table with p50 / p95 / p99 / max; the target (issue 12) is p99 <= 50 ms. The worker's slots
free up as backlog jobs finish, so this is the time to the next free slot plus one fetch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RedisServer

from aioqueue import Context, Queue


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(url: str, backlog: int, urgent: int, concurrency: int) -> list[float]:
    queue = Queue(url, name="priority-bench", result_ttl=60)
    latencies: list[float] = []
    sent: dict[int, float] = {}
    done = asyncio.Event()

    @queue.task(priority=-5)
    async def bulk(ctx: Context, n: int) -> None:
        await asyncio.sleep(0.01)

    @queue.task(priority=5)
    async def urgent_job(ctx: Context, n: int) -> None:
        latencies.append((time.perf_counter() - sent[n]) * 1000)
        if len(latencies) == urgent:
            done.set()

    async with queue:
        for start in range(0, backlog, 10_000):
            count = min(10_000, backlog - start)
            await queue.enqueue_many([bulk.prepare(n) for n in range(start, start + count)])
        worker = queue.worker(concurrency=concurrency)
        task = asyncio.create_task(worker.run(handle_signals=False))
        await asyncio.sleep(1.0)  # the worker is busy with the backlog now
        for n in range(urgent):
            sent[n] = time.perf_counter()
            await urgent_job.enqueue(n)
            await asyncio.sleep(0.05)
        await asyncio.wait_for(done.wait(), 60)
        waiting = (await queue.counts()).ready
        worker.stop()
        await task
    print(f"low-priority jobs still waiting at the end: {waiting:,}")
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--urgent", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("aioqueue").setLevel(logging.WARNING)
    server = RedisServer()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        latencies = asyncio.run(measure(url, args.backlog, args.urgent, args.concurrency))
    finally:
        server.stop()
    print(
        "\n| backlog (priority -5) | urgent jobs (priority 5) "
        "| p50 ms | p95 ms | p99 ms | max ms |"
        f"\n|---:|---:|---:|---:|---:|---:|"
        f"\n| {args.backlog:,} | {len(latencies)} | {statistics.median(latencies):.1f} "
        f"| {percentile(latencies, 0.95):.1f} | {percentile(latencies, 0.99):.1f} "
        f"| {max(latencies):.1f} |"
    )
    return 0 if percentile(latencies, 0.99) <= 50 else 1


if __name__ == "__main__":
    raise SystemExit(main())
