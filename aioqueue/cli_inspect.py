"""Commands that look at and act on a queue: info, job, check, enqueue, purge, dlq, cron.

Everything read from Redis (arguments, results, errors, reasons, task names, worker ids) is
data: it is printed as plain text (rich ``Text``, never markup), with control characters
escaped, and a record that does not decode is shown as ``<undecodable: ...>``, never raised.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any

import anyio
import msgspec
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aioqueue.brokers.base import CronRun, JobRecord
from aioqueue.cli_support import (
    MALFORMED,
    TargetArg,
    fail,
    load_queue_or_fail,
    load_queues_or_fail,
    load_worker,
    plain,
    shown,
    undecodable,
    when,
    when_ms,
    with_queue,
    with_queues,
)
from aioqueue.errors import AioqueueError, InvalidArguments, JobNotFound
from aioqueue.queue import Queue
from aioqueue.serialization import ErrorInfo, Signer, decode, decode_envelope, decode_error
from aioqueue.stats import QueueStats, uptime

dlq = typer.Typer(help="Inspect and act on dead-lettered jobs.", no_args_is_help=True)
cron_commands = typer.Typer(help="Inspect a worker's cron jobs.", no_args_is_help=True)


@dlq.command("list")
def dlq_list(
    target: TargetArg,
    limit: Annotated[int, typer.Option(help="Show at most this many")] = 50,
) -> None:
    """List dead-lettered jobs, most recent first."""
    rows = with_queue(target, lambda q: _dead_records(q, limit), reads=True)
    console = _console()
    if not rows:
        console.print("no dead letters")
        return
    table = Table("id", "task", "died", "attempts", "reason", "error")
    for job_id, record in rows:
        if not isinstance(record, JobRecord):
            problem = f"<unreadable record: {type(record).__name__}: {record}>"
            table.add_row(Text(plain(job_id)), Text(plain(problem)), "-", "-", "", "")
            continue
        view = JobView.of(record)
        error = f"{view.error.type}: {view.error.message}" if view.error else ""
        table.add_row(
            Text(plain(job_id)),
            Text(view.task_text),
            when_ms(record.finished_ms),
            Text(plain(str(record.attempt))),
            Text(plain(record.reason)),
            Text(plain(error[:80])),
        )
    console.print(table)


async def _dead_records(queue: Queue, limit: int) -> list[tuple[str, JobRecord | Exception]]:
    """The latest ``limit`` dead jobs; if one of them does not parse, each is read on its
    own so that the others are still listed (with the broken one said to be unreadable)."""
    broker = await queue.connected_broker()
    try:
        return [(record.job_id, record) for record in await broker.dead(0, limit)]
    except MALFORMED:
        pass
    rows: list[tuple[str, JobRecord | Exception]] = []
    for job_id in list(reversed(await broker.dead_ids()))[: max(limit, 0)]:
        try:
            record = await broker.record(job_id)
        except MALFORMED as exc:
            rows.append((job_id, exc))
            continue
        if record is not None:
            rows.append((job_id, record))
    return rows


@dlq.command("show")
def dlq_show(target: TargetArg, job_id: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Show one dead-lettered job with its arguments and traceback."""
    view = JobView.of(with_queue(target, lambda q: _record(q, job_id), reads=True))
    console = _console()
    console.print(
        Text.assemble((plain(view.record.job_id), "bold"), f"  task={view.task_text}  status=")
        + Text(plain(view.record.status))
    )
    console.print(Text(f"args={view.args_text} kwargs={view.kwargs_text}"))
    console.print(
        Text(
            f"attempt={view.record.attempt} deliveries={view.record.deliveries} "
            f"reason={shown(view.record.reason)}"
        )
    )
    enqueued, finished = when_ms(view.record.enqueued_ms), when_ms(view.record.finished_ms)
    console.print(Text(f"enqueued {enqueued}  finished {finished}"))
    view.print_error(console)


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
    console = _console()
    if not jobs:
        console.print("no cron jobs")
        return

    async def last_runs(queue: Queue) -> dict[str, CronRun | Exception]:
        broker = await queue.connected_broker()
        try:
            return dict(await broker.cron_runs([job.name for job in jobs]))
        except MALFORMED:
            pass
        runs: dict[str, CronRun | Exception] = {}
        for job in jobs:  # one unreadable run record must not hide the others
            try:
                runs.update(await broker.cron_runs([job.name]))
            except MALFORMED as exc:
                runs[job.name] = exc
        return runs

    runs = with_queue(target, last_runs, reads=True)
    now = datetime.now(timezone.utc)
    table = Table("name", "schedule", "next fire times", "last tick", "last run")
    for job in jobs:
        fires = ", ".join(when(fire) for fire in job.fire_times(now, count))
        run = runs.get(job.name)
        if isinstance(run, Exception):
            last_tick, outcome = "?", f"<unreadable record: {type(run).__name__}: {run}>"
        elif run is None or run.fire_ms is None:
            last_tick, outcome = "-", "never run"
        else:
            last_tick = when_ms(run.fire_ms)
            outcome = run.record.status if run.record else "expired"
        table.add_row(
            Text(plain(job.name)),
            Text(plain(job.describe())),
            fires,
            last_tick,
            Text(plain(outcome)),
        )
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
        Text(plain(stats.queue)),
        str(stats.ready),
        str(stats.in_flight),
        str(stats.delayed),
        Text(str(stats.dead), style="red") if stats.dead else "0",
        _age(stats.lag_seconds),
        f"{stats.completed_per_second:.1f}",
        f"{stats.failed_per_second:.1f}",
    )
    workers = Table("worker", "host", "pid", "concurrency", "in flight", "uptime", "heartbeat")
    for worker in stats.workers:
        workers.add_row(
            Text(plain(worker.id)),
            Text(plain(worker.host)),
            str(worker.pid),
            str(worker.concurrency),
            str(worker.in_flight),
            _age(uptime(worker, now)),
            f"{_age(now - worker.last_heartbeat)} ago",
        )
    parts: list[Any] = [
        summary,
        _capacity_view(stats),
        workers if stats.workers else "[yellow]no live workers[/yellow]",
    ]
    if stats.partitions:
        parts.append(
            Text(
                f"{len(stats.partitions)} partitions, keys under "
                + ", ".join("{" + plain(tag) + "}" for tag in stats.partitions)
            )
        )
    if stats.paused_at is not None:
        since = _age(max(now - stats.paused_at, 0))
        parts.append(
            Text(f"paused {since} ago: no worker starts its jobs (aioqueue resume)", style="yellow")
        )
    if stats.lag_growing:
        parts.append(Text(_growing(stats), style="yellow"))
    if stats.eviction_problem:
        parts.append(Text(plain(stats.eviction_problem), style="bold red"))
    return Group(*parts)


