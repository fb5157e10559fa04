"""What happens to one job: decode it, run it under its timeout, decide how to settle it.

Kept apart from :mod:`aioqueue.worker`, which decides *when* jobs run; this module decides
*what* their outcome is. Nothing here talks to Redis: the outcome is a
:data:`~aioqueue.brokers.base.Settlement` the worker hands to the broker in a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures import Future as ThreadCall
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from typing import TYPE_CHECKING, Any

from aioqueue.brokers.base import Again, Delivery, Done, Finished, Settlement
from aioqueue.context import Context, ProgressSink
from aioqueue.errors import (
    Fail,
    InvalidArguments,
    JobTimeout,
    Retry,
    SerializationError,
)
from aioqueue.middleware import Middleware, run_through
from aioqueue.serialization import (
    BadSignature,
    ErrorInfo,
    Signer,
    decode_envelope,
    decode_result,
    encode,
)

if TYPE_CHECKING:
    from aioqueue.queue import Queue
    from aioqueue.task import Task

logger = logging.getLogger("aioqueue.jobs")

# Tracebacks are for humans; keep the tail, where the error is, if one is enormous.
MAX_TRACEBACK = 16_384


@dataclass(slots=True, eq=False)
class Running:
    """A job in flight on this worker."""

    delivery: Delivery
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[Any] | None = None
    timer: asyncio.TimerHandle | None = None
    cancel_reason: str | None = None
    """Why this worker cancelled the job: 'timeout', 'abort', 'shutdown' or 'lost'."""
    task_name: str = "?"
    source: int = 0
    """Which of the worker's queues the job came from (its index in ``worker.queues``)."""
    thread: ThreadCall[Any] | None = None
    """The call of a plain ``def`` task in the thread pool (None for async tasks)."""

    def cancel(self, reason: str) -> None:
        """Cancel the running task, remembering why (the first reason wins)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def when_thread_returns(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on this event loop once nothing of the run is left running: at
        once, unless a plain ``def`` task's thread outlived the run (a timeout, an abort),
        then when that thread returns. The worker frees the job's slot this way, so threads
        it gave up on still count against ``concurrency``."""
        thread = self.thread
        if thread is None or thread.done():
            callback()
            return
        loop = asyncio.get_running_loop()

        def returned(_: ThreadCall[Any]) -> None:
            # Runs in the pool's thread. A closed loop means the worker is gone already.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._thread_returned, callback)

        thread.add_done_callback(returned)

    def _thread_returned(self, callback: Callable[[], None]) -> None:
        logger.info(
            "job %s: the thread it left behind returned after %.1fs; its slot is free again",
            self.delivery.job_id,
            time.monotonic() - self.started,
            extra={"job_id": self.delivery.job_id, "task": self.task_name},
        )
        callback()


