"""The ``aioqueue`` command line: ``aioqueue run app:worker`` and friends.

The CLI only wires things together: it imports the user's object, applies command-line
overrides and runs the worker. Everything it does is available from Python too.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated

import anyio
import redis.exceptions as rexc
import typer

from aioqueue import cli_inspect
from aioqueue.cli_support import (
    TargetArg,
    configure_logging,
    fail,
    load_queues_or_fail,
    load_worker,
    redis_failure,
    with_queues,
)
from aioqueue.errors import AioqueueError
from aioqueue.queue import Queue
from aioqueue.supervisor import Supervisor, worker_command
from aioqueue.worker import Worker

app = typer.Typer(
    name="aioqueue",
    help="An asyncio job queue on Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cli_inspect.dlq, name="dlq")
app.add_typer(cli_inspect.cron_commands, name="cron")
for command in (
    cli_inspect.info,
    cli_inspect.job,
    cli_inspect.check,
    cli_inspect.enqueue,
    cli_inspect.purge,
):
    app.command()(command)


@app.callback()
def _commands() -> None:
    """An asyncio job queue on Redis Streams."""


@app.command()
def pause(target: TargetArg) -> None:
    """Pause a queue (a worker's: every queue it consumes): workers start none of its jobs
    (running ones finish); enqueues and cron ticks still land and wait for `aioqueue
    resume`."""
    queues = load_queues_or_fail(target)
    was = with_queues(target, queues, lambda qs: _each(qs, paused=True))
    for queue, before in zip(queues, was, strict=True):
        typer.echo(f"queue {queue.name!r} {'was already paused' if before else 'paused'}")


@app.command()
def resume(target: TargetArg) -> None:
    """Resume a paused queue (a worker's: every queue it consumes): workers start its jobs
    again within a second."""
    queues = load_queues_or_fail(target)
    was = with_queues(target, queues, lambda qs: _each(qs, paused=False))
    for queue, before in zip(queues, was, strict=True):
        typer.echo(f"queue {queue.name!r} {'resumed' if before else 'was not paused'}")


async def _each(queues: list[Queue], *, paused: bool) -> list[bool]:
    return [await (q.pause() if paused else q.resume()) for q in queues]


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
        str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)")
    ] = None,
    processes: Annotated[
        int, typer.Option(min=1, help="Worker processes to run under a supervisor (one per core)")
    ] = 1,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus /metrics here (process i of N uses port + i)"),
    ] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="Address /metrics binds (default 127.0.0.1)")
    ] = None,
) -> None:
    """Run a worker until SIGTERM/SIGINT (or until the queue is empty with --burst)."""
    try:
        worker = load_worker(target)
        worker.configure(
            concurrency=concurrency,
            burst=burst,
            log_level=log_level,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
        )
    except AioqueueError as exc:
        raise fail(exc) from None
    configure_logging(worker.settings.log_level)
    if processes > 1:
        raise typer.Exit(code=_supervise(target, processes, worker, concurrency, burst))
    try:
        anyio.run(worker.run, backend_options={"use_uvloop": _has_uvloop()})
    except AioqueueError as exc:
        raise fail(exc) from None
    except rexc.RedisError as exc:
        raise redis_failure(exc, worker.settings.redis_url) from None


def _supervise(
    target: str, processes: int, worker: Worker, concurrency: int | None, burst: bool | None
) -> int:
    """Run ``processes`` children of this command, each with ``--processes 1``."""
    common = ["run", target, "--log-level", worker.settings.log_level]
    if concurrency is not None:
        common += ["--concurrency", str(concurrency)]
    if burst:
        common.append("--burst")
    common += ["--metrics-host", worker.settings.metrics_host]
    port = worker.settings.metrics_port
    slots = [
        [*common, *(["--metrics-port", str(port + i)] if port else [])] for i in range(processes)
    ]
    return Supervisor(worker_command(), processes, slots).run()


def _has_uvloop() -> bool:
    """uvloop is used when installed (``pip install aioqueue[uvloop]``)."""
    return importlib.util.find_spec("uvloop") is not None


def main() -> None:
    """Entry point of the ``aioqueue`` command."""
    app()
