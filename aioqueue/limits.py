"""A task's rate and concurrency limits: parsed once when the task is registered, enforced
by the broker in the step that would start a job (docs/flow-control.md)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aioqueue.brokers.base import Limits
from aioqueue.errors import ConfigurationError
from aioqueue.serialization import TASK_NAME

__all__ = ["KeyFunction", "TaskLimits", "parse_rate", "rate_parts", "share_limits"]

KeyFunction = Callable[..., str]
"""Computes a limit key from a job's arguments (called as the task is, without the
context), e.g. ``lambda token, *_: token``."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_RATE = re.compile(
    r"^\s*(\d+)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hr|hour|d|day)s?\s*$", re.IGNORECASE
)


def parse_rate(text: str) -> int:
    """The interval between starts, in microseconds, of a rate such as ``"5000/h"``,
    ``"20/s"`` or ``"3/10m"`` (rounded up: the limit is never exceeded)."""
    count, period_us = rate_parts(text)
    return max(math.ceil(period_us / count), 1)


def rate_parts(text: str) -> tuple[int, int]:
    """A rate such as ``"3/10m"`` as (count, period in microseconds)."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None or int(match[1]) == 0 or (match[2] and int(match[2]) == 0):
        raise ConfigurationError(
            f"rate_limit {text!r}: write it as <count>/<period>, e.g. '5000/h', '20/s' or "
            "'3/10m' (units s, m, h, d, or sec, min, hour, day; count and period at least 1)"
        )
    seconds = int(match[2] or 1) * _UNITS[match[3][0].lower()]
    return int(match[1]), seconds * 1_000_000


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """What a task declared: the limits the broker enforces, and the functions that compute
    each job's keys (None: the task name is the key, one limit for all its jobs)."""

    limits: Limits
    rate_key: KeyFunction | None = None
    concurrency_key: KeyFunction | None = None

    @classmethod
    def declare(
        cls,
        task: str,
        *,
        rate_limit: str | None,
        rate_burst: int,
        rate_limit_key: KeyFunction | None,
        concurrency_limit: int | None,
        concurrency_key: KeyFunction | None,
    ) -> TaskLimits | None:
        """Check a task's limit options; None when it has none."""
        where = f"task {task!r}"
        if rate_limit is None and rate_limit_key is not None:
            raise ConfigurationError(f"{where}: rate_limit_key needs a rate_limit")
        if rate_limit is None and rate_burst != 1:
            raise ConfigurationError(f"{where}: rate_burst needs a rate_limit")
        if concurrency_limit is None and concurrency_key is not None:
            raise ConfigurationError(f"{where}: concurrency_key needs a concurrency_limit")
        if isinstance(rate_burst, bool) or not isinstance(rate_burst, int) or rate_burst < 1:
            raise ConfigurationError(f"{where}: rate_burst must be a whole number >= 1")
        if concurrency_limit is not None and (
            isinstance(concurrency_limit, bool)
            or not isinstance(concurrency_limit, int)
            or concurrency_limit < 1
        ):
            raise ConfigurationError(f"{where}: concurrency_limit must be a whole number >= 1")
        for name, function in (
            ("rate_limit_key", rate_limit_key),
            ("concurrency_key", concurrency_key),
        ):
            if function is not None and not callable(function):
                raise ConfigurationError(f"{where}: {name} must be a function of the arguments")
        if rate_limit is None and concurrency_limit is None:
            return None
        interval = None if rate_limit is None else parse_rate(rate_limit)
        burst = 0 if interval is None else interval * (rate_burst - 1)
        count, period = (0, 0) if rate_limit is None else rate_parts(rate_limit)
        return cls(
            Limits(interval, burst, concurrency_limit, count, period),
            rate_limit_key,
            concurrency_key,
        )

    def keys(
        self, task: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[str, str] | None:
        """The limit keys of one job (None: the task name is the key of both)."""
        if self.rate_key is None and self.concurrency_key is None:
            return None
        return (
            _key(task, "rate_limit_key", self.rate_key, args, kwargs),
            _key(task, "concurrency_key", self.concurrency_key, args, kwargs),
        )


def _key(
    task: str,
    name: str,
    function: KeyFunction | None,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> str:
    if function is None:
        return ""
    try:
        key = function(*args, **kwargs)
    except Exception as exc:
        raise ConfigurationError(
            f"task {task!r}: {name} failed on these arguments: {exc!r}"
        ) from exc
    if not isinstance(key, str) or not re.fullmatch(TASK_NAME, key):
        raise ConfigurationError(
            f"task {task!r}: {name} must return text of 1 to 200 characters without control "
            f"characters, not {key!r}"
        )
    return key


def share_limits(task: str, limits: Limits, partitions: int) -> Limits:
    """One partition's part of a task's limits, so that the partitions together never
    exceed them: of a rate of C starts per period, C // N per period (its burst shared out
    too), and of a concurrency limit, limit // N. A rate or concurrency limit below N cannot
    be shared out: ConfigurationError."""
    if partitions == 1:
        return limits

    def refuse(what: str) -> ConfigurationError:
        return ConfigurationError(
            f"task {task!r}: {what} cannot be shared out over the queue's {partitions} "
            f"partitions (each enforces its share, rounded down): give it at least "
            f"{partitions}, or put the task on a queue of one partition"
        )

    concurrency = limits.concurrency
    if concurrency is not None:
        if concurrency < partitions:
            raise refuse(f"concurrency_limit={concurrency}")
        concurrency //= partitions
    interval = limits.interval_us
    if interval is None:
        return Limits(None, 0, concurrency)
    count, period = limits.rate_count, limits.rate_period_us
    if not count:
        count, period = 1, interval
    share = count // partitions
    if share == 0:
        raise refuse(f"a rate_limit of {count} per period")
    spaced = -(-period // share)
    burst = max(limits.burst_us // interval + 1, 1)
    return Limits(spaced, (max(burst // partitions, 1) - 1) * spaced, concurrency, share, period)
