"""The ``aioqueue`` command line: ``aioqueue run app:worker`` and friends.

The CLI only wires things together: it imports the user's object, applies command-line
overrides and runs the worker. Everything it does is available from Python too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys
from typing import Annotated, Any

import anyio
import typer

from aioqueue.errors import AioqueueError, ConfigurationError
from aioqueue.queue import Queue
from aioqueue.worker import Worker

app = typer.Typer(
    name="aioqueue",
    help="An asyncio job queue on Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _commands() -> None:
    """An asyncio job queue on Redis Streams."""


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


def _fail(exc: AioqueueError) -> typer.Exit:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def configure_logging(level: str) -> None:
    """One concise line per event on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def run(
    target: Annotated[str, typer.Argument(help="module:attribute of a Worker, Queue or settings")],
    concurrency: Annotated[
        int | None, typer.Option(help="Jobs run at the same time (default 100)")
    ] = None,
    burst: Annotated[
        bool | None, typer.Option("--burst", help="Exit once the queue is empty")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    ] = None,
) -> None:
    """Run a worker until SIGTERM/SIGINT (or until the queue is empty with --burst)."""
    try:
        worker = load_worker(target)
        worker.configure(concurrency=concurrency, burst=burst, log_level=log_level)
    except AioqueueError as exc:
        raise _fail(exc) from None
    configure_logging(worker.settings.log_level)
    try:
        anyio.run(worker.run, backend_options={"use_uvloop": _has_uvloop()})
    except AioqueueError as exc:
        raise _fail(exc) from None


def _has_uvloop() -> bool:
    """uvloop is used when installed (``pip install aioqueue[uvloop]``)."""
    return importlib.util.find_spec("uvloop") is not None


def main() -> None:
    """Entry point of the ``aioqueue`` command."""
    app()
