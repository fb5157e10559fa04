"""What every ``aioqueue`` command needs: importing the user's object, running a coroutine
against a queue, reporting errors in one line, and showing data read from Redis as plain,
safe text."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar

import anyio
import redis.exceptions as rexc
import typer

from aioqueue.errors import AioqueueError, ConfigurationError
from aioqueue.queue import Queue
from aioqueue.settings import mask_credentials, mask_url
from aioqueue.task import Task
from aioqueue.worker import Worker

T = TypeVar("T")

TargetArg = Annotated[str, typer.Argument(help="module:attribute of a Queue, Worker or settings")]


def import_object(path: str) -> Any:
    """Import ``module:attribute`` (the current directory is on ``sys.path``, as with uvicorn)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"import path {path!r} must look like 'module:attribute'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attribute!r}"
            ) from None
    return target


def load_worker(path: str) -> Worker:
    """Turn ``module:attribute`` into a Worker.

    The attribute may be a :class:`Worker`, a :class:`Queue` (a worker with default settings),
    a zero-argument function returning either, or a settings class/object whose ``queue``
    attribute is the queue and whose other public attributes are ``queue.worker()`` keywords.
    """
    target = _called(path, import_object(path))
    if isinstance(target, Task):
        raise ConfigurationError(
            f"{path!r} is the task {target.name!r}, not a worker: give the worker that runs "
            "it (module:worker), its queue, or a settings class"
        )
    if isinstance(target, Worker):
        return target
    if isinstance(target, Queue):
        return target.worker()
    queue = getattr(target, "queue", None)
    if isinstance(queue, Queue):
        options = {
            name: value
            for name, value in vars(target).items()
            if not name.startswith("_") and name != "queue"
        }
        return queue.worker(**options)
    raise ConfigurationError(
        f"{path!r} is a {type(target).__name__}, not a Worker, a Queue or a settings class "
        "with a 'queue' attribute"
    )


def load_queue(path: str) -> Queue:
    """Turn ``module:attribute`` (a Queue, a Worker or a settings class) into its Queue (a
    worker's first one)."""
    return load_queues(path)[0]


def load_queues(path: str) -> list[Queue]:
    """Every queue ``module:attribute`` names: a Queue's one, a Worker's all."""
    target = _called(path, import_object(path))
    if isinstance(target, Worker):
        return list(target.queues)
    return [_queue_of(path, target)]


def _queue_of(path: str, target: Any) -> Queue:
    if isinstance(target, Queue):
        return target
    queue = getattr(target, "queue", None)
    if isinstance(queue, Queue):
        return queue
    raise ConfigurationError(f"{path!r} is a {type(target).__name__}, not a Queue or a Worker")


def _called(path: str, target: Any) -> Any:
    """``target``, or what it returns if it is a factory function (called without
    arguments)."""
    if not inspect.isfunction(target):
        return target
    if inspect.iscoroutinefunction(target):
        raise ConfigurationError(
            f"{path!r} is an async function: give a Worker, a Queue, a settings class or a "
            "plain function returning one"
        )
    try:
        inspect.signature(target).bind()
    except TypeError:
        raise ConfigurationError(
            f"{path!r} is a function that needs arguments: give a Worker, a Queue, a settings "
            "class or a function without arguments returning one"
        ) from None
    return target()


