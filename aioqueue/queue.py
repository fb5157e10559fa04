"""The queue: where tasks are registered and jobs are enqueued and looked up."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone, tzinfo
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Literal,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

from aioqueue.brokers.base import Broker, FlowNode, Keyed, NewJob, QueueCounts
from aioqueue.context import Context
from aioqueue.cron import CronJob, validate_unique_names
from aioqueue.cron import cron as cron_spec
from aioqueue.errors import ConfigurationError, PayloadTooLarge, UnknownTask
from aioqueue.job import EVENT_WAIT, Job, JobEvent, JobInfo, check_cursor
from aioqueue.limits import KeyFunction, TaskLimits
from aioqueue.partitions import partition_tags
from aioqueue.retry import Backoff
from aioqueue.serialization import Envelope, Signer, encode
from aioqueue.settings import Settings, resolve_settings, unknown_keywords
from aioqueue.stats import QueueStats, collect_stats
from aioqueue.task import JobOptions, JobRequest, Task, dependency_ids

if TYPE_CHECKING:
    from aioqueue.middleware import Middleware
    from aioqueue.serialization import MemberFailure
    from aioqueue.worker import Hook, Worker
    from aioqueue.workflow import Chain, Group, GroupJob

__all__ = ["Queue"]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_RETRIES = 3


def job_priority(options: JobOptions, task: Task[Any, Any] | None) -> int:
    """A job's priority: its own, else its task's (when this process knows the task)."""
    if options.priority is not None:
        return options.priority
    return 0 if task is None else task.priority


def job_limit_keys(request: JobRequest[Any], task: Task[Any, Any] | None) -> tuple[str, str] | None:
    """The keys of a job's limits, computed from its arguments (None: its task's name)."""
    if task is None or task.limits is None:
        return None
    return task.limits.keys(task.name, request.args, request.kwargs)


def new_job_id() -> str:
    """A random 96-bit job id (24 hex characters): unique without coordination, fork-safe,
    and shorter than a UUID, which keeps every key and stream entry small."""
    return os.urandom(12).hex()


class TaskDecorator(Protocol):
    """What ``@queue.task(...)`` returns: turns an async or a plain function into a typed
    Task (``Task[P, R]`` for ``async def f(ctx, ...) -> R`` and ``def f(ctx, ...) -> R``)."""

    @overload
    def __call__(self, func: Callable[Concatenate[Context, P], Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def __call__(self, func: Callable[Concatenate[Context, P], R], /) -> Task[P, R]: ...

    def __call__(self, func: Callable[..., Any], /) -> Task[Any, Any]:
        """Register ``func``."""
        ...


class AsyncTaskDecorator(Protocol):
    """What ``@queue.cron(...)`` returns: turns an async function into a typed Task."""

    def __call__(self, func: Callable[Concatenate[Context, P], Awaitable[R]], /) -> Task[P, R]:
        """Register ``func``."""
        ...


class Queue:
    """A named queue on Redis, its registered tasks, and the ways to enqueue them.

    ``Queue()`` connects lazily: creating one at import time opens nothing. Settings come from
    the arguments, overridden by ``AIOQUEUE_*`` environment variables (see
    :mod:`aioqueue.settings`). Use ``async with queue:`` or ``await queue.close()`` to release
    connections.

    ``trace_context``, if given, is called at every enqueue and its mapping (for example the
    W3C ``traceparent`` an OpenTelemetry propagator injects) travels in the job envelope to
    ``ctx.trace`` in the worker, where a middleware can continue the trace.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        name: str | None = None,
        max_size: int | None = None,
        max_payload_bytes: int | None = None,
        result_ttl: float | None = None,
        signing_key: str | None = None,
        wait_replicas: int | None = None,
        wait_replicas_timeout: float | None = None,
        partitions: int | None = None,
        broker: Broker | None = None,
        trace_context: Callable[[], Mapping[str, str] | None] | None = None,
        **unknown: NoReturn,
    ) -> None:
        # ``**unknown`` only turns a misspelt keyword into a ConfigurationError that lists
        # the right ones; typed as NoReturn, so mypy still rejects any keyword not above.
        if unknown:
            raise unknown_keywords("Queue()", unknown, Queue.__init__)
        self._code: dict[str, Any] = {
            "redis_url": url,
            "queue": name,
            "max_size": max_size,
            "max_payload_bytes": max_payload_bytes,
            "result_ttl": result_ttl,
            "signing_key": signing_key,
            "wait_replicas": wait_replicas,
            "wait_replicas_timeout": wait_replicas_timeout,
            "partitions": partitions,
        }
        self.settings: Settings = resolve_settings(self._code)
        self.name = self.settings.queue
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.cron_jobs: list[CronJob] = []
        self._broker = broker
        self._connected = False
        # The hash tag of the partition this queue object stands for (see sources()).
        self._tag: str | None = None
        self.trace_context = trace_context
        self.signer = Signer(self.settings.signing_key)

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"

    # -- connection ------------------------------------------------------------------------

    async def connected_broker(self) -> Broker:
        """The producer-side broker, connected on first use."""
        if self._broker is None:
            self._broker = self.new_broker()
        if not self._connected:
            await self._broker.connect()
            await self.check_partitions(self._broker)
            self._connected = True
        return self._broker

    async def check_partitions(self, broker: Broker) -> None:
        """Refuse to use a queue made with another number of partitions than this one's
        (``partitions``): jobs would go where no worker reads, or be read twice."""
        wanted = self.settings.partitions
        stored = await broker.claim_partitions(self.name, wanted)
        if stored != wanted:
            raise ConfigurationError(
                f"queue {self.name!r} has {stored} partition{'s' if stored > 1 else ''} in "
                f"Redis, and this process gives it {wanted}: give every producer and worker "
                f"partitions={stored}, or use a new queue name for {wanted} (changing the "
                "number of an existing queue is not supported)"
            )

    def sources(self) -> list[Queue]:
        """What a worker consumes for this queue: the queue itself, or, partitioned, one
        queue per partition (same name, tasks and settings; the first runs the cron jobs)."""
        partitions = self.settings.partitions
        if partitions == 1 or self._tag is not None:
            return [self]
        views = []
        for number, tag in enumerate(partition_tags(self.name, partitions)):
            view = copy.copy(self)
            view._tag = tag
            view._broker = None
            view._connected = False
            view.cron_jobs = self.cron_jobs if number == 0 else []
            views.append(view)
        return views

    def new_broker(self, settings: Settings | None = None) -> Broker:
        """A broker with its own connections to this queue's storage.

        Workers take one of their own, built from their own settings (``block``,
        ``max_connections``), so their fetch and settle round trips never queue behind a burst
        of producer calls (enqueues, result waits) in the same process.
        """
        settings = settings or self.settings
        if settings.partitions > 1 and self._tag is None:
            from aioqueue.brokers.partitioned import PartitionedBroker

            tags = partition_tags(self.name, settings.partitions)
            return PartitionedBroker(self.name, [self._broker_of(tag, settings) for tag in tags])
        return self._broker_of(self._tag or self.name, settings)

    def _broker_of(self, tag: str, settings: Settings) -> Broker:
        """A broker of the keys under hash tag ``tag`` (the queue's name, or a partition's)."""
        if settings.redis_url.startswith("memory://"):
            from aioqueue.brokers.memory import MemoryBroker

            return MemoryBroker(
                settings.redis_url,
                tag,
                result_ttl=settings.result_ttl,
                events_max_len=settings.events_max_len,
            )
        from aioqueue.brokers.redis import RedisBroker

        return RedisBroker(
            settings.redis_url,
            tag,
            result_ttl=settings.result_ttl,
            block=settings.block,
            max_connections=settings.max_connections,
            max_payload_bytes=settings.max_payload_bytes,
            events_max_len=settings.events_max_len,
            wait_replicas=settings.wait_replicas,
            wait_replicas_timeout=settings.wait_replicas_timeout,
        )

    async def close(self) -> None:
        """Close every connection; the queue reconnects if used again."""
        if self._broker is not None and self._connected:
            await self._broker.close()
        self._connected = False

    async def __aenter__(self) -> Queue:
        await self.connected_broker()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- tasks -----------------------------------------------------------------------------

    @overload
    def task(self, func: Callable[Concatenate[Context, P], Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def task(self, func: Callable[Concatenate[Context, P], R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        non_retryable: Sequence[type[BaseException]] = (),
        priority: int = 0,
        rate_limit: str | None = None,
        rate_burst: int = 1,
        rate_limit_key: KeyFunction | None = None,
        concurrency_limit: int | None = None,
        concurrency_key: KeyFunction | None = None,
    ) -> TaskDecorator: ...

    def task(
        self,
        func: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        non_retryable: Sequence[type[BaseException]] = (),
        priority: int = 0,
        rate_limit: str | None = None,
        rate_burst: int = 1,
        rate_limit_key: KeyFunction | None = None,
        concurrency_limit: int | None = None,
        concurrency_key: KeyFunction | None = None,
    ) -> Any:
        """Register a function as a task: ``@queue.task()`` or ``@queue.task``. An
        ``async def`` runs on the worker's event loop, a plain ``def`` in its thread pool
        (``sync_threads``).

        ``retries`` is how many times a failed run is retried (so ``retries + 1`` attempts);
        ``timeout`` (seconds) fails an attempt that runs longer; ``backoff`` spaces retries;
        exceptions in ``non_retryable`` (and :class:`~aioqueue.Fail`) end the job at once;
        ``priority`` (-9 to 9, higher first) is its jobs' default priority.

        Limits hold across every worker (docs/flow-control.md): ``rate_limit`` (``"5000/h"``,
        ``"20/s"``) spaces the starts of its jobs, ``rate_burst`` of them may start at once;
        ``concurrency_limit`` caps how many run at once. A job over a limit waits in the
        delayed set without using up an attempt. By default one limit covers all the
        task's jobs; ``rate_limit_key`` / ``concurrency_key`` (functions of a job's
        arguments, run when it is enqueued) give one limit per key, e.g. per API token;
        tasks whose keys are equal share the limit.
        """

        def register(fn: Callable[..., Any]) -> Task[Any, Any]:
            task_name = name or fn.__name__
            if task_name in self.tasks:
                raise ConfigurationError(
                    f"a task named {task_name!r} is already registered on queue {self.name!r}"
                )
            task: Task[Any, Any] = Task(
                self,
                fn,
                name=task_name,
                retries=retries,
                timeout=timeout,
                backoff=backoff or Backoff(),
                non_retryable=tuple(non_retryable),
                priority=priority,
                limits=TaskLimits.declare(
                    task_name,
                    rate_limit=rate_limit,
                    rate_burst=rate_burst,
                    rate_limit_key=rate_limit_key,
                    concurrency_limit=concurrency_limit,
                    concurrency_key=concurrency_key,
                ),
            )
            self.tasks[task_name] = task
            return task

        return register if func is None else register(func)

    def cron(
        self,
        schedule: str | timedelta,
        *,
        name: str | None = None,
        timezone: str | tzinfo = "UTC",
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        unique: bool = True,
        timeout: float | None = None,
        retries: int = 0,
        priority: int = 0,
        rate_limit: str | None = None,
        rate_burst: int = 1,
        concurrency_limit: int | None = None,
    ) -> AsyncTaskDecorator:
        """Register an async function as a task and run it on a schedule in every worker of
        this queue: ``@queue.cron("*/10 * * * *")`` or ``@queue.cron(timedelta(seconds=5))``.

        Each tick runs exactly once however many workers run (see :func:`aioqueue.cron`).
        ``priority``, ``rate_limit``, ``rate_burst`` and ``concurrency_limit`` are the task's,
        as in :meth:`task`: they hold for its cron runs and for runs enqueued by hand.
        """
        if callable(schedule):
            raise ConfigurationError(
                f"@queue.cron needs a schedule: write @queue.cron('*/10 * * * *') above "
                f"{getattr(schedule, '__name__', 'the function')}, not a bare @queue.cron"
            )

        def register(fn: Callable[Concatenate[Context, P], Awaitable[R]]) -> Task[P, R]:
            task: Task[P, R] = self.task(
                name=name or fn.__name__,
                retries=retries,
                priority=priority,
                rate_limit=rate_limit,
                rate_burst=rate_burst,
                concurrency_limit=concurrency_limit,
            )(fn)
            job = cron_spec(
                schedule,
                task,
                name=task.name,
                timezone=timezone,
                args=tuple(args),
                kwargs=kwargs,
                unique=unique,
                timeout=timeout,
                retries=retries,
            )
            validate_unique_names([*self.cron_jobs, job])
            self.cron_jobs.append(job)
            return task

        return register

    # -- enqueueing ------------------------------------------------------------------------

    async def enqueue(self, task: str, /, *args: Any, **kwargs: Any) -> Job[Any]:
        """Enqueue a task by name (for producers that do not import the task's code)."""
        (job,) = await self.enqueue_many([JobRequest(task, args, kwargs)])
        return job

    def options(
        self,
        *,
        job_id: str | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        retries: int | None = None,
        timeout: float | None = None,
        depends_on: Iterable[Job[Any] | GroupJob[Any] | str] = (),
        on_dependency_failure: Literal["fail", "run"] = "fail",
        priority: int | None = None,
        debounce: float | timedelta | None = None,
        throttle: float | timedelta | None = None,
        key: str | None = None,
    ) -> QueueOptions:
        """Per-job options for enqueue by name: ``queue.options(delay=5).enqueue("t", 1)``;
        see :class:`~aioqueue.JobOptions`."""
        options = JobOptions(
            job_id=job_id,
            delay=delay,
            at=at,
            retries=retries,
            timeout=timeout,
            depends_on=dependency_ids(depends_on, self),
            on_dependency_failure=on_dependency_failure,
            priority=priority,
            debounce=debounce,
            throttle=throttle,
            key=key,
        )
        return QueueOptions(self, options)

    async def enqueue_many(self, requests: Iterable[JobRequest[Any]]) -> list[Job[Any]]:
        """Enqueue many jobs in pipelined round trips (a few hundred jobs per script call).

        Jobs whose ``job_id`` already exists are not enqueued again; their existing handle is
        returned. Raises :class:`QueueFull` if the queue's ``max_size`` would be exceeded, and
        then writes none of the batch.

        A job with ``debounce`` or ``throttle`` is written after the others, each in a step of
        its own: its handle names the job that answers for its key (a throttled enqueue
        within the window gets the job holding the key), and a :class:`QueueFull` for it
        leaves the jobs before it written.
        """
        now_ms = int(time.time() * 1000)
        trace = self.trace_carrier()
        new_jobs: list[NewJob] = []
        keyed: list[tuple[int, NewJob, Keyed]] = []
        jobs: list[Job[Any]] = []
        tasks = self.tasks
        requests = list(requests)
        if any(request.options.depends_on for request in requests):
            from aioqueue.workflow import refuse_cycles

            refuse_cycles(
                {r.options.job_id: list(r.options.depends_on) for r in requests if r.options.job_id}
            )
        for request in requests:
            options = request.options
            flow = None
            if options.depends_on:
                flow = FlowNode(
                    policy="any" if options.on_dependency_failure == "run" else "fast",
                    pending=len(options.depends_on),
                    after=tuple((d, slot) for slot, d in enumerate(options.depends_on, 1)),
                )
            job_id = options.job_id or new_job_id()
            task = tasks.get(request.task)
            envelope = self._envelope(request, task, job_id, now_ms, trace)
            # The bulk path: most jobs have no window, priority or limit keys of their own.
            window = None if options.plain else options.keyed_window()
            if window is not None:
                key = Keyed(window[0], request.task, options.key or "", window[1])
                keyed.append((len(jobs), NewJob(job_id, envelope), key))
            elif options.plain and (task is None or task.plain):
                new_jobs.append(NewJob(job_id, envelope, flow=flow))
            else:
                at_ms, delay_ms = options.schedule_ms()
                priority = job_priority(options, task)
                keys = job_limit_keys(request, task)
                new_jobs.append(NewJob(job_id, envelope, at_ms, delay_ms, flow, priority, keys))
            jobs.append(Job(self, job_id, task.signature.return_type if task is not None else Any))
        if new_jobs:
            broker = await self.connected_broker()
            await broker.enqueue(new_jobs, self.settings.max_size)
        for index, new_job, key in keyed:
            broker = await self.connected_broker()
            answered_by = await broker.enqueue_keyed(new_job, key, self.settings.max_size)
            if answered_by != new_job.job_id:
                jobs[index] = self.job(answered_by, tasks.get(key.task))
        return jobs

    def new_job(
        self,
        request: JobRequest[Any],
        job_id: str,
        now_ms: int,
        trace: dict[str, str] | None,
        flow: FlowNode | None = None,
        *,
        fed: bool = False,
    ) -> NewJob:
        """A request as the broker writes it: arguments checked against the task (when this
        process knows it), envelope encoded and sealed, size checked. ``fed``: a workflow
        step whose first argument its dependency's result supplies (the signed envelope
        says so, so nobody can add an input to another job)."""
        if request.options.keyed_window() is not None:
            raise ConfigurationError(
                f"{request.task}: debounce and throttle apply to jobs enqueued on their own "
                "(task.options(...).enqueue), not to the steps of a group or a chain"
            )
        task = self.tasks.get(request.task)
        envelope = self._envelope(request, task, job_id, now_ms, trace, fed=fed)
        at_ms, delay_ms = request.options.schedule_ms()
        priority = job_priority(request.options, task)
        keys = job_limit_keys(request, task)
        return NewJob(job_id, envelope, at_ms, delay_ms, flow, priority, keys)

    def _envelope(
        self,
        request: JobRequest[Any],
        task: Task[Any, Any] | None,
        job_id: str,
        now_ms: int,
        trace: dict[str, str] | None,
        *,
        fed: bool = False,
    ) -> bytes:
        args, kwargs = request.args, request.kwargs
        if task is None:
            if self.tasks:
                raise UnknownTask(request.task, list(self.tasks))
        elif not request.checked:
            args, kwargs = task.signature.bind(args, kwargs)
        options = request.options
        envelope = encode(
            Envelope(
                request.task,
                args,
                kwargs,
                now_ms,
                options.retries,
                options.timeout,
                trace,
                fed=fed,
            )
        )
        envelope = self.signer.seal(job_id, envelope)
        limit = self.settings.max_payload_bytes
        if len(envelope) > limit:
            raise PayloadTooLarge(request.task, len(envelope), limit)
        return envelope

    @overload
    async def enqueue_flow(self, workflow: Group[R]) -> GroupJob[R]: ...

    @overload
    async def enqueue_flow(self, workflow: Chain[R]) -> Job[R]: ...

    async def enqueue_flow(self, workflow: Group[Any] | Chain[Any]) -> GroupJob[Any] | Job[Any]:
        """Enqueue a workflow (a :func:`~aioqueue.group` or a chain) on this queue, all of
        it or none: returns a :class:`~aioqueue.GroupJob` for a group, the last step's
        :class:`Job` for a chain. ``workflow.enqueue()`` does the same on the queue of its
        first task."""
        from aioqueue.workflow import Chain, Group, _Plan

        if not isinstance(workflow, Group | Chain):
            raise ConfigurationError(
                f"enqueue_flow takes a group or a chain, not {type(workflow).__name__}"
            )
        plan = _Plan(self, workflow)
        out = plan.add(workflow, None)
        await plan.write()
        if isinstance(workflow, Group):
            return plan.group_job(out)
        return self.job(out, plan.result_task(out))

    @overload
    async def get_group(self, group_id: str) -> GroupJob[Any]: ...

    @overload
    async def get_group(self, group_id: str, task: Task[Any, R]) -> GroupJob[R | MemberFailure]: ...

    async def get_group(self, group_id: str, task: Task[Any, Any] | None = None) -> GroupJob[Any]:
        """The handle of an enqueued group, from its id; pass the members' ``task`` to get
        typed results (a :class:`~aioqueue.MemberFailure` where a member did not complete,
        in a group made with ``on_failure="pass"``)."""
        from aioqueue.workflow import open_group

        return await open_group(self, group_id, task)

    async def events_cursor(self) -> str:
        """The cursor of the newest job event: ``queue.events(since=cursor)`` then sees
        every event after this call, even one that happens before the iteration starts."""
        return await (await self.connected_broker()).events_tail()

    def trace_carrier(self) -> dict[str, str] | None:
        """The tracing context to put into jobs enqueued now (see ``trace_context``)."""
        if self.trace_context is None:
            return None
        carrier = self.trace_context()
        return dict(carrier) if carrier else None

    # -- looking at jobs and the queue -----------------------------------------------------

    def job(self, job_id: str, task: Task[Any, R] | None = None) -> Job[R]:
        """A handle on the job with this id (it may or may not exist)."""
        result_type = task.signature.return_type if task is not None else Any
        return Job(self, job_id, result_type)

    async def events(self, since: str | None = None) -> AsyncIterator[JobEvent]:
        """Every job event of this queue as it happens (``async for event in
        queue.events()``), without polling: a blocking read of the queue's capped event
        stream.

        ``since`` resumes after an event's ``cursor`` (a consumer that reconnects passes the
        last one it handled, and sees every later event once, in order), or ``"0-0/*"``
        starts from the oldest event kept; None starts with the next event. The stream keeps
        ``events_max_len`` entries; a consumer that falls further behind misses the
        oldest."""
        broker = await self.connected_broker()
        cursor = check_cursor(since) if since is not None else await broker.events_tail()
        while True:
            for stored in await broker.events(cursor, 500, EVENT_WAIT):
                cursor = stored.cursor
                if stored.kind:  # an entry with nothing readable only moves the cursor
                    yield JobEvent.from_stored(stored)

    async def pause(self) -> bool:
        """Pause the queue: every worker stops starting its jobs within a second (jobs
        already running finish); enqueues, delays and cron ticks still land, and wait.
        Returns whether it was paused already. See docs/flow-control.md#pause-and-resume."""
        return await (await self.connected_broker()).pause(True)

    async def resume(self) -> bool:
        """Resume a paused queue; returns whether it was paused."""
        return await (await self.connected_broker()).pause(False)

    async def paused_since(self) -> datetime | None:
        """When the queue was paused (UTC), None while it runs."""
        ms = await (await self.connected_broker()).paused_since()
        return None if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc)

    async def counts(self) -> QueueCounts:
        """How many jobs are ready, pending (running), delayed and dead."""
        return await (await self.connected_broker()).counts()

    async def stats(self) -> QueueStats:
        """Counts, lag, throughput over the last minute and live workers of this queue."""
        partitions = self.settings.partitions
        tags = partition_tags(self.name, partitions) if partitions > 1 else ()
        return await collect_stats(self.name, await self.connected_broker(), tags)

    async def purge(self) -> int:
        """Delete every job and all state of this queue. Irreversible."""
        return await (await self.connected_broker()).purge_queue()

    # -- dead letters ----------------------------------------------------------------------

    async def dead_letters(self, limit: int = 50, offset: int = 0) -> list[JobInfo]:
        """Dead-lettered jobs, most recent first, with their error, traceback and reason."""
        broker = await self.connected_broker()
        return [JobInfo.from_record(record) for record in await broker.dead(offset, limit)]

    async def requeue_dead(self, job_ids: Sequence[str] | None = None) -> int:
        """Run dead jobs again from attempt 1 (all of them when ``job_ids`` is None)."""
        broker = await self.connected_broker()
        ids = list(job_ids) if job_ids is not None else await broker.dead_ids()
        return await broker.requeue_dead(ids)

    async def purge_dead(self, job_ids: Sequence[str] | None = None) -> int:
        """Delete dead jobs for good (all of them when ``job_ids`` is None)."""
        broker = await self.connected_broker()
        ids = list(job_ids) if job_ids is not None else await broker.dead_ids()
        return await broker.purge_dead(ids)

    # -- workers ---------------------------------------------------------------------------

    def worker(
        self,
        *,
        concurrency: int | None = None,
        lease: float | None = None,
        max_deliveries: int | None = None,
        shutdown_grace: float | None = None,
        burst: bool | None = None,
        on_startup: Sequence[Hook] = (),
        on_shutdown: Sequence[Hook] = (),
        cron_jobs: Sequence[CronJob] = (),
        middleware: Sequence[Middleware] = (),
        also: Sequence[Queue] = (),
        weights: Sequence[int] | None = None,
        **settings: Any,
    ) -> Worker:
        """A worker consuming this queue; ``await worker.run()`` or ``aioqueue run app:worker``.

        ``on_startup`` / ``on_shutdown`` are ``async def hook(state: dict)`` functions that put
        shared resources into (and take them out of) the ``state`` every task's
        :class:`Context` sees. ``cron_jobs`` (made with :func:`aioqueue.cron`) run on their
        schedule, together with those registered with :meth:`cron`. ``middleware`` wraps
        every job (see :mod:`aioqueue.middleware`). Other keyword arguments are
        :class:`Settings` fields.

        ``also`` lists more queues (of the same Redis) this worker consumes after this one,
        under one ``concurrency``: in strict order (a job of a later queue starts only while
        the earlier ones have none ready), or, with ``weights`` (one per queue, this one
        first), sharing the jobs it fetches in those proportions while every queue has work.
        One blocking read covers them all. See docs/flow-control.md.
        """
        from aioqueue.worker import Worker

        code = {
            **self._code,
            "concurrency": concurrency,
            "lease": lease,
            "max_deliveries": max_deliveries,
            "shutdown_grace": shutdown_grace,
            "burst": burst,
            **settings,
        }
        return Worker(
            self,
            code=code,
            on_startup=on_startup,
            on_shutdown=on_shutdown,
            cron_jobs=[*self.cron_jobs, *cron_jobs],
            middleware=middleware,
            also=also,
            weights=weights,
        )


class QueueOptions:
    """A queue bound to per-job options; made by :meth:`Queue.options`."""

    __slots__ = ("options", "queue")

    def __init__(self, queue: Queue, options: JobOptions) -> None:
        self.queue = queue
        self.options = options

    async def enqueue(self, task: str, /, *args: Any, **kwargs: Any) -> Job[Any]:
        """Enqueue a task by name with these options."""
        (job,) = await self.queue.enqueue_many([JobRequest(task, args, kwargs, self.options)])
        return job
