"""Cron jobs: schedules, fire times and tick identities.

A cron job runs a task on a schedule. The schedule is either

* a five-field cron expression (``minute hour day-of-month month day-of-week``, or one of the
  macros ``@hourly``, ``@daily``, ``@midnight``, ``@weekly``, ``@monthly``, ``@yearly``,
  ``@annually``), evaluated on the wall clock of the job's time zone, or
* a :class:`~datetime.timedelta` of at least one second, whose ticks are aligned to the Unix
  epoch: they fall on whole multiples of the interval since 1970-01-01 00:00 UTC.

A *tick* is one (cron job name, fire time) pair. Every worker computes the same ticks on its own,
from nothing but the job definition and the clock, so no worker has to be in charge of the
schedule. Exactly one run per tick is achieved elsewhere: :meth:`CronJob.tick_id` turns a tick
into a deterministic job id, and the worker that wins an atomic claim of that tick in Redis
enqueues it; the others see the claim and do nothing.

This part of the module is pure: no Redis, no asyncio, no reading of the clock. The policies it
fixes are:

* **Time zones and DST.** A cron expression matches local wall-clock times. A wall time that
  does not exist (skipped when clocks spring forward) fires at the instant the clocks jump, so
  ``30 2 * * *`` in Europe/Berlin fires at 03:00 CEST on the day of the change. A wall time that
  happens twice (clocks fall back) fires once, at its first occurrence, unless the hour field is
  ``*``: a schedule that runs every hour runs in every real hour, the repeated one included.
* **Naive datetimes** passed to any function here are taken to be in UTC. Returned fire times
  are always aware and in UTC.
* **Missed ticks** (every worker was down, or busy past a fire time) are not caught up one by
  one: :func:`due_tick` skips to the latest due tick, so an outage never causes a burst of runs.
"""

from __future__ import annotations

import heapq
import inspect
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from itertools import islice
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from aioqueue.errors import ConfigurationError

__all__ = ["CronJob", "cron", "validate_unique_names", "due_tick"]

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_ONE_US = timedelta(microseconds=1)
_ONE_MS = timedelta(milliseconds=1)
_ONE_S = timedelta(seconds=1)

_MACROS = frozenset(
    {"@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually"}
)

# (name, number of values, unit of a step) of the five cron fields, in order.
_FIELDS = (
    ("minute", 60, "minutes"),
    ("hour", 24, "hours"),
    ("day-of-month", 31, "days"),
    ("month", 12, "months"),
    ("day-of-week", 7, "days"),
)

# croniter's hashed (H) and random (R) fields: a random field would give every worker its own
# schedule, and a hashed one depends on a hash id the workers would have to agree on.
_HASHED_OR_RANDOM = re.compile(r"^[hr](\(\d+-\d+\))?(/\d+)?$", re.IGNORECASE)

# When no tick has been claimed yet, due_tick looks back at most this far for the latest fire.
_MAX_LOOKBACK = timedelta(days=366 * 10)


