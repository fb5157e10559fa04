"""Commands that look at and act on a queue: info, job, check, enqueue, purge, dlq, cron."""

from __future__ import annotations

import contextlib
import time
from datetime import datetime, timezone
from typing import Annotated, Any

import anyio
import msgspec
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aioqueue.brokers.base import CronRun
from aioqueue.cli_support import TargetArg, fail, load_queue, load_worker, when, with_queue
from aioqueue.errors import AioqueueError, InvalidArguments
from aioqueue.queue import Queue
from aioqueue.stats import QueueStats, uptime

dlq = typer.Typer(help="Inspect and act on dead-lettered jobs.", no_args_is_help=True)
cron_commands = typer.Typer(help="Inspect a worker's cron jobs.", no_args_is_help=True)


@dlq.command("list")
def dlq_list(
    target: TargetArg,
    limit: Annotated[int, typer.Option(help="Show at most this many")] = 50,
) -> None:
    """List dead-lettered jobs, most recent first."""
    jobs = with_queue(target, lambda q: q.dead_letters(limit=limit))
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
            when(job.finished_at),
            str(job.attempt),
            job.reason,
            error[:80],
        )
    console.print(table)


@dlq.command("show")
def dlq_show(target: TargetArg, job_id: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Show one dead-lettered job with its arguments and traceback."""
    job = with_queue(target, lambda q: q.job(job_id).info())
    console = Console()
    console.print(f"[bold]{job.id}[/bold]  task={job.task}  status={job.status.value}")
    console.print(f"args={job.args!r} kwargs={job.kwargs!r}")
    console.print(f"attempt={job.attempt} deliveries={job.deliveries} reason={job.reason!r}")
    console.print(f"enqueued {when(job.enqueued_at)}  finished {when(job.finished_at)}")
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
    count = with_queue(target, lambda q: q.requeue_dead(job_ids or None))
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
    count = with_queue(target, lambda q: q.purge_dead(job_ids or None))
    typer.echo(f"purged {count} job{'s' if count != 1 else ''}")


@cron_commands.command("list")
def cron_list(
    target: Annotated[str, typer.Argument(help="module:attribute of a Worker or settings")],
    count: Annotated[int, typer.Option(help="How many next fire times to show")] = 3,
) -> None:
    """Show each cron job, its schedule, next fire times and the last run's outcome."""
    try:
        worker = load_worker(target)
    except AioqueueError as exc:
        raise fail(exc) from None
    jobs = worker.cron_jobs
    console = Console()
    if not jobs:
        console.print("no cron jobs")
        return

    async def last_runs(queue: Queue) -> dict[str, CronRun]:
        broker = await queue.connected_broker()
        return await broker.cron_runs([job.name for job in jobs])

    runs = with_queue(target, last_runs)
    now = datetime.now(timezone.utc)
    table = Table("name", "schedule", "next fire times", "last tick", "last run")
    for job in jobs:
        fires = ", ".join(when(fire) for fire in job.fire_times(now, count))
        run = runs.get(job.name)
        if run is None or run.fire_ms is None:
            last_tick, outcome = "-", "never run"
        else:
            last_tick = when(datetime.fromtimestamp(run.fire_ms / 1000, tz=timezone.utc))
            outcome = run.record.status if run.record else "expired"
        table.add_row(job.name, job.describe(), fires, last_tick, outcome)
    console.print(table)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _stats_view(stats: QueueStats) -> Group:
    now = time.time()
    summary = Table("queue", "ready", "in flight", "delayed", "dead", "lag", "done/s", "failed/s")
    summary.add_row(
        stats.queue,
        str(stats.ready),
        str(stats.in_flight),
        str(stats.delayed),
        f"[red]{stats.dead}[/red]" if stats.dead else "0",
        _age(stats.lag_seconds),
        f"{stats.completed_per_second:.1f}",
        f"{stats.failed_per_second:.1f}",
    )
    workers = Table("worker", "host", "pid", "concurrency", "in flight", "uptime", "heartbeat")
    for worker in stats.workers:
        workers.add_row(
            worker.id,
            worker.host,
            str(worker.pid),
            str(worker.concurrency),
            str(worker.in_flight),
            _age(uptime(worker, now)),
            f"{_age(now - worker.last_heartbeat)} ago",
        )
    parts: list[Any] = [summary, workers if stats.workers else "[yellow]no live workers[/yellow]"]
    if stats.eviction_problem:
        parts.append(Text(stats.eviction_problem, style="bold red"))
    return Group(*parts)


def info(
    target: TargetArg,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts")] = False,
) -> None:
    """Show a queue's counts, lag, throughput and live workers."""
    if as_json:
        stats = with_queue(target, lambda q: q.stats())
        typer.echo(msgspec.json.encode(stats).decode())
        return
    console = Console()
    if not watch:
        console.print(_stats_view(with_queue(target, lambda q: q.stats())))
        return

    async def refresh(queue: Queue) -> None:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                live.update(_stats_view(await queue.stats()), refresh=True)
                await anyio.sleep(interval)

    with contextlib.suppress(KeyboardInterrupt):
        with_queue(target, refresh)


def job(
    target: TargetArg,
    job_id: Annotated[str, typer.Argument(help="Job id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts")] = False,
) -> None:
    """Show one job: status, attempts, timings, and its result or error."""
    details = with_queue(target, lambda q: q.job(job_id).info())
    if as_json:
        shape = msgspec.to_builtins(details)
        if details.error is not None:
            shape["error"] = {
                "type": details.error.type,
                "message": details.error.message,
                "traceback": details.error.traceback,
            }
        typer.echo(msgspec.json.encode(shape).decode())
        return
    console = Console()
    color = {"complete": "green", "dead": "red", "failed": "red"}.get(details.status.value, "cyan")
    console.print(f"[bold]{details.id}[/bold]  [{color}]{details.status.value}[/{color}]")
    console.print(f"task {details.task}  args={details.args!r} kwargs={details.kwargs!r}")
    console.print(f"attempt {details.attempt}  deliveries {details.deliveries}  {details.reason}")
    console.print(
        f"enqueued {when(details.enqueued_at)}  started {when(details.started_at)}  "
        f"finished {when(details.finished_at)}  run at {when(details.run_at)}"
    )
    if details.worker:
        console.print(f"worker {details.worker}")
    if details.status.value == "complete":
        console.print(f"result: {details.result!r}", markup=False, highlight=False)
    if details.error is not None:
        console.print(f"[red]{details.error.type}: {details.error.message}[/red]")
        if details.error.traceback:
            console.print(details.error.traceback, markup=False, highlight=False)


def check(
    target: TargetArg,
    min_workers: Annotated[int, typer.Option(help="Fail below this many live workers")] = 1,
    host: Annotated[
        str | None,
        typer.Option(help="Count only workers on this host (e.g. $HOSTNAME in a container)"),
    ] = None,
) -> None:
    """Exit 0 when at least --min-workers workers heartbeat on the queue, 1 otherwise
    (for container health checks)."""

    async def health(queue: Queue) -> tuple[QueueStats, bool]:
        return await queue.stats(), queue.settings.allow_eviction

    stats, eviction_allowed = with_queue(target, health)
    alive = len([w for w in stats.workers if host is None or w.host == host])
    if stats.eviction_problem and not eviction_allowed:
        typer.echo(f"unhealthy: {stats.eviction_problem}", err=True)
        raise typer.Exit(code=1)
    if alive < min_workers:
        typer.echo(f"unhealthy: {alive} live workers on queue {stats.queue!r}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"ok: {alive} live workers on queue {stats.queue!r}")


def enqueue(
    target: TargetArg,
    task: Annotated[str, typer.Argument(help="Task name")],
    args: Annotated[str, typer.Option("--args", help="JSON array of arguments")] = "[]",
    kwargs: Annotated[str, typer.Option("--kwargs", help="JSON object of arguments")] = "{}",
    delay: Annotated[float | None, typer.Option(help="Seconds before it may run")] = None,
    job_id: Annotated[str | None, typer.Option(help="Job id (idempotent)")] = None,
    wait: Annotated[
        float | None, typer.Option(help="Wait this many seconds for the result and print it")
    ] = None,
) -> None:
    """Enqueue a job from the shell and print its id (and its result with --wait)."""
    try:
        positional = msgspec.json.decode(args, type=list[Any])
        named = msgspec.json.decode(kwargs, type=dict[str, Any])
    except msgspec.DecodeError as exc:
        raise fail(InvalidArguments(f"--args/--kwargs must be JSON: {exc}")) from None

    async def go(queue: Queue) -> tuple[str, Any]:
        handle = await queue.options(job_id=job_id, delay=delay).enqueue(task, *positional, **named)
        return handle.id, (await handle.result(timeout=wait) if wait is not None else None)

    new_id, result = with_queue(target, go)
    typer.echo(new_id)
    if wait is not None:
        typer.echo(msgspec.json.encode(result).decode())


def purge(
    target: TargetArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
) -> None:
    """Delete every job and all state of a queue. Irreversible."""
    queue = load_queue_or_fail(target)
    if not yes and not typer.confirm(f"Delete every job of queue {queue.name!r}?"):
        raise typer.Exit(code=1)
    count = with_queue(target, lambda q: q.purge())
    typer.echo(f"purged queue {queue.name!r} ({count} keys)")


def load_queue_or_fail(target: str) -> Queue:
    """The queue at ``target``, or a one-line error."""
    try:
        return load_queue(target)
    except AioqueueError as exc:
        raise fail(exc) from None
