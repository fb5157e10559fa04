"""A small ASGI app over the stored answer.

* ``GET /top``: the stored top repositories, or 503 until a poll has stored them;
* ``POST /refresh``: poll GitHub now (through the queue, so a worker must run) and return the
  poll's summary.

From the repository root: ``uvicorn examples.github_poll.app:app``.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

import msgspec
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aioqueue import JobFailed, Queue, ResultTimeout, Task
from examples.github_poll.tasks import PollSummary, TopStore, poll_github, queue

__all__ = ["app", "create_app"]


def create_app(
    queue: Queue, poll_github: Task[[], PollSummary], *, refresh_timeout: float = 30.0
) -> Starlette:
    """The app for the answers polls of ``poll_github`` on ``queue`` store.

    ``POST /refresh`` waits up to ``refresh_timeout`` seconds for the poll to finish.
    """
    endpoints = _Endpoints(queue, poll_github, refresh_timeout)
    return Starlette(
        routes=[
            Route("/top", endpoints.top, methods=["GET"]),
            Route("/refresh", endpoints.refresh, methods=["POST"]),
        ],
        lifespan=endpoints.lifespan,
    )


class _Endpoints:
    def __init__(
        self, queue: Queue, poll_github: Task[[], PollSummary], refresh_timeout: float
    ) -> None:
        self.queue = queue
        self.poll_github = poll_github
        self.refresh_timeout = refresh_timeout
        self._store: TopStore | None = None

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Open the queue and a Redis client for the app's lifetime."""
        async with self.queue:
            redis = aioredis.Redis.from_url(self.queue.settings.redis_url, decode_responses=True)
            self._store = TopStore(redis, self.queue.name)
            try:
                yield
            finally:
                self._store = None
                await redis.aclose()

    @property
    def store(self) -> TopStore:
        if self._store is None:
            raise RuntimeError("the app's lifespan has not started: serve it with an ASGI server")
        return self._store

    async def top(self, request: Request) -> Response:
        stored = await self.store.load()
        if stored is None:
            return _json(
                {
                    "error": "no data yet",
                    "detail": "GitHub has not been polled successfully yet: run the worker "
                    "(aioqueue run examples.github_poll.worker:worker) or POST /refresh",
                },
                status=503,
                headers={"Retry-After": "60"},
            )
        return _json(stored)

    async def refresh(self, request: Request) -> Response:
        paused = await self.store.paused_until()
        if paused is not None and paused > time.time():
            return _json(
                {
                    "error": "rate limited",
                    "detail": "GitHub's rate limit is exhausted; the next poll waits for its reset",
                    "retry_at": datetime.fromtimestamp(paused, tz=timezone.utc),
                },
                status=429,
                headers={"Retry-After": str(math.ceil(paused - time.time()))},
            )
        job = await self.poll_github.enqueue()
        try:
            summary = await job.result(timeout=self.refresh_timeout)
        except ResultTimeout:
            info = await job.info()
            return _json(
                {
                    "detail": "the poll has not finished yet (is a worker running?); "
                    "GET /top later",
                    "job_id": job.id,
                    "status": info.status,
                    "run_at": info.run_at,
                    "reason": info.reason,
                },
                status=202,
            )
        except JobFailed as exc:
            return _json(
                {
                    "error": "poll failed",
                    "detail": f"{exc.error_type}: {exc.remote_message}",
                    "job_id": job.id,
                },
                status=502,
            )
        return _json(summary)


def _json(body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response encoded by msgspec (Structs, datetimes and enums included)."""
    return Response(
        msgspec.json.encode(body),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


app = create_app(queue, poll_github)
