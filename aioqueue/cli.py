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
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar

import anyio
import typer
from rich.console import Console
from rich.table import Table

from aioqueue.brokers.base import CronRun
from aioqueue.errors import AioqueueError, ConfigurationError
from aioqueue.queue import Queue
from aioqueue.worker import Worker

T = TypeVar("T")

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


dlq = typer.Typer(help="Inspect and act on dead-lettered jobs.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")

TargetArg = Annotated[str, typer.Argument(help="module:attribute of a Queue, Worker or settings")]


def _with_queue(path: str, action: Callable[[Queue], Awaitable[T]]) -> T:
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
        raise _fail(exc) from None


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@dlq.command("list")
def dlq_list(
    target: TargetArg,
    limit: Annotated[int, typer.Option(help="Show at most this many")] = 50,
) -> None:
    """List dead-lettered jobs, most recent first."""
    jobs = _with_queue(target, lambda q: q.dead_letters(limit=limit))
    console = Console()
    if not jobs:
        console.print("no dead letters")
        return
    table = Table("id", "task", "died", "attempts", "reason", "error")
    for job in jobs:
        error = f"{job.error.type}: {job.error.message}" if job.error else ""
        table.add_row(
            job.id,
            job.task or "?",
            _when(job.finished_at),
            str(job.attempt),
            job.reason,
            error[:80],
        )
    console.print(table)


@dlq.command("show")
def dlq_show(target: TargetArg, job_id: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Show one dead-lettered job with its arguments and traceback."""
    job = _with_queue(target, lambda q: q.job(job_id).info())
    console = Console()
    console.print(f"[bold]{job.id}[/bold]  task={job.task}  status={job.status.value}")
    console.print(f"args={job.args!r} kwargs={job.kwargs!r}")
    console.print(f"attempt={job.attempt} deliveries={job.deliveries} reason={job.reason!r}")
    console.print(f"enqueued {_when(job.enqueued_at)}  finished {_when(job.finished_at)}")
    if job.error is not None:
        console.print(f"[red]{job.error.type}: {job.error.message}[/red]")
        if job.error.traceback:
            console.print(job.error.traceback, markup=False, highlight=False)


@dlq.command("requeue")
def dlq_requeue(
    target: TargetArg,
    job_ids: Annotated[list[str] | None, typer.Argument(help="Job ids (default: all)")] = None,
) -> None:
    """Run dead-lettered jobs again from their first attempt."""
    count = _with_queue(target, lambda q: q.requeue_dead(job_ids or None))
    typer.echo(f"requeued {count} job{'s' if count != 1 else ''}")


@dlq.command("purge")
def dlq_purge(
    target: TargetArg,
    job_ids: Annotated[list[str] | None, typer.Argument(help="Job ids (default: all)")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
) -> None:
    """Delete dead-lettered jobs for good."""
    what = f"{len(job_ids)} dead jobs" if job_ids else "ALL dead jobs"
    if not yes and not typer.confirm(f"Delete {what} of {target}?"):
        raise typer.Exit(code=1)
    count = _with_queue(target, lambda q: q.purge_dead(job_ids or None))
    typer.echo(f"purged {count} job{'s' if count != 1 else ''}")


cron_commands = typer.Typer(help="Inspect a worker's cron jobs.", no_args_is_help=True)
app.add_typer(cron_commands, name="cron")


@cron_commands.command("list")
def cron_list(
    target: Annotated[str, typer.Argument(help="module:attribute of a Worker or settings")],
    count: Annotated[int, typer.Option(help="How many next fire times to show")] = 3,
) -> None:
    """Show each cron job, its schedule, next fire times and the last run's outcome."""
    try:
        worker = load_worker(target)
    except AioqueueError as exc:
        raise _fail(exc) from None
    jobs = worker.cron_jobs
    console = Console()
    if not jobs:
        console.print("no cron jobs")
        return

    async def last_runs(queue: Queue) -> dict[str, CronRun]:
        broker = await queue.connected_broker()
        return await broker.cron_runs([job.name for job in jobs])

    runs = _with_queue(target, last_runs)
    now = datetime.now(timezone.utc)
    table = Table("name", "schedule", "next fire times", "last tick", "last run")
    for job in jobs:
        fires = ", ".join(_when(fire) for fire in job.fire_times(now, count))
        run = runs.get(job.name)
        if run is None or run.fire_ms is None:
            last_tick, outcome = "-", "never run"
        else:
            last_tick = _when(datetime.fromtimestamp(run.fire_ms / 1000, tz=timezone.utc))
            outcome = run.record.status if run.record else "expired"
        table.add_row(job.name, job.describe(), fires, last_tick, outcome)
    console.print(table)


def main() -> None:
    """Entry point of the ``aioqueue`` command."""
    app()
