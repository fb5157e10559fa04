"""The report job: what the worker runs, and where it gets its data.

``build_report(user_id, kind)`` reads a user's daily totals for the last 30 days from a
:class:`ReportSource` and sums them up into a :class:`ReportSummary`. The source is opened when
a worker starts and closed when it stops (``on_startup`` / ``on_shutdown`` hooks), as a
database pool would be; every job the worker runs shares it through ``ctx.state``.

The example's source, :class:`DemoSource`, makes up stable numbers for users 1 to 1000. A user
it does not know raises :class:`UserNotFound`, which fails the job at once: retrying cannot
help, so the task lists it in ``non_retryable``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal, Protocol

from aioqueue import Context, Queue, Task, Worker

__all__ = [
    "DAYS",
    "SOURCE",
    "DemoSource",
    "ReportKind",
    "ReportSource",
    "ReportSummary",
    "UserNotFound",
    "make_worker",
    "register",
]

ReportKind = Literal["activity", "billing", "storage"]
"""The reports there are; the API and the task both refuse any other kind."""

DAYS = 30
"""How many days (up to yesterday) a report covers."""

SOURCE = "report_source"
"""Key of the shared :class:`ReportSource` in the worker's state (``ctx.state``)."""


@dataclass(frozen=True, kw_only=True)
class ReportSummary:
    """What ``build_report`` returns.

    A dataclass serves both sides: aioqueue (msgspec) stores it as the job's result and
    decodes it back into this type for ``await job.result()``, and FastAPI (pydantic)
    validates, serializes and documents it as a response model.
    """

    user_id: int
    kind: ReportKind
    days: int
    total: float
    daily_average: float
    peak: float
    peak_day: date
    generated_at: datetime


class UserNotFound(LookupError):
    """The source has no data for this user."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id
        super().__init__(f"no user with id {user_id}")


class ReportSource(Protocol):
    """Where report data comes from (a database, a warehouse, another service)."""

    async def daily_totals(self, user_id: int, kind: ReportKind, days: int) -> list[float]:
        """One total per day, oldest first, ending yesterday; raises :class:`UserNotFound`."""
        ...

    async def aclose(self) -> None:
        """Release connections; called when the worker stops."""
        ...


class DemoSource:
    """Made-up numbers, the same for the same user and kind, for users 1 to ``users``.

    ``latency`` seconds of sleep stand in for a database round trip.
    """

    def __init__(self, *, latency: float = 0.05, users: int = 1000) -> None:
        self.latency = latency
        self.users = users

    async def daily_totals(self, user_id: int, kind: ReportKind, days: int) -> list[float]:
        await asyncio.sleep(self.latency)
        if not 1 <= user_id <= self.users:
            raise UserNotFound(user_id)
        rng = random.Random(f"{user_id}:{kind}")
        return [round(rng.uniform(0, 100), 2) for _ in range(days)]

    async def aclose(self) -> None:
        pass


def summarize(user_id: int, kind: ReportKind, totals: list[float], today: date) -> ReportSummary:
    """The summary of ``totals`` (one per day, oldest first, the last one yesterday's)."""
    days = len(totals)
    peak_index = max(range(days), key=totals.__getitem__) if totals else 0
    total = round(sum(totals), 2)
    return ReportSummary(
        user_id=user_id,
        kind=kind,
        days=days,
        total=total,
        daily_average=round(total / days, 2) if days else 0.0,
        peak=totals[peak_index] if totals else 0.0,
        peak_day=today - timedelta(days=days - peak_index),
        generated_at=datetime.now(timezone.utc),
    )


def register(queue: Queue) -> Task[[int, ReportKind], ReportSummary]:
    """Register ``build_report`` on ``queue`` and return it.

    A function rather than module-level code so that each queue (a deployment's, a test's)
    gets its own registration. ``create_app`` calls it.
    """

    @queue.task(retries=3, timeout=60, non_retryable=[UserNotFound])
    async def build_report(ctx: Context, user_id: int, kind: ReportKind) -> ReportSummary:
        """Sum up one user's last ``DAYS`` days of ``kind``."""
        source: ReportSource = ctx.state[SOURCE]
        totals = await source.daily_totals(user_id, kind, DAYS)
        return summarize(user_id, kind, totals, datetime.now(timezone.utc).date())

    return build_report


def make_worker(
    queue: Queue,
    *,
    source: Callable[[], ReportSource] = DemoSource,
    concurrency: int = 20,
    **settings: Any,
) -> Worker:
    """A worker for ``queue`` whose jobs share one source, made by ``source()`` at startup.

    Other keyword arguments are aioqueue settings (``lease``, ``shutdown_grace``, ...).
    """

    async def open_source(state: dict[str, Any]) -> None:
        state[SOURCE] = source()

    async def close_source(state: dict[str, Any]) -> None:
        opened: ReportSource | None = state.pop(SOURCE, None)
        if opened is not None:
            await opened.aclose()

    return queue.worker(
        concurrency=concurrency,
        on_startup=[open_source],
        on_shutdown=[close_source],
        **settings,
    )
