"""aioqueue runner (installed editable from the repo root into its own venv)."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aioqueue import Context, Queue
from runners import _base

QUEUE = "bench"
TASKS: dict[str, Any] = {}


def _queue(url: str, result_ttl: int = 60) -> Queue:
    queue = Queue(url, name=QUEUE, result_ttl=result_ttl)

    @queue.task(name="noop")
    async def noop(ctx: Context) -> None:
        _base.hit()

    @queue.task(name="sleep")
    async def sleeper(ctx: Context) -> None:
        _base.started()
        await asyncio.sleep(0.01)
        _base.hit()

    @queue.task(name="lat")
    async def lat(ctx: Context, t0: float) -> None:
        _base.hit_latency(t0)

    @queue.task(name="gather")
    async def gather(ctx: Context, results: list[None]) -> None:
        _base.hit()

    @queue.task(name="step")
    async def step(ctx: Context, n: int) -> int:
        _base.hit()
        return n + 1

    TASKS.update(noop=noop, sleep=sleeper, lat=lat, gather=gather, step=step)
    if "rate_limit" in inspect.signature(queue.task).parameters:  # not in older baselines
        # A batch a worker fetches starts at one instant: the burst lets a whole batch in.
        @queue.task(name="limited", rate_limit="1000000/s", rate_burst=1000)
        async def limited(ctx: Context) -> None:
            """W10: a rate limit far above what one worker reaches, checked on every start."""
            _base.hit()

        TASKS["limited"] = limited
    return queue


class _Producer:
    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    async def one(self, kind: str, *args: Any) -> None:
        await TASKS[kind].enqueue(*args)

    async def many(self, kind: str, n: int) -> None:
        task = TASKS[kind]
        await self.queue.enqueue_many([task.prepare() for _ in range(n)])

    async def flow(self, workload: str, n: int) -> None:
        from aioqueue import group  # not in the baselines that predate workflows

        if workload == "W7":
            members = [TASKS["noop"].prepare() for _ in range(n - 1)]
            await group(members).then(TASKS["gather"]).enqueue()
        else:
            chain = TASKS["step"].prepare(0)
            for _ in range(n - 1):
                chain = chain.then(TASKS["step"])
            await chain.enqueue()


@asynccontextmanager
async def producer(url: str) -> AsyncIterator[_Producer]:
    queue = _queue(url)
    try:
        yield _Producer(queue)
    finally:
        await queue.close()


async def worker(url: str, concurrency: int, result_ttl: int, queues: int = 1) -> None:
    queue = _queue(url, result_ttl)
    if queues == 1:
        w = queue.worker(concurrency=concurrency)
        others: list[Queue] = []
    else:
        # W9: the jobs wait on the middle one of three queues, in strict order: every fetch
        # looks at an empty queue first, and blocks on all three when idle.
        others = [Queue(url, name=f"{QUEUE}-{n}", result_ttl=result_ttl) for n in range(2)]
        w = others[0].worker(concurrency=concurrency, also=[queue, others[1]])
    try:
        await w.run()
    finally:
        for q in (queue, *others):
            await q.close()


if __name__ == "__main__":
    _base.main(sys.modules[__name__])
