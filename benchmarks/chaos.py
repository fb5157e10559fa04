"""Chaos run: N jobs, several worker processes, one SIGKILLed and restarted every few seconds.

    python benchmarks/chaos.py [--jobs 20000] [--workers 3] [--kill-every 2] [--lease 2]

Starts a private redis-server, enqueues the jobs, runs the workers (``chaos_app.py``) and
keeps killing one at random with SIGKILL and starting a replacement, until every job has
completed or the deadline passes. Prints jobs enqueued, completed, lost (must be 0) and run
more than once (the price of at-least-once delivery when a worker dies mid-job).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from aioqueue import JobRequest, Queue

HERE = Path(__file__).resolve().parent


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


def spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "aioqueue", "run", "chaos_app:worker", "--log-level", "ERROR"],
        cwd=HERE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def enqueue(url: str, jobs: int) -> None:
    """Enqueue by task name, as a producer without the task's code would."""
    async with Queue(url, name="chaos") as queue:
        await queue.enqueue_many([JobRequest("work", (n,), {}) for n in range(jobs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=2.0)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        server, port = start_redis(directory)
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis(port=port)
        env = {
            **os.environ,
            "AIOQUEUE_REDIS_URL": url,
            "AIOQUEUE_LEASE": str(args.lease),
            "PYTHONPATH": str(HERE),
        }
        workers: list[subprocess.Popen[bytes]] = []
        kills = 0
        try:
            started = time.monotonic()
            asyncio.run(enqueue(url, args.jobs))
            print(f"enqueued {args.jobs} jobs in {time.monotonic() - started:.2f}s", flush=True)
            workers = [spawn(env) for _ in range(args.workers)]
            next_kill = time.monotonic() + args.kill_every
            stream = "aioqueue:{chaos}:stream"
            while time.monotonic() - started < args.deadline:
                done = client.hlen("chaos:runs")
                if done == args.jobs and client.xlen(stream) == 0:
                    break
                if time.monotonic() >= next_kill:
                    victim = random.randrange(len(workers))
                    workers[victim].send_signal(signal.SIGKILL)
                    workers[victim].wait()
                    workers[victim] = spawn(env)
                    kills += 1
                    next_kill = time.monotonic() + args.kill_every
                time.sleep(0.1)
            elapsed = time.monotonic() - started
        finally:
            for process in workers:
                process.send_signal(signal.SIGTERM)
            for process in workers:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
        runs = {int(k): int(v) for k, v in client.hgetall("chaos:runs").items()}
        completed = sum(
            1
            for key in client.scan_iter("aioqueue:{chaos}:job:*", count=1000)
            if client.hget(key, "status") == b"complete"
        )
        dead = client.zcard("aioqueue:{chaos}:dead")
        lost = args.jobs - completed - dead
        twice = sum(1 for count in runs.values() if count > 1)
        server.kill()
    print(f"workers: {args.workers}, SIGKILLs: {kills}, lease: {args.lease}s, {elapsed:.1f}s")
    print(f"jobs enqueued:          {args.jobs}")
    print(f"jobs completed:         {completed}")
    print(f"jobs dead-lettered:     {dead}")
    print(f"jobs lost:              {lost}")
    print(f"jobs run more than once: {twice}")
    sys.exit(0 if lost == 0 else 1)


if __name__ == "__main__":
    main()