@dataclass(frozen=True)
class CronJob:
    """A task to run on a schedule; build one with :func:`cron`, which also validates it.

    Attributes:
        name: Unique name of the cron job; part of every tick id.
        func: The coroutine function to run (or a task object whose ``func`` attribute is one).
        schedule: A five-field cron expression or macro, or a :class:`~datetime.timedelta`.
        timezone: Time zone whose wall clock a cron expression is evaluated on. Interval
            (timedelta) schedules are aligned to the Unix epoch and ignore it.
        args: Positional arguments for every run.
        kwargs: Keyword arguments for every run.
        unique: When true, a run does not start while the previous run is still running.
        timeout: Seconds one run may take, or ``None`` for the task's default.
        retries: How many times a failed run is retried.
    """

    name: str
    func: Callable[..., Awaitable[Any]]
    schedule: str | timedelta
    timezone: tzinfo = _UTC
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    unique: bool = True
    timeout: float | None = None
    retries: int = 0
    _every_hour: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate every field; raise :class:`ConfigurationError` naming the job."""
        if not isinstance(self.name, str) or not self.name or _has_space(self.name):
            raise ConfigurationError(
                f"cron job name {self.name!r} is invalid: use a non-empty string without spaces"
            )
        if not _is_coroutine_function(self.func):
            raise ConfigurationError(
                f"cron job {self.name!r}: {self.func!r} is not a coroutine function; "
                "cron jobs run async tasks, define it with 'async def'"
            )
        if not isinstance(self.timezone, tzinfo):
            raise ConfigurationError(
                f"cron job {self.name!r}: timezone must be a tzinfo, got {self.timezone!r}"
            )
        if isinstance(self.schedule, timedelta):
            _check_interval(self.name, self.schedule)
        elif isinstance(self.schedule, str):
            expression = " ".join(self.schedule.split())
            object.__setattr__(self, "schedule", expression)
            object.__setattr__(self, "_every_hour", _check_expression(self.name, expression))
        else:
            raise ConfigurationError(
                f"cron job {self.name!r}: schedule must be a cron expression (str) "
                f"or a timedelta, got {type(self.schedule).__name__}"
            )
        if self.timeout is not None and (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, (int, float))
            or not math.isfinite(self.timeout)
            or self.timeout <= 0
        ):
            raise ConfigurationError(
                f"cron job {self.name!r}: timeout must be a positive number of seconds "
                f"or None, got {self.timeout!r}"
            )
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigurationError(
                f"cron job {self.name!r}: retries must be an int >= 0, got {self.retries!r}"
            )
        if isinstance(self.schedule, str):
            # Prove the expression ever matches (croniter only finds out by searching).
            try:
                next(self._cron_fires(datetime(2000, 1, 1, tzinfo=_UTC)))
            except CroniterBadDateError as exc:
                raise ConfigurationError(
                    f"cron job {self.name!r}: invalid schedule {self.schedule!r}: it never fires"
                ) from exc

    def next_fire(self, after: datetime) -> datetime:
        """Return the first fire time strictly after ``after``, as an aware UTC datetime.

        A naive ``after`` is taken to be in UTC. See the module docstring for how cron
        expressions treat daylight-saving changes; interval schedules fire on whole multiples of
        the interval since the Unix epoch.
        """
        return next(self._fires(_as_utc(after)))

    def fire_times(self, after: datetime, count: int) -> list[datetime]:
        """Return the next ``count`` fire times strictly after ``after``, in increasing order.

        Raises:
            ValueError: ``count`` is negative.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        return list(islice(self._fires(_as_utc(after)), count))

    def tick_id(self, fire: datetime) -> str:
        """Return the job id of the tick at ``fire``: ``cron:{name}:{epoch milliseconds}``.

        Every worker derives the same id for the same tick, which is what makes a tick run
        once. A naive ``fire`` is taken to be in UTC.
        """
        epoch_ms = (_as_utc(fire) - _EPOCH) // _ONE_MS
        return f"cron:{self.name}:{epoch_ms}"

    def describe(self) -> str:
        """Return the schedule for humans.

        For example ``"*/10 * * * *"``, ``"0 9 * * 1-5 (Europe/Berlin)"`` or ``"every 1m30s"``:
        the time zone is shown for cron expressions not evaluated in UTC.
        """
        if isinstance(self.schedule, timedelta):
            return f"every {_format_interval(self.schedule)}"
        zone = str(self.timezone)
        if zone in ("UTC", "Etc/UTC", "UTC+00:00"):
            return self.schedule
        return f"{self.schedule} ({zone})"

    # -- fire time computation ---------------------------------------------------------------

    def _fires(self, after: datetime) -> Iterator[datetime]:
        """Yield every fire time strictly after ``after`` (aware UTC), in increasing order."""
        if isinstance(self.schedule, timedelta):
            return _interval_fires(self.schedule, after)
        return self._cron_fires(after)

    def _cron_fires(self, after: datetime) -> Iterator[datetime]:
        """Yield the fire times of the cron expression strictly after ``after`` (aware UTC).

        croniter walks naive wall-clock times; each is mapped to real instants here. Mapped
        first occurrences are non-decreasing in wall-clock order, while the second occurrence
        of a repeated wall time (fall-back) can come after later wall times' first ones, so
        those wait in a heap until every earlier instant has been yielded.
        """
        assert isinstance(self.schedule, str)
        zone = self.timezone
        local = after.astimezone(zone)
        wall = local.replace(tzinfo=None)
        start = wall
        if local.fold == 0:
            # If ``after`` is in the first pass of a repeated hour, wall times shortly before it
            # will happen again after it: start the walk early enough to see them.
            repeat = _offset(local.replace(fold=0)) - _offset(local.replace(fold=1))
            if repeat > timedelta(0):
                start = wall - repeat
        walk = croniter(self.schedule, start, ret_type=datetime)
        second_passes: list[datetime] = []
        last = after
        while True:
            candidate: datetime = walk.get_next(datetime)
            first, second = _instants(candidate, zone)
            if second is not None and self._every_hour:
                heapq.heappush(second_passes, second)
            while second_passes and second_passes[0] <= first:
                pending = heapq.heappop(second_passes)
                if pending > last:
                    last = pending
                    yield pending
            if first > last:
                last = first
                yield first


