"""One worker consuming three queues (multi-high, multi-default, multi-low) in strict order,
for CLI tests. ``AIOQUEUE_REDIS_URL`` picks Redis (``AIOQUEUE_QUEUE`` would name all three
alike: leave it unset).
"""

from __future__ import annotations

from aioqueue import Context, Queue

high, default, low = (Queue(name=f"multi-{level}") for level in ("high", "default", "low"))

for queue in (high, default, low):

    @queue.task(name="work")
    async def work(ctx: Context, n: int) -> int:
        return n


worker = high.worker(concurrency=4, also=[default, low])
