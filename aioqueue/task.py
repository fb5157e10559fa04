"""A task: a function registered on a queue, and the typed ways to enqueue it."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    TypeVar,
    overload,
)

from aioqueue.errors import ConfigurationError
from aioqueue.limits import TaskLimits
from aioqueue.retry import Backoff
from aioqueue.serialization import MAX_RETRIES, MAX_TIMEOUT, TASK_NAME, Signature

if TYPE_CHECKING:
    from aioqueue.context import Context
    from aioqueue.job import Job
    from aioqueue.queue import Queue
    from aioqueue.workflow import Chain, Group, GroupJob, Partial

__all__ = ["JobOptions", "JobRequest", "Task", "TaskOptions"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R2 = TypeVar("R2")
A = TypeVar("A")


@dataclass(frozen=True, slots=True, kw_only=True)
class JobOptions:
    """Per-job options, kept apart from the task's arguments so they can never collide.

    ``job_id`` makes enqueue idempotent: while a job with that id exists, enqueueing it again
    returns the existing job. ``delay`` (seconds or timedelta) or ``at`` (an aware datetime)
    schedule it for later. ``retries`` and ``timeout`` override the task's own.

    ``depends_on`` (jobs or job ids) holds the job, status ``waiting``, until each of them
    has ended; nothing polls: the last one to end releases it in the same step. When one
    of them does not complete (failed, dead, aborted, or no such job),
    ``on_dependency_failure="fail"`` fails this job at once with that reason, ``"run"``
    runs it anyway.

    ``debounce`` (seconds or timedelta) with a ``key``: of the jobs of this task enqueued
    for the key while the previous one still waits, only the last runs, that long after it
    was enqueued; the others end aborted (reason ``debounced``) and their handles'
    ``result()`` gives the last one's result. ``throttle`` with a ``key``: at most one job
    of this task per window per key; an enqueue within the window writes nothing and
    returns the handle of the job that holds the key (docs/flow-control.md).
    """

    job_id: str | None = None
    delay: float | timedelta | None = None
    at: datetime | None = None
    retries: int | None = None
    timeout: float | None = None
    depends_on: tuple[str, ...] = ()
    on_dependency_failure: Literal["fail", "run"] = "fail"
    priority: int | None = None
    """Higher runs first, from -9 to 9 (None: the task's own, by default 0); see
    docs/flow-control.md#priorities."""
    debounce: float | timedelta | None = None
    throttle: float | timedelta | None = None
    key: str | None = None
    plain: bool = field(init=False, repr=False, compare=False)
    """No schedule, priority or window of its own (the bulk enqueue path)."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "plain",
            self.delay is None
            and self.at is None
            and self.priority is None
            and self.debounce is None
            and self.throttle is None,
        )
        if self.on_dependency_failure not in ("fail", "run"):
            raise ConfigurationError('on_dependency_failure must be "fail" or "run"')
        for dependency in self.depends_on:
            if not isinstance(dependency, str) or not re.fullmatch(TASK_NAME, dependency):
                raise ConfigurationError(f"depends_on: {dependency!r} is no job id")
        if self.job_id is not None and self.job_id in self.depends_on:
            raise ConfigurationError(f"job {self.job_id!r} cannot depend on itself")
        if self.delay is not None and self.at is not None:
            raise ConfigurationError("give either delay or at, not both")
        if self.at is not None and self.at.tzinfo is None:
            raise ConfigurationError("at must be a timezone-aware datetime")
        check_limits("", self.retries, self.timeout)
        if self.priority is not None:
            check_priority("priority", self.priority)
        if self.job_id is not None and not re.fullmatch(TASK_NAME, self.job_id):
            raise ConfigurationError(
                "job_id: 1 to 200 characters, no control characters (workers refuse others)"
            )
        self._check_keyed()

    def _check_keyed(self) -> None:
        """Refuse a debounce or throttle without a valid key and window, or with options
        that would decide differently which job runs and when."""
        windows = (("debounce", self.debounce), ("throttle", self.throttle))
        modes = [(name, window) for name, window in windows if window is not None]
        if not modes:
            if self.key is not None:
                raise ConfigurationError(
                    "key names a debounce or throttle key: give debounce= or throttle= with it"
                )
            return
        if len(modes) > 1:
            raise ConfigurationError("give either debounce or throttle, not both")
        mode, window = modes[0]
        _window_seconds(mode, window)
        if self.key is None:
            raise ConfigurationError(
                f"{mode} needs a key naming what it applies to: task.options({mode}=5, "
                'key="user:1")'
            )
        if not isinstance(self.key, str) or not re.fullmatch(TASK_NAME, self.key):
            raise ConfigurationError("key: 1 to 200 characters, no control characters")
        clashing = [
            name
            for name, value in (
                ("job_id", self.job_id),
                ("delay", self.delay),
                ("at", self.at),
                ("depends_on", self.depends_on or None),
            )
            if value is not None
        ]
        if clashing:
            raise ConfigurationError(
                f"{mode} cannot be combined with {' or '.join(clashing)}: the key decides "
                "which job runs and when"
            )

    def keyed_window(self) -> tuple[str, int] | None:
        """(``debounce`` or ``throttle``, its window in ms), or None without either."""
        for mode, window in (("debounce", self.debounce), ("throttle", self.throttle)):
            if window is not None:
                return mode, max(int(_window_seconds(mode, window) * 1000), 1)
        return None

    def schedule_ms(self) -> tuple[int, int]:
        """When the job may run: (``at`` in Unix ms, 0 = now; ``delay`` in ms). A delay is
        counted from when the broker writes the job, on the broker's clock, so a producer
        whose clock is off cannot stretch or shrink it."""
        if self.at is not None:
            return int(self.at.timestamp() * 1000), 0
        if self.delay is None:
            return 0, 0
        seconds = self.delay.total_seconds() if isinstance(self.delay, timedelta) else self.delay
        return 0, max(int(seconds * 1000), 0)


MAX_WINDOW = 366 * 86_400.0
"""The longest debounce or throttle window, in seconds (a year)."""


def _window_seconds(name: str, window: object) -> float:
    """A debounce or throttle window in seconds, or ConfigurationError."""
    if isinstance(window, timedelta):
        seconds = window.total_seconds()
    elif isinstance(window, int | float) and not isinstance(window, bool):
        seconds = float(window)
    else:
        raise ConfigurationError(f"{name} takes seconds or a timedelta, not {window!r}")
    if not 0.001 <= seconds <= MAX_WINDOW:  # NaN fails too
        raise ConfigurationError(
            f"{name} must be between 1 ms and {MAX_WINDOW:g} s (a year), not {seconds!r} s"
        )
    return seconds


def _check_context_first(func: Callable[..., Any], name: str) -> None:
    """A task's first parameter receives the Context; a function written the Celery/RQ way
    (arguments only) would get the context in its first argument."""
    from aioqueue.context import Context

    params = list(inspect.signature(func).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    problem = not params or params[0].kind not in positional
    if not problem:
        try:
            hint = typing.get_type_hints(func).get(params[0].name)
        except Exception:
            hint = None
        problem = isinstance(hint, type) and not issubclass(hint, Context)
    if problem:
        raise ConfigurationError(
            f"task {name!r}: its first parameter receives the job's Context; write "
            f"{'async def' if inspect.iscoroutinefunction(func) else 'def'} "
            f"{getattr(func, '__name__', 'task')}(ctx: Context, ...)"
        )


MIN_PRIORITY = -9
MAX_PRIORITY = 9
"""Priorities run from -9 to 9, higher first; 0 is the default (docs/flow-control.md)."""


def check_priority(what: str, priority: int) -> None:
    """Refuse a priority that is not a whole number from MIN_PRIORITY to MAX_PRIORITY."""
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise ConfigurationError(
            f"{what}: a whole number from {MIN_PRIORITY} to {MAX_PRIORITY} "
            f"(higher runs first), not {priority!r}"
        )


def check_limits(prefix: str, retries: int | None, timeout: float | None) -> None:
    """Refuse retries and timeouts a worker would refuse to decode (see ``Envelope``)."""
    if retries is not None and not 0 <= retries <= MAX_RETRIES:
        raise ConfigurationError(f"{prefix}retries must be between 0 and {MAX_RETRIES}")
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:  # NaN fails too
        raise ConfigurationError(f"{prefix}timeout must be > 0 and at most {MAX_TIMEOUT:g} s")


def dependency_ids(
    depends_on: Iterable[Job[Any] | GroupJob[Any] | str], queue: Queue
) -> tuple[str, ...]:
    """Job ids from jobs, groups or ids, for ``depends_on`` of a job on ``queue``."""
    if isinstance(depends_on, str):
        raise ConfigurationError("depends_on takes a list of jobs or job ids, not one string")
    ids: list[str] = []
    for item in depends_on:
        job_id = item if isinstance(item, str) else getattr(item, "id", None)
        if not isinstance(job_id, str):
            raise ConfigurationError(f"depends_on: {item!r} is neither a job nor a job id")
        other = getattr(item, "queue_name", queue.name)
        if other != queue.name:
            raise ConfigurationError(
                f"depends_on: job {job_id!r} is on queue {other!r}, not {queue.name!r}: a "
                "job can only wait for jobs of its own queue"
            )
        ids.append(job_id)
    return tuple(ids)


DEFAULT_OPTIONS = JobOptions()
"""The options of a job given none (shared: JobOptions is frozen, and checking options per
job costs the bulk enqueue path a few microseconds each)."""


@dataclass(frozen=True, slots=True)
class JobRequest(Generic[R]):
    """One prepared job: for :meth:`Queue.enqueue_many`, :func:`aioqueue.group`, or the
    first step of a chain (:meth:`then`)."""

    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: JobOptions = DEFAULT_OPTIONS
    checked: bool = False
    """True once the arguments were bound against the task's signature."""
    queue: Queue | None = None
    """The queue of the task it was prepared from (None when prepared by name)."""

    @overload
    def then(
        self, step: Task[Concatenate[R, P2], R2], /, *args: P2.args, **kwargs: P2.kwargs
    ) -> Chain[R2]: ...

    @overload
    def then(self, step: Partial[R, R2], /) -> Chain[R2]: ...

    @overload
    def then(self, step: Group[R2], /) -> Chain[list[R2]]: ...

    def then(self, step: Any, /, *args: Any, **kwargs: Any) -> Chain[Any]:
        """A chain: when this job completes, run ``step`` with its result as the first
        argument: a task (followed by ``args``), a ``task.partial(...)``, or a group of
        partials (each member fed the result)."""
        from aioqueue.workflow import Chain

        return Chain((self,)).then(step, *args, **kwargs)

    async def enqueue(self) -> Job[R]:
        """Enqueue this job (on the queue of the task it was prepared from)."""
        if self.queue is None:
            raise ConfigurationError(
                "a job prepared by name has no queue: use queue.enqueue_many([request])"
            )
        (job,) = await self.queue.enqueue_many([self])
        task = self.queue.tasks.get(self.task)
        return self.queue.job(job.id, task)


class Task(Generic[P, R]):
    """A function registered on a queue with ``@queue.task()``: an ``async def``, or a
    plain ``def`` that workers run in their thread pool (``sync_threads``).

    Calling the task runs the function directly (handy in tests; a plain ``def`` in a
    thread, so it is awaited too); ``enqueue`` runs it on a worker. Both are typed from the
    function's signature, minus the context.
    """

    def __init__(
        self,
        queue: Queue,
        func: Callable[..., Any],
        *,
        name: str,
        retries: int,
        timeout: float | None,
        backoff: Backoff,
        non_retryable: tuple[type[BaseException], ...],
        priority: int = 0,
        limits: TaskLimits | None = None,
    ) -> None:
        self.sync = not inspect.iscoroutinefunction(func)
        """A plain ``def``: workers run it in their thread pool."""
        # An object with an async __call__ would be taken for a plain def.
        if not callable(func) or (self.sync and inspect.iscoroutinefunction(type(func).__call__)):
            raise ConfigurationError(f"task {name!r} must be a function (async def or def)")
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise ConfigurationError(
                f"task {name!r} is a generator function: a task returns its result, so "
                "write it without yield"
            )
        if not re.fullmatch(TASK_NAME, name):
            raise ConfigurationError(
                f"task name {name!r}: 1 to 200 characters, no control characters"
            )
        check_limits(f"task {name!r}: ", retries, timeout)
        _check_context_first(func, name)
        self.queue = queue
        self.func = func
        self.name = name
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.non_retryable = non_retryable
        check_priority(f"task {name!r}: priority", priority)
        self.priority = priority
        self.limits = limits
        """Its rate and concurrency limits (docs/flow-control.md), None without."""
        self.plain = priority == 0 and (
            limits is None or (limits.rate_key is None and limits.concurrency_key is None)
        )
        """Its jobs need no priority or limit keys of their own (the bulk enqueue path)."""
        self.signature = Signature(func, name)
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"Task({self.name!r}, queue={self.queue.name!r})"

    def __call__(self, ctx: Context, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        """Run the function in this process, without a queue (a plain ``def`` in a thread)."""
        if self.sync:
            from aioqueue.execution import run_directly

            return run_directly(self.func, ctx, args, kwargs)
        return self.func(ctx, *args, **kwargs)  # type: ignore[no-any-return]

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Enqueue one run of this task and return its :class:`Job` handle."""
        return await TaskOptions(self, DEFAULT_OPTIONS).enqueue(*args, **kwargs)

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
    ) -> TaskOptions[P, R]:
        """Per-job options: ``task.options(delay=60, job_id="x").enqueue(...)``; see
        :class:`JobOptions`."""
        options = JobOptions(
            job_id=job_id,
            delay=delay,
            at=at,
            retries=retries,
            timeout=timeout,
            depends_on=dependency_ids(depends_on, self.queue),
            on_dependency_failure=on_dependency_failure,
            priority=priority,
            debounce=debounce,
            throttle=throttle,
            key=key,
        )
        return TaskOptions(self, options)

    def prepare(self, *args: P.args, **kwargs: P.kwargs) -> JobRequest[R]:
        """A prepared job (for :meth:`Queue.enqueue_many`, a group or a chain), arguments
        checked now."""
        return TaskOptions(self, DEFAULT_OPTIONS).prepare(*args, **kwargs)

    def partial(
        self: Task[Concatenate[A, P2], R], *args: P2.args, **kwargs: P2.kwargs
    ) -> Partial[A, R]:
        """A workflow step fed its first argument by what runs before it (a chain's
        previous step): the other arguments are given and checked now."""
        return TaskOptions(self, DEFAULT_OPTIONS).partial(*args, **kwargs)

    async def map(self, arguments: Iterable[Sequence[Any]]) -> list[Job[R]]:
        """Fan out: enqueue one job per argument tuple in pipelined round trips."""
        return await TaskOptions(self, DEFAULT_OPTIONS).map(arguments)


class TaskOptions(Generic[P, R]):
    """A task bound to per-job options; made by :meth:`Task.options`."""

    __slots__ = ("options", "task")

    def __init__(self, task: Task[P, R], options: JobOptions) -> None:
        self.task = task
        self.options = options

    def prepare(self, *args: P.args, **kwargs: P.kwargs) -> JobRequest[R]:
        """A prepared job with these options."""
        return self._request(self.task.signature.bind(args, kwargs))

    def _request(self, bound: tuple[tuple[Any, ...], dict[str, Any]]) -> JobRequest[R]:
        """A request for checked arguments ``(args, kwargs)`` with these options."""
        return JobRequest(
            self.task.name, bound[0], bound[1], self.options, checked=True, queue=self.task.queue
        )

    def partial(
        self: TaskOptions[Concatenate[A, P2], R], *args: P2.args, **kwargs: P2.kwargs
    ) -> Partial[A, R]:
        """A workflow step with these options, fed its first argument at run time."""
        from aioqueue.workflow import Partial

        request: JobRequest[R] = self._request(self.task.signature.bind_fed(args, kwargs))
        return Partial(request)

    async def map(self, arguments: Iterable[Sequence[Any]]) -> list[Job[R]]:
        """Enqueue one job per argument tuple, each with these options (``job_id`` excluded:
        it names one job)."""
        if self.options.job_id is not None:
            raise ConfigurationError("map enqueues many jobs: give no job_id")
        task = self.task
        requests: list[JobRequest[R]] = [
            JobRequest(task.name, tuple(args), {}, self.options) for args in arguments
        ]
        jobs = await task.queue.enqueue_many(requests)
        return [task.queue.job(job.id, task) for job in jobs]

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Enqueue one run with these options."""
        request = self.prepare(*args, **kwargs)
        (job,) = await self.task.queue.enqueue_many([request])
        return self.task.queue.job(job.id, self.task)