def cron(
    schedule: str | timedelta,
    func: Callable[..., Awaitable[Any]],
    *,
    name: str | None = None,
    timezone: str | tzinfo = "UTC",
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    unique: bool = True,
    timeout: float | None = None,
    retries: int = 0,
) -> CronJob:
    """Define a cron job that runs ``func`` on ``schedule``; everything is validated now.

    Args:
        schedule: A five-field cron expression (``"*/10 * * * *"``, ``"0 9 * * mon-fri"``), a
            macro (``"@daily"``), or a :class:`~datetime.timedelta` of at least one second,
            in whole milliseconds. Expressions with a seconds or years field are refused: use
            a timedelta for sub-minute intervals.
        func: A coroutine function, or a task object whose ``func`` attribute is one.
        name: Unique name of the job; defaults to ``func.name`` when that is a string (task
            objects), else ``func.__name__``.
        timezone: IANA time zone name or tzinfo whose wall clock the expression follows.
        args: Positional arguments for every run.
        kwargs: Keyword arguments for every run.
        unique: When true, a run does not start while the previous run is still running.
        timeout: Seconds one run may take (positive), or ``None`` for the task's default.
        retries: How many times a failed run is retried (``>= 0``).

    Raises:
        ConfigurationError: Any argument is invalid; the message names the cron job.
    """
    if name is None:
        task_name = getattr(func, "name", None)
        name = task_name if isinstance(task_name, str) else getattr(func, "__name__", None)
        if not isinstance(name, str):
            raise ConfigurationError(f"cron job for {func!r}: cannot derive a name, pass name=")
    zone = _resolve_timezone(name, timezone)
    return CronJob(
        name=name,
        func=func,
        schedule=schedule,
        timezone=zone,
        args=tuple(args),
        kwargs=MappingProxyType(dict(kwargs or {})),
        unique=unique,
        timeout=timeout,
        retries=retries,
    )


def validate_unique_names(jobs: Iterable[CronJob]) -> None:
    """Check that no two cron jobs share a name (the name identifies a job's ticks).

    Raises:
        ConfigurationError: Two jobs have the same name; the message names it.
    """
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise ConfigurationError(
                f"cron job {job.name!r} is defined more than once: "
                "cron job names must be unique, pass name= to tell them apart"
            )
        seen.add(job.name)