def _rate(per_second: float | None) -> str:
    return "-" if per_second is None else f"{per_second:.1f}"


def _capacity_view(stats: QueueStats) -> Table:
    """Arrivals against settlements, and the workers that keep up (docs/monitoring.md)."""
    capacity = Table("arrived/s", "settled/s", "mean job", "utilisation", "workers needed")
    needed = "-" if stats.workers_needed is None else str(stats.workers_needed)
    capacity.add_row(
        _rate(stats.arrived_per_second),
        _rate(stats.settled_per_second),
        _age(stats.mean_job_seconds),
        "-" if stats.utilisation is None else f"{stats.utilisation:.0%}",
        f"{needed} ({len(stats.workers)} live)",
    )
    return capacity


def _growing(stats: QueueStats) -> str:
    line = (
        f"lag growing: jobs arrive at {_rate(stats.arrived_per_second)}/s and are settled at "
        f"{_rate(stats.settled_per_second)}/s"
    )
    if stats.workers_needed is None:
        return line
    return f"{line}; {stats.workers_needed} workers would keep up ({len(stats.workers)} live)"


def info(
    target: TargetArg,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts")] = False,
) -> None:
    """Show a queue's counts, lag, throughput, the workers it needs and live workers (for a
    worker on several queues: each of them; --json then prints a list)."""
    queues = load_queues_or_fail(target)

    async def read(qs: list[Queue]) -> list[QueueStats]:
        return [await q.stats() for q in qs]

    if as_json:
        stats = with_queues(target, queues, read, reads=True)
        typer.echo(msgspec.json.encode(stats if len(stats) > 1 else stats[0]).decode())
        return
    console = _console()
    if not watch:
        console.print(Group(*map(_stats_view, with_queues(target, queues, read, reads=True))))
        return

    async def refresh(qs: list[Queue]) -> None:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                live.update(Group(*map(_stats_view, await read(qs))), refresh=True)
                await anyio.sleep(interval)

    with contextlib.suppress(KeyboardInterrupt):
        with_queues(target, queues, refresh, reads=True)