def error_info(exc: BaseException) -> bytes:
    """Encode an exception with its traceback for the job record."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(text) > MAX_TRACEBACK:
        text = "...\n" + text[-MAX_TRACEBACK:]
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return encode(ErrorInfo(name, str(exc), text))


def _dead(delivery: Delivery, kind: str, message: str, reason: str) -> Finished:
    return Finished(delivery, "dead", encode(ErrorInfo(kind, message)), reason)


async def execute(
    running: Running,
    queue: Queue,
    state: dict[str, Any],
    middleware: Sequence[Middleware] = (),
    signer: Signer | None = None,
    report: ProgressSink | None = None,
    threads: Executor | None = None,
) -> Settlement | None:
    """Run one delivered job and return how to settle it.

    Returns None when the worker itself cancelled the run for shutdown or because the lease
    was lost: the job is then handed back (or already belongs to another worker). A plain
    ``def`` task runs in ``threads`` (the worker's pool; a shared one when not given).
    """
    delivery = running.delivery
    try:
        opened = (signer or queue.signer).open(delivery.job_id, delivery.envelope)
        envelope = decode_envelope(opened)
    except BadSignature as exc:
        return _dead(delivery, "BadSignature", str(exc), "bad signature")
    except SerializationError as exc:
        return _dead(delivery, "SerializationError", str(exc), "undecodable job")
    running.task_name = envelope.task
    task = queue.tasks.get(envelope.task)
    if task is None:
        message = f"no task named {envelope.task!r} is registered on this worker"
        return _dead(delivery, "UnknownTask", message, "unknown task")
    args = envelope.args
    if (delivery.input is not None) != envelope.fed:
        # Only a job enqueued as a workflow step takes an input, and it always has one.
        message = "an input it does not take" if not envelope.fed else "no input"
        return _dead(delivery, "UnexpectedInput", f"the job was handed {message}", "bad input")
    if delivery.input is not None:
        # A workflow step: the result of the job it depends on is its first argument.
        try:
            args = (decode_result(delivery.input), *args)
        except SerializationError as exc:
            return _dead(delivery, "SerializationError", str(exc), "undecodable input")
    try:
        args, kwargs = task.signature.bind(args, envelope.kwargs)
    except InvalidArguments as exc:
        return _dead(delivery, "InvalidArguments", str(exc), "invalid arguments")
    ctx = Context(
        job_id=delivery.job_id,
        task_name=task.name,
        attempt=delivery.attempt,
        deliveries=delivery.deliveries,
        queue=queue,
        state=state,
        enqueued_at=datetime.fromtimestamp(envelope.enqueued_ms / 1000, tz=timezone.utc),
        fire_time=(
            None
            if envelope.fire_ms is None
            else datetime.fromtimestamp(envelope.fire_ms / 1000, tz=timezone.utc)
        ),
        trace=envelope.trace,
        report=report,
        delivery=delivery,
        running=running,
        loop=asyncio.get_running_loop() if task.sync else None,
    )
    timeout = envelope.timeout if envelope.timeout is not None else task.timeout
    if timeout is not None:
        running.timer = asyncio.get_running_loop().call_later(timeout, running.cancel, "timeout")
    retries = envelope.retries if envelope.retries is not None else task.retries
    try:
        if middleware:
            result = await run_through(
                middleware, ctx, lambda: _call(task, running, ctx, args, kwargs, threads)
            )
        elif task.sync:
            result = await _in_thread(task, running, ctx, args, kwargs, threads)
        else:
            result = await task.func(ctx, *args, **kwargs)
    except asyncio.CancelledError:
        reason = running.cancel_reason
        if reason is None:
            raise
        current = asyncio.current_task()
        if current is not None and hasattr(current, "uncancel"):
            current.uncancel()
        if reason == "timeout":
            return _failure(
                running, task, JobTimeout(_timeout_message(task.name, timeout)), retries
            )
        if reason == "abort":
            return Finished(delivery, "aborted", encode(ErrorInfo("JobAborted", "aborted")), "")
        return None
    except Retry as exc:
        return _failure(running, task, exc, retries)
    except Fail as exc:
        return Finished(delivery, "failed", error_info(exc), _fail_reason(exc))
    except Exception as exc:
        if task.non_retryable and isinstance(exc, task.non_retryable):
            return Finished(delivery, "failed", error_info(exc), "non-retryable error")
        return _failure(running, task, exc, retries)
    finally:
        if running.timer is not None:
            running.timer.cancel()
    if running.cancel_reason == "timeout":
        # The task swallowed the cancellation and returned anyway: still a timeout.
        return _failure(running, task, JobTimeout(_timeout_message(task.name, timeout)), retries)
    try:
        return Done(delivery, encode(result))
    except SerializationError as exc:
        return Finished(delivery, "failed", error_info(exc), "unencodable result")


def _call(
    task: Task[Any, Any],
    running: Running,
    ctx: Context,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    threads: Executor | None,
) -> Awaitable[Any]:
    """The task's run as one awaitable, for middleware to wrap."""
    if task.sync:
        return _in_thread(task, running, ctx, args, kwargs, threads)
    return task.func(ctx, *args, **kwargs)  # type: ignore[no-any-return]


async def _in_thread(
    task: Task[Any, Any],
    running: Running,
    ctx: Context,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    threads: Executor | None,
) -> Any:
    """Run a plain ``def`` task in the thread pool, with this task's contextvars.

    A thread cannot be stopped. When the run is cancelled (timeout, abort, shutdown, lost
    lease) before its thread started, the call is withdrawn; once started, the thread goes
    on, what it returns is ignored, and :meth:`Running.when_thread_returns` holds the slot.
    """
    context = contextvars.copy_context()
    thread = (threads or _shared_threads()).submit(context.run, task.func, ctx, *args, **kwargs)
    running.thread = thread
    try:
        result = await asyncio.wrap_future(thread)
    except asyncio.CancelledError:
        if thread.cancel() or thread.done():
            raise
        _warn_outlived(running)
        if running.cancel_reason == "shutdown":
            # Handed back only once the thread returned, so that no second copy starts
            # beside it; one that does not return within the wait stays, like an async task
            # that ignores its cancellation, until its lease expires.
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(thread)
        raise
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise Fail(
            f"task {task.name!r} is a plain def that returned {type(result).__name__}: "
            "define it with async def (a decorator around an async function needs an async "
            "def wrapper)"
        )
    return result


def _warn_outlived(running: Running) -> None:
    what = {
        "timeout": "ran past its timeout",
        "abort": "was aborted",
        "shutdown": "was cancelled for shutdown",
        "lost": "lost its lease",
    }.get(running.cancel_reason or "", "was cancelled")
    logger.warning(
        "job %s (%s) %s, but its thread cannot be stopped: what it returns is ignored, and "
        "it holds a worker slot until it returns",
        running.delivery.job_id,
        running.task_name,
        what,
        extra={"job_id": running.delivery.job_id, "task": running.task_name},
    )


@cache
def _shared_threads() -> ThreadPoolExecutor:
    """The pool of plain ``def`` tasks run outside a worker (``aioqueue.testing.drain``)."""
    return ThreadPoolExecutor(thread_name_prefix="aioqueue-sync")


async def run_directly(
    func: Callable[..., Any], ctx: Context, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Call a plain ``def`` task in a thread, without a queue (``await task(ctx, ...)``);
    ``ctx.run`` reaches this event loop."""
    if ctx.loop is None:
        ctx.loop = asyncio.get_running_loop()
    return await asyncio.to_thread(func, ctx, *args, **kwargs)


def _fail_reason(exc: Fail) -> str:
    """``Fail: <its message>`` (cut at 200 characters), or ``Fail raised``."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"Fail: {message[:200]}" if message else "Fail raised"


def _timeout_message(task: str, timeout: float | None) -> str:
    return f"task {task!r} ran longer than its timeout of {timeout:g}s"


def _failure(
    running: Running, task: Task[Any, Any], exc: BaseException, retries: int
) -> Settlement:
    delay = exc.delay if isinstance(exc, Retry) else None
    delivery = running.delivery
    if delivery.attempt > retries:
        plural = "s" if delivery.attempt > 1 else ""
        reason = f"retries exhausted after {delivery.attempt} attempt{plural}"
        return Finished(delivery, "dead", error_info(exc), reason)
    if delay is None:
        delay = task.backoff.delay(delivery.attempt)
    reason = exc.reason if isinstance(exc, Retry) and exc.reason else type(exc).__name__
    return Again(delivery, max(int(delay * 1000), 0), error_info(exc), reason)