def due_tick(job: CronJob, last_claimed: datetime | None, now: datetime) -> datetime | None:
    """Return the tick to run now, or ``None`` when nothing is due.

    The due tick is the most recent fire time ``<= now`` that is later than ``last_claimed``
    (the fire time of the job's last claimed tick). Policy: *skip to the latest due tick*.
    When several ticks were missed (all workers were down, or a worker stalled) only the
    latest one runs; the older ones are skipped, so a long outage never causes a burst of
    catch-up runs.

    With ``last_claimed=None`` (no tick ever claimed) the latest fire time ``<= now`` is due,
    looking back up to ten years. A scheduler that wants a new job to wait for its next fire
    instead should pass the time it started as ``last_claimed``. Naive datetimes are taken to
    be in UTC.
    """
    now = _as_utc(now)
    floor = None if last_claimed is None else _as_utc(last_claimed)
    if floor is not None and floor >= now:
        return None
    if isinstance(job.schedule, timedelta):
        step = job.schedule // _ONE_US
        tick = _EPOCH + _ONE_US * ((now - _EPOCH) // _ONE_US // step * step)
        return tick if floor is None or tick > floor else None
    # Look back over doubling windows until one holds a fire time.
    window = timedelta(minutes=1)
    while True:
        start = now - window
        reached_floor = floor is not None and start <= floor
        if floor is not None and reached_floor:
            start = floor
        latest: datetime | None = None
        for fire in job._cron_fires(start):
            if fire > now:
                break
            latest = fire
        if latest is not None:
            return latest
        if reached_floor or window > _MAX_LOOKBACK:
            return None
        window *= 2


# -- helpers -------------------------------------------------------------------------------------


def _as_utc(moment: datetime) -> datetime:
    """Return ``moment`` as an aware UTC datetime; a naive one is taken to be in UTC."""
    if not isinstance(moment, datetime):
        raise TypeError(f"expected a datetime, got {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        return moment.replace(tzinfo=_UTC)
    return moment.astimezone(_UTC)


def _offset(moment: datetime) -> timedelta:
    """Return the UTC offset of an aware datetime."""
    offset = moment.utcoffset()
    assert offset is not None
    return offset


def _instants(wall: datetime, zone: tzinfo) -> tuple[datetime, datetime | None]:
    """Map a naive wall-clock time in ``zone`` to real instants (aware UTC).

    Returns ``(first, second)``: ``second`` is the repeat of an ambiguous (fall-back) wall time
    and ``None`` otherwise. A nonexistent (spring-forward) wall time maps to the instant the
    clocks jumped.
    """
    first = wall.replace(tzinfo=zone, fold=0).astimezone(_UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(_UTC)
    if first == second:
        return first, None
    if first < second:
        return first, second
    # In a gap, fold=0 applies the offset from before the jump and fold=1 the one after it
    # (PEP 495), which puts the jump between the two: find it to the second.
    # Offsets are whole seconds, so the jump is a whole second too.
    after_offset = _offset(first.astimezone(zone))
    low, high = (second - _EPOCH) // _ONE_S, -((_EPOCH - first) // _ONE_S)
    while high - low > 1:
        middle = (low + high) // 2
        if _offset((_EPOCH + middle * _ONE_S).astimezone(zone)) == after_offset:
            high = middle
        else:
            low = middle
    return _EPOCH + high * _ONE_S, None


def _interval_fires(interval: timedelta, after: datetime) -> Iterator[datetime]:
    """Yield the epoch-aligned ticks of ``interval`` strictly after ``after`` (aware UTC)."""
    step = interval // _ONE_US
    index = (after - _EPOCH) // _ONE_US // step + 1
    while True:
        yield _EPOCH + _ONE_US * (index * step)
        index += 1


def _is_coroutine_function(func: object) -> bool:
    """Whether ``func`` is a coroutine function or has one as its ``func`` attribute."""
    if inspect.iscoroutinefunction(func):
        return True
    return inspect.iscoroutinefunction(getattr(func, "func", None))


def _has_space(text: str) -> bool:
    return any(char.isspace() for char in text)


def _resolve_timezone(name: str, zone: str | tzinfo) -> tzinfo:
    """Turn a time zone name into a tzinfo; raise ConfigurationError naming the job."""
    if isinstance(zone, tzinfo):
        return zone
    if not isinstance(zone, str):
        raise ConfigurationError(
            f"cron job {name!r}: timezone must be an IANA name or a tzinfo, got {zone!r}"
        )
    try:
        return ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        if zone.upper() == "UTC":  # no tz database installed (no tzdata package)
            return _UTC
        raise ConfigurationError(
            f"cron job {name!r}: unknown timezone {zone!r}: use an IANA name such as "
            "'Europe/Berlin' (install the 'tzdata' package if the system has no tz database)"
        ) from exc


def _check_interval(name: str, interval: timedelta) -> None:
    """Refuse intervals under one second or not in whole milliseconds."""
    if interval < _ONE_S:
        raise ConfigurationError(
            f"cron job {name!r}: invalid schedule every {interval.total_seconds():g}s: "
            "the interval must be at least 1 second"
        )
    if interval % _ONE_MS:
        raise ConfigurationError(
            f"cron job {name!r}: invalid schedule every {interval.total_seconds()}s: "
            "the interval must be a whole number of milliseconds"
        )


def _check_expression(name: str, expression: str) -> bool:
    """Validate a cron expression; return whether its hour field is ``*`` (every hour)."""

    def invalid(reason: str) -> ConfigurationError:
        return ConfigurationError(f"cron job {name!r}: invalid schedule {expression!r}: {reason}")

    if not expression:
        raise invalid("the expression is empty")
    if expression.startswith("@"):
        if expression.lower() not in _MACROS:
            raise invalid(f"unknown macro; supported: {', '.join(sorted(_MACROS))}")
        fields: list[str] = []
    else:
        fields = expression.split()
        if len(fields) in (6, 7):
            raise invalid(
                f"{len(fields)} fields, but aioqueue cron expressions have 5 (minute hour "
                "day-of-month month day-of-week) and no seconds or years field: for "
                "intervals under a minute pass a timedelta, e.g. timedelta(seconds=10)"
            )
        if len(fields) != 5:
            raise invalid(
                f"{len(fields)} fields, expected 5 (minute hour day-of-month month day-of-week)"
            )
        for text, (field_name, _, _) in zip(fields, _FIELDS, strict=True):
            if _HASHED_OR_RANDOM.match(text):
                raise invalid(
                    f"hashed (H) and random (R) values are not supported (in the {field_name} "
                    "field): every worker must compute the same fire times"
                )
    try:
        expanded = croniter.expand(expression, strict=True)[0]
    except CroniterError as exc:
        raise invalid(str(exc)) from exc
    for text, (field_name, size, unit) in zip(fields, _FIELDS, strict=False):  # no fields: a macro
        for part in text.split(","):
            _, slash, step = part.partition("/")
            if slash and step.isdigit() and int(step) > size:
                raise invalid(
                    f"step {step} in the {field_name} field is larger than the {size} values "
                    f"the field has, so it matches only once; cron cannot express 'every "
                    f"{step} {unit}': pass a timedelta instead"
                )
    return bool(expanded[1] == ["*"])


def _format_interval(interval: timedelta) -> str:
    """Format an interval compactly: ``5s``, ``1m30s``, ``1h``, ``1d12h``, ``1s500ms``."""
    milliseconds = interval // _ONE_MS
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        count, milliseconds = divmod(milliseconds, size)
        if count:
            parts.append(f"{count}{unit}")
    if milliseconds:
        parts.append(f"{milliseconds}ms")
    return "".join(parts)