def job(
    target: TargetArg,
    job_id: Annotated[str, typer.Argument(help="Job id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts")] = False,
) -> None:
    """Show one job: status, attempts, timings, and its result or error."""
    view = JobView.of(with_queue(target, lambda q: _record(q, job_id), reads=True))
    record = view.record
    if as_json:
        typer.echo(msgspec.json.encode(view.as_json()).decode())
        return
    console = _console()
    color = {"complete": "green", "dead": "red", "failed": "red"}.get(record.status, "cyan")
    console.print(
        Text.assemble((plain(record.job_id), "bold"), "  ", (plain(record.status), color))
    )
    console.print(Text(f"task {view.task_text}  args={view.args_text} kwargs={view.kwargs_text}"))
    console.print(
        Text(f"attempt {record.attempt}  deliveries {record.deliveries}  {plain(record.reason)}")
    )
    final = record.status in ("complete", "failed", "dead", "aborted")
    run_at = "" if final else f"  run at {when_ms(record.run_at_ms)}"
    console.print(
        f"enqueued {when_ms(record.enqueued_ms)}  started {when_ms(record.started_ms)}  "
        f"finished {when_ms(record.finished_ms)}{run_at}",
        markup=False,
    )
    if record.replaced_by:
        console.print(Text(f"replaced by {plain(record.replaced_by)} (debounce)"))
    if record.worker:
        console.print(Text(f"worker {plain(record.worker)}"))
    if record.progress is not None:
        console.print(
            Text(
                f"progress {record.progress:.0%}  {plain(record.progress_message)}  "
                f"(at {when_ms(record.progress_ms)})"
            )
        )
    if record.status == "complete" or "result" in view.problems:
        console.print(Text(f"result: {view.result_text}"))
    view.print_error(console)


async def _record(queue: Queue, job_id: str) -> JobRecord:
    record = await (await queue.connected_broker()).record(job_id)
    if record is None:
        raise JobNotFound(job_id)
    return record