def fail(exc: BaseException | str) -> typer.Exit:
    """Print ``error: ...`` in one line on stderr and return the exit (status 2) to raise.

    Credentials in any URL the message quotes are masked, and control characters (newlines
    included) are escaped, since messages can quote data read from Redis."""
    typer.secho(f"error: {plain(mask_credentials(str(exc)))}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def redis_failure(exc: rexc.RedisError, url: str) -> typer.Exit:
    """The one-line error for a reply redis-py could not make sense of, or an error reply
    the broker did not expect (a server that is not Redis, or too old to know ``HELLO``;
    a database index the server does not have)."""
    detail = str(exc) or type(exc).__name__
    hint = ""
    if isinstance(exc, rexc.ResponseError) and "unknown command" in detail.lower():
        hint = " (aioqueue needs Redis >= 7.0)"
    elif isinstance(exc, (rexc.InvalidResponse, rexc.DataError)) or "protocol" in detail.lower():
        hint = " (is it a Redis server?)"
    return fail(f"the server at {mask_url(url)} answered unexpectedly: {detail}{hint}")


class _MaskingFormatter(logging.Formatter):
    """Masks credentials in every log line, whatever a message or traceback quotes."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_credentials(super().format(record))


def configure_logging(level: str) -> None:
    """One concise line per event on stderr, credentials masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def with_queue(path: str, action: Callable[[Queue], Awaitable[T]], *, reads: bool = False) -> T:
    """Load the queue, run ``action`` on it in an event loop, close it; errors in one line.

    With ``reads``, the action reads records, and one that does not parse (a hash field that
    is not a number, bytes that are not UTF-8) is reported in one line too."""
    queue = load_queue_or_fail(path)
    return with_queues(path, [queue], lambda queues: action(queues[0]), reads=reads)


def with_queues(
    path: str,
    queues: list[Queue],
    action: Callable[[list[Queue]], Awaitable[T]],
    *,
    reads: bool = False,
) -> T:
    """``with_queue`` for several queues (a worker's): all closed at the end."""
    queue = queues[0]

    async def go() -> T:
        try:
            return await action(queues)
        finally:
            for each in queues:
                await each.close()

    try:
        return anyio.run(go)
    except AioqueueError as exc:
        raise fail(exc) from None
    except rexc.RedisError as exc:
        raise redis_failure(exc, queue.settings.redis_url) from None
    except MALFORMED as exc:
        if not reads:
            raise
        raise malformed(exc) from None


def load_queue_or_fail(target: str) -> Queue:
    """The queue at ``target``, or a one-line error."""
    return load_queues_or_fail(target)[0]


def load_queues_or_fail(target: str) -> list[Queue]:
    """Every queue at ``target`` (a worker's all), or a one-line error."""
    try:
        return load_queues(target)
    except AioqueueError as exc:
        raise fail(exc) from None


MALFORMED = (ValueError, OverflowError)
"""What parsing a record that is not one of aioqueue's raises (a hash field that is not a
number, bytes that are not UTF-8)."""


def malformed(exc: BaseException) -> typer.Exit:
    """The one-line error for a record that does not parse."""
    return fail(f"cannot read what Redis returned for this queue ({type(exc).__name__}: {exc})")


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def when_ms(ms: int | None) -> str:
    """A Unix time in ms from Redis as local time; one out of range is shown, not raised."""
    if ms is None:
        return "-"
    try:
        return when(datetime.fromtimestamp(ms / 1000, tz=timezone.utc))
    except (ValueError, OverflowError, OSError):
        return f"<invalid time: {ms}>"


_CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL_INLINE = re.compile(f"[\n\t{_CONTROL}]")
_CONTROL_BLOCK = re.compile(f"[{_CONTROL}]")


def plain(text: str, *, multiline: bool = False) -> str:
    """``text`` (read from Redis) safe to print: control characters, which a terminal would
    obey (escape sequences, carriage returns, bidirectional overrides), are shown as
    ``\\xNN`` escapes; so are newlines and tabs unless ``multiline`` (a traceback)."""
    pattern = _CONTROL_BLOCK if multiline else _CONTROL_INLINE
    return pattern.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


def shown(value: Any) -> str:
    """``repr(value)`` for a value decoded from Redis, never raising."""
    try:
        return plain(repr(value))
    except RecursionError:
        return "<too deeply nested to show>"
    except Exception as exc:
        return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"


def undecodable(problem: str) -> str:
    return f"<undecodable: {plain(problem)}>"
