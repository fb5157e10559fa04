"""Middleware: code that wraps every job a worker runs.

A middleware is an async callable ``(ctx, call_next) -> result``: it may act before the task
runs, after it returns, or when it raises, and must return what ``call_next()`` returned (or
raise). Middleware given to ``queue.worker(middleware=[a, b])`` nest in order: ``a`` wraps
``b``, which wraps the task. Typical uses: tracing (the producer's trace context arrives in
``ctx.trace``), metrics, logging context, database sessions per job::

    async def timing(ctx: Context, call_next: CallNext) -> Any:
        started = time.perf_counter()
        try:
            return await call_next()
        finally:
            log.info("%s took %.3fs", ctx.task_name, time.perf_counter() - started)

Exceptions keep their meaning: ``Retry``, ``Fail`` and errors raised through a middleware
are handled by the worker exactly as if the task had raised them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aioqueue.context import Context

__all__ = ["CallNext", "Middleware", "run_through"]

CallNext = Callable[[], Awaitable[Any]]
"""Runs the rest of the chain (the next middleware, finally the task)."""

Middleware = Callable[[Context, CallNext], Awaitable[Any]]
"""``async def middleware(ctx, call_next) -> Any``."""


async def run_through(middleware: Sequence[Middleware], ctx: Context, call: CallNext) -> Any:
    """Run ``call`` inside every middleware, the first one outermost."""
    if not middleware:
        return await call()
    first, rest = middleware[0], middleware[1:]
    return await first(ctx, lambda: run_through(rest, ctx, call))
