"""A cancelled call never hands its reply to the next caller on the same connection."""

from __future__ import annotations

import asyncio
import contextlib

from aioqueue import JobStatus, Queue


async def test_a_call_cancelled_mid_flight_does_not_leak_its_reply(queue: Queue) -> None:
    for i in range(30):
        target = await queue.enqueue("anything", i)
        cancelled = asyncio.create_task(queue.enqueue("anything", -i))
        await asyncio.sleep(0)
        cancelled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        # abort.lua answers with a status string; a stale enqueue reply would be a list.
        assert await target.abort() is JobStatus.QUEUED
