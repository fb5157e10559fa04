"""What every ``aioqueue`` command needs: importing the user's object, running a coroutine
against a queue, reporting errors in one line."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import anyio
import typer

from aioqueue.errors import AioqueueError, ConfigurationError
from aioqueue.queue import Queue
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
    target = import_object(path)
    if inspect.isfunction(target):
        target = target()
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
    """Turn ``module:attribute`` (a Queue, a Worker or a settings class) into its Queue."""
    target = import_object(path)
    if inspect.isfunction(target):
        target = target()
    if isinstance(target, Queue):
        return target
    if isinstance(target, Worker):
        return target.queue
    queue = getattr(target, "queue", None)
    if isinstance(queue, Queue):
        return queue
    raise ConfigurationError(f"{path!r} is a {type(target).__name__}, not a Queue or a Worker")


def fail(exc: AioqueueError) -> typer.Exit:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def configure_logging(level: str) -> None:
    """One concise line per event on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def with_queue(path: str, action: Callable[[Queue], Awaitable[T]]) -> T:
    """Load the queue, run ``action`` on it in an event loop, close it; errors in one line."""
    try:
        queue = load_queue(path)

        async def go() -> T:
            try:
                return await action(queue)
            finally:
                await queue.close()

        return anyio.run(go)
    except AioqueueError as exc:
        raise fail(exc) from None


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"