@dataclass
class JobView:
    """A job record decoded part by part for display: a part that does not decode (bad
    msgpack, nesting too deep, a value the JSON encoder refuses) is kept in ``problems`` and
    shown as ``<undecodable: ...>``, so one strange job never stops a command."""

    record: JobRecord
    task: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: ErrorInfo | None = None
    problems: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, record: JobRecord) -> JobView:
        view = cls(record)
        if record.envelope:
            try:
                envelope = decode_envelope(Signer().open(record.job_id, record.envelope))
            except Exception as exc:
                view.problems["envelope"] = str(exc)
            else:
                view.task, view.args, view.kwargs = envelope.task, envelope.args, envelope.kwargs
        if record.result is not None:
            try:
                view.result = decode(record.result)
            except Exception as exc:
                view.problems["result"] = str(exc)
        if record.error:
            view.error = decode_error(record.error)
        return view

    @property
    def task_text(self) -> str:
        if "envelope" in self.problems:
            return undecodable(self.problems["envelope"])
        return plain(self.task) if self.task is not None else "?"

    @property
    def args_text(self) -> str:
        return "?" if "envelope" in self.problems else shown(self.args)

    @property
    def kwargs_text(self) -> str:
        return "?" if "envelope" in self.problems else shown(self.kwargs)

    @property
    def result_text(self) -> str:
        return (
            undecodable(self.problems["result"])
            if "result" in self.problems
            else shown(self.result)
        )

    def print_error(self, console: Console) -> None:
        if self.error is None:
            return
        console.print(Text(plain(f"{self.error.type}: {self.error.message}"), style="red"))
        if self.error.traceback:
            console.print(Text(plain(self.error.traceback, multiline=True)))

    def as_json(self) -> dict[str, Any]:
        """The record as ``aioqueue job --json`` prints it (the shape of :class:`JobInfo`);
        parts that cannot be shown are null, with the reason under ``undecodable``."""
        record, problems = self.record, dict(self.problems)
        bad_envelope = "envelope" in problems
        shape: dict[str, Any] = {
            "id": record.job_id,
            "status": record.status,
            "task": self.task,
            "args": None if bad_envelope else self._jsonable("args", list(self.args), problems),
            "kwargs": None if bad_envelope else self._jsonable("kwargs", self.kwargs, problems),
            "attempt": record.attempt,
            "deliveries": record.deliveries,
        }
        for name, ms in (
            ("enqueued_at", record.enqueued_ms),
            ("started_at", record.started_ms),
            ("finished_at", record.finished_ms),
            ("run_at", record.run_at_ms),
        ):
            shape[name] = _iso(name, ms, problems)
        shape["result"] = self._jsonable("result", self.result, problems)
        shape["error"] = (
            None
            if self.error is None
            else {
                "type": self.error.type,
                "message": self.error.message,
                "traceback": self.error.traceback,
            }
        )
        shape["reason"] = record.reason
        shape["replaced_by"] = record.replaced_by
        shape["worker"] = record.worker
        shape["progress"] = (
            None
            if record.progress is None
            else {
                "fraction": record.progress,
                "message": record.progress_message,
                "at": _iso("progress_at", record.progress_ms, problems),
            }
        )
        if problems:
            shape["undecodable"] = problems
        return shape

    @staticmethod
    def _jsonable(name: str, value: Any, problems: dict[str, str]) -> Any:
        if name in problems:
            return None
        try:
            msgspec.json.encode(value)
        except Exception as exc:
            problems[name] = f"not representable as JSON: {exc}"
            return None
        return value


def _iso(name: str, ms: int | None, problems: dict[str, str]) -> str | None:
    if ms is None:
        return None
    try:
        return str(msgspec.to_builtins(datetime.fromtimestamp(ms / 1000, tz=timezone.utc)))
    except (ValueError, OverflowError, OSError):
        problems[name] = f"invalid time: {ms}"
        return None


def _console() -> Console:
    """A console for data: no automatic highlighting of numbers and strings in it."""
    return Console(highlight=False)


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

    stats, eviction_allowed = with_queue(target, health, reads=True)
    alive = len([w for w in stats.workers if host is None or w.host == host])
    if stats.eviction_problem and not eviction_allowed:
        typer.echo(f"unhealthy: {plain(stats.eviction_problem)}", err=True)
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
    priority: Annotated[
        int | None, typer.Option(help="-9 to 9, higher first (default: the task's)")
    ] = None,
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
        options = queue.options(job_id=job_id, delay=delay, priority=priority)
        handle = await options.enqueue(task, *positional, **named)
        return handle.id, (await handle.result(timeout=wait) if wait is not None else None)

    new_id, result = with_queue(target, go)
    typer.echo(new_id)
    if wait is not None:
        try:
            typer.echo(msgspec.json.encode(result).decode())
        except Exception as exc:
            raise fail(
                f"the result is not representable as JSON ({exc}): {shown(result)}"
            ) from None


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
