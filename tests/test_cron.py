"""Cron schedules, fire times, tick ids and the missed-tick policy: pure, no Redis, no sleeping."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone, tzinfo
from itertools import pairwise
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from aioqueue.cron import CronJob, cron, due_tick, validate_unique_names
from aioqueue.errors import ConfigurationError

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def poll_github() -> None:
    """A stand-in task."""


async def other_task(x: int = 0) -> int:
    return x


def sync_task() -> None:
    """Not a coroutine function."""


def at(text: str) -> datetime:
    """Parse an ISO 8601 time with an offset (``Z`` for UTC) into an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def job(schedule: str | timedelta, tz: str | tzinfo = "UTC", **options: Any) -> CronJob:
    return cron(schedule, poll_github, timezone=tz, **options)


# -- next fire time -----------------------------------------------------------------------------

NEXT_FIRE = [
    # (schedule, time zone, after, expected next fire)
    ("*/10 * * * *", "UTC", "2026-01-01T00:00:00Z", "2026-01-01T00:10:00Z"),
    ("*/10 * * * *", "UTC", "2026-01-01T00:00:01Z", "2026-01-01T00:10:00Z"),
    ("*/10 * * * *", "UTC", "2026-01-01T00:09:59.999999Z", "2026-01-01T00:10:00Z"),
    ("*/10 * * * *", "UTC", "2026-12-31T23:55:00Z", "2027-01-01T00:00:00Z"),
    ("*/10 * * * *", "UTC", "2026-01-01T05:03:00+05:00", "2026-01-01T00:10:00Z"),
    ("* * * * *", "UTC", "2026-06-15T12:34:56Z", "2026-06-15T12:35:00Z"),
    ("5,35 * * * *", "UTC", "2026-06-15T12:05:00Z", "2026-06-15T12:35:00Z"),
    ("0 9 * * 1-5", "UTC", "2026-03-06T09:00:00Z", "2026-03-09T09:00:00Z"),  # Fri -> Mon
    ("0 9 * * 1-5", "UTC", "2026-03-07T10:00:00Z", "2026-03-09T09:00:00Z"),  # Sat -> Mon
    ("0 9 * * 1-5", "UTC", "2026-03-09T08:59:59Z", "2026-03-09T09:00:00Z"),
    ("0 9 * * mon-fri", "UTC", "2026-03-06T09:00:00Z", "2026-03-09T09:00:00Z"),
    ("0 9 * * 0", "UTC", "2026-03-06T09:00:00Z", "2026-03-08T09:00:00Z"),  # Sunday as 0
    ("0 9 * * 7", "UTC", "2026-03-06T09:00:00Z", "2026-03-08T09:00:00Z"),  # Sunday as 7
    ("0 0 1,15 * *", "UTC", "2026-01-01T00:00:00Z", "2026-01-15T00:00:00Z"),
    # macros
    ("@hourly", "UTC", "2026-01-01T00:30:00Z", "2026-01-01T01:00:00Z"),
    ("@daily", "UTC", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
    ("@midnight", "UTC", "2026-01-01T12:00:00Z", "2026-01-02T00:00:00Z"),
    ("@weekly", "UTC", "2026-01-01T12:00:00Z", "2026-01-04T00:00:00Z"),  # next Sunday
    ("@monthly", "UTC", "2026-01-15T00:00:00Z", "2026-02-01T00:00:00Z"),
    ("@yearly", "UTC", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("@annually", "UTC", "2026-06-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("@DAILY", "UTC", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
    # month ends
    ("0 0 31 * *", "UTC", "2026-01-31T00:00:00Z", "2026-03-31T00:00:00Z"),
    ("0 0 31 * *", "UTC", "2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z"),
    ("0 0 30 * *", "UTC", "2026-01-30T00:00:00Z", "2026-03-30T00:00:00Z"),
    ("0 0 L * *", "UTC", "2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z"),
    ("0 0 L * *", "UTC", "2028-01-31T00:00:00Z", "2028-02-29T00:00:00Z"),
    ("0 0 L * *", "UTC", "2026-04-15T00:00:00Z", "2026-04-30T00:00:00Z"),
    ("59 23 31 12 *", "UTC", "2026-12-31T23:58:00Z", "2026-12-31T23:59:00Z"),
    ("0 0 1 1 *", "UTC", "2026-12-31T23:59:59Z", "2027-01-01T00:00:00Z"),
    # 29 February
    ("0 0 29 2 *", "UTC", "2026-01-01T00:00:00Z", "2028-02-29T00:00:00Z"),
    ("0 0 29 2 *", "UTC", "2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"),
    ("0 0 29 2 *", "UTC", "2096-03-01T00:00:00Z", "2104-02-29T00:00:00Z"),  # 2100 is no leap year
    ("0 12 29 2 *", "Europe/Berlin", "2027-06-01T00:00:00Z", "2028-02-29T12:00:00+01:00"),
    # Europe/Berlin, spring forward 2026-03-29: 02:00 CET jumps to 03:00 CEST
    ("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00+01:00", "2026-03-29T03:00:00+02:00"),
    ("30 2 * * *", "Europe/Berlin", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"),
    ("0 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00+01:00", "2026-03-29T03:00:00+02:00"),
    ("0 3 * * *", "Europe/Berlin", "2026-03-28T12:00:00+01:00", "2026-03-29T03:00:00+02:00"),
    ("0 * * * *", "Europe/Berlin", "2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00"),
    ("30 1 * * *", "Europe/Berlin", "2026-03-28T12:00:00+01:00", "2026-03-29T01:30:00+01:00"),
    # Europe/Berlin, fall back 2026-10-25: 03:00 CEST goes back to 02:00 CET
    ("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00+02:00", "2026-10-25T02:30:00+02:00"),
    ("30 2 * * *", "Europe/Berlin", "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"),
    ("30 2 * * *", "Europe/Berlin", "2026-10-25T02:15:00+01:00", "2026-10-26T02:30:00+01:00"),
    ("0 * * * *", "Europe/Berlin", "2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00"),
    ("*/30 * * * *", "Europe/Berlin", "2026-10-25T02:45:00+02:00", "2026-10-25T02:00:00+01:00"),
    ("*/30 * * * *", "Europe/Berlin", "2026-10-25T02:45:00+01:00", "2026-10-25T03:00:00+01:00"),
    ("45 2 * * *", "Europe/Berlin", "2026-10-25T02:50:00+02:00", "2026-10-26T02:45:00+01:00"),
    # America/New_York: spring forward 2026-03-08 02:00, fall back 2026-11-01 02:00
    ("0 9 * * 1-5", "America/New_York", "2026-03-06T09:00:00-05:00", "2026-03-09T09:00:00-04:00"),
    ("30 2 * * *", "America/New_York", "2026-03-07T12:00:00-05:00", "2026-03-08T03:00:00-04:00"),
    ("30 1 * * *", "America/New_York", "2026-10-31T12:00:00-04:00", "2026-11-01T01:30:00-04:00"),
    ("30 1 * * *", "America/New_York", "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"),
    ("0 * * * *", "America/New_York", "2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00"),
    ("0 0 * * *", "America/New_York", "2026-06-30T12:00:00Z", "2026-07-01T00:00:00-04:00"),
    # zones without DST, and a fractional offset
    ("0 9 * * *", "Asia/Kolkata", "2026-01-01T00:00:00Z", "2026-01-01T09:00:00+05:30"),
    ("0 9 * * *", "Asia/Tokyo", "2026-01-01T00:00:00Z", "2026-01-02T09:00:00+09:00"),
]


@pytest.mark.parametrize(("schedule", "tz", "after", "expected"), NEXT_FIRE)
def test_next_fire_is_the_first_matching_wall_clock_time_strictly_after_the_given_moment(
    schedule: str, tz: str, after: str, expected: str
) -> None:
    fire = job(schedule, tz).next_fire(at(after))
    assert fire == at(expected)
    assert fire.tzinfo is UTC


FIRE_SEQUENCES = [
    # (schedule, time zone, after, expected fire times)
    (
        "*/30 * * * *",
        "Europe/Berlin",
        "2026-10-25T01:10:00+02:00",
        [
            "2026-10-25T01:30:00+02:00",
            "2026-10-25T02:00:00+02:00",
            "2026-10-25T02:30:00+02:00",
            "2026-10-25T02:00:00+01:00",  # the repeated hour runs again: it is a real hour
            "2026-10-25T02:30:00+01:00",
            "2026-10-25T03:00:00+01:00",
        ],
    ),
    (
        "*/30 * * * *",
        "Europe/Berlin",
        "2026-03-29T01:10:00+01:00",
        [
            "2026-03-29T01:30:00+01:00",
            "2026-03-29T03:00:00+02:00",  # 02:00 and 02:30 do not exist
            "2026-03-29T03:30:00+02:00",
            "2026-03-29T04:00:00+02:00",
        ],
    ),
    (
        "*/10 2 * * *",
        "Europe/Berlin",
        "2026-03-28T12:00:00+01:00",
        [
            "2026-03-29T03:00:00+02:00",  # the skipped 02:00..02:50 fire once, at the jump
            "2026-03-30T02:00:00+02:00",
            "2026-03-30T02:10:00+02:00",
        ],
    ),
    (
        "*/20 2 * * *",
        "Europe/Berlin",
        "2026-10-25T01:59:00+02:00",
        [
            "2026-10-25T02:00:00+02:00",
            "2026-10-25T02:20:00+02:00",
            "2026-10-25T02:40:00+02:00",
            "2026-10-26T02:00:00+01:00",  # the fixed hour 2 does not run twice
        ],
    ),
    (
        "0 * * * *",
        "Europe/Berlin",
        "2026-10-25T00:30:00+02:00",
        [
            "2026-10-25T01:00:00+02:00",
            "2026-10-25T02:00:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T03:00:00+01:00",
        ],
    ),
    (
        "@hourly",
        "America/New_York",
        "2026-03-08T00:30:00-05:00",
        [
            "2026-03-08T01:00:00-05:00",
            "2026-03-08T03:00:00-04:00",
            "2026-03-08T04:00:00-04:00",
        ],
    ),
    (
        "0 0 * * *",
        "America/Sao_Paulo",
        "2018-11-02T12:00:00-03:00",
        [
            "2018-11-03T00:00:00-03:00",
            "2018-11-04T01:00:00-02:00",  # midnight did not exist that day
            "2018-11-05T00:00:00-02:00",
        ],
    ),
    (
        "0 * * * *",
        "Australia/Lord_Howe",
        "2026-04-05T00:30:00+11:00",
        [
            "2026-04-05T01:00:00+11:00",
            "2026-04-05T02:00:00+10:30",  # half-hour fall back: 01:30-02:00 repeats
            "2026-04-05T03:00:00+10:30",
        ],
    ),
    (
        "0 9 * * 1-5",
        "UTC",
        "2026-01-01T12:00:00Z",
        [
            "2026-01-02T09:00:00Z",
            "2026-01-05T09:00:00Z",
            "2026-01-06T09:00:00Z",
            "2026-01-07T09:00:00Z",
            "2026-01-08T09:00:00Z",
            "2026-01-09T09:00:00Z",
            "2026-01-12T09:00:00Z",
        ],
    ),
]


@pytest.mark.parametrize(("schedule", "tz", "after", "expected"), FIRE_SEQUENCES)
def test_fire_times_follow_the_wall_clock_through_daylight_saving_changes(
    schedule: str, tz: str, after: str, expected: list[str]
) -> None:
    assert job(schedule, tz).fire_times(at(after), len(expected)) == [at(e) for e in expected]


def test_a_naive_moment_is_taken_to_be_utc() -> None:
    cron_job = job("30 9 * * *", "Europe/Berlin")
    naive = datetime(2026, 1, 1, 8, 0)
    assert cron_job.next_fire(naive) == cron_job.next_fire(naive.replace(tzinfo=UTC))
    assert cron_job.next_fire(naive) == at("2026-01-01T09:30:00+01:00")
    assert cron_job.tick_id(naive) == cron_job.tick_id(naive.replace(tzinfo=UTC))


def test_a_fixed_offset_tzinfo_is_accepted_as_a_timezone() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    fire = job("0 9 * * *", ist).next_fire(at("2026-01-01T00:00:00Z"))
    assert fire == at("2026-01-01T09:00:00+05:30")


def test_fire_times_of_zero_is_empty_and_a_negative_count_is_refused() -> None:
    cron_job = job("* * * * *")
    assert cron_job.fire_times(at("2026-01-01T00:00:00Z"), 0) == []
    with pytest.raises(ValueError, match="count"):
        cron_job.fire_times(at("2026-01-01T00:00:00Z"), -1)


# -- interval schedules -------------------------------------------------------------------------

INTERVALS = [
    # (interval, after, expected next tick): ticks are multiples of the interval since the epoch
    (timedelta(seconds=5), "2026-01-01T00:00:03Z", "2026-01-01T00:00:05Z"),
    (timedelta(seconds=5), "2026-01-01T00:00:05Z", "2026-01-01T00:00:10Z"),
    (timedelta(seconds=5), "2026-01-01T00:00:04.999999Z", "2026-01-01T00:00:05Z"),
    (timedelta(seconds=1), "2026-01-01T00:00:00.500Z", "2026-01-01T00:00:01Z"),
    (timedelta(seconds=1), "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z"),
    (timedelta(seconds=90), "2026-01-01T00:00:00Z", "2026-01-01T00:01:30Z"),
    (timedelta(seconds=90), "2026-01-01T00:01:29Z", "2026-01-01T00:01:30Z"),
    (timedelta(seconds=90), "2026-01-01T00:01:30Z", "2026-01-01T00:03:00Z"),
    (timedelta(hours=1), "2026-01-01T00:59:59.999Z", "2026-01-01T01:00:00Z"),
    (timedelta(hours=1), "2026-01-01T01:30:00+01:00", "2026-01-01T01:00:00Z"),
    (timedelta(seconds=13), "2026-01-01T00:00:00Z", "2026-01-01T00:00:03Z"),  # not midnight
    (timedelta(milliseconds=1500), "2026-01-01T00:00:00Z", "2026-01-01T00:00:01.500Z"),
    (timedelta(days=1), "2026-03-29T00:30:00+01:00", "2026-03-29T00:00:00Z"),
]


@pytest.mark.parametrize(("interval", "after", "expected"), INTERVALS)
def test_interval_ticks_are_aligned_to_the_unix_epoch(
    interval: timedelta, after: str, expected: str
) -> None:
    fire = job(interval).next_fire(at(after))
    assert fire == at(expected)
    assert fire.tzinfo is UTC


@pytest.mark.parametrize(
    "interval",
    [
        timedelta(seconds=1),
        timedelta(seconds=5),
        timedelta(seconds=7),
        timedelta(seconds=90),
        timedelta(hours=1),
        timedelta(milliseconds=1234),
    ],
)
@pytest.mark.parametrize(
    "shift", [timedelta(0), timedelta(microseconds=1), timedelta(milliseconds=333)]
)
def test_interval_ticks_are_the_same_whatever_moment_a_worker_starts_from(
    interval: timedelta, shift: timedelta
) -> None:
    start = at("2026-05-05T05:05:05.123456Z")
    reference = job(interval).fire_times(start, 40)
    later = job(interval).fire_times(start + shift + 3 * interval, 30)
    assert set(later) <= set(reference)
    assert later == reference[reference.index(later[0]) :][:30]
    assert all((fire - EPOCH) % interval == timedelta(0) for fire in reference)


def test_interval_ticks_ignore_the_time_zone() -> None:
    start = at("2026-03-29T00:59:00Z")
    assert job(timedelta(minutes=7), "Europe/Berlin").fire_times(start, 20) == job(
        timedelta(minutes=7)
    ).fire_times(start, 20)


# -- tick ids -----------------------------------------------------------------------------------

TICK_IDS = [
    ("poll_github", "1970-01-01T00:00:00Z", "cron:poll_github:0"),
    ("poll_github", "2026-01-01T00:00:00Z", "cron:poll_github:1767225600000"),
    ("poll_github", "2026-01-01T01:00:00+01:00", "cron:poll_github:1767225600000"),
    ("poll_github", "2026-01-01T00:00:01.500Z", "cron:poll_github:1767225601500"),
    ("nightly-report", "2026-10-25T02:30:00+02:00", "cron:nightly-report:1792888200000"),
    ("nightly-report", "2026-10-25T02:30:00+01:00", "cron:nightly-report:1792891800000"),
]


@pytest.mark.parametrize(("name", "fire", "expected"), TICK_IDS)
def test_a_tick_id_is_the_job_name_and_the_fire_time_in_epoch_milliseconds(
    name: str, fire: str, expected: str
) -> None:
    assert job("* * * * *", name=name).tick_id(at(fire)) == expected


def test_every_worker_derives_the_same_tick_ids_independently() -> None:
    def worker_view() -> list[str]:
        cron_job = cron("*/10 * * * *", poll_github, timezone=ZoneInfo("Europe/Berlin"))
        return [cron_job.tick_id(f) for f in cron_job.fire_times(at("2026-10-25T00:00:00Z"), 20)]

    first, second = worker_view(), worker_view()
    assert first == second
    assert len(set(first)) == len(first)


def test_the_same_instant_gets_the_same_tick_id_in_any_time_zone() -> None:
    cron_job = job("0 * * * *")
    instant = at("2026-07-01T12:00:00Z")
    in_zones = [instant.astimezone(ZoneInfo(z)) for z in ("Europe/Berlin", "Asia/Tokyo")]
    assert {cron_job.tick_id(moment) for moment in [instant, *in_zones]} == {
        "cron:poll_github:1782907200000"
    }


# -- the missed-tick policy ---------------------------------------------------------------------

DUE_TICKS: list[tuple[str | timedelta, str, str | None, str, str | None]] = [
    # (schedule, time zone, last claimed, now, expected due tick)
    ("*/10 * * * *", "UTC", None, "2026-01-01T00:25:00Z", "2026-01-01T00:20:00Z"),
    ("*/10 * * * *", "UTC", "2026-01-01T00:10:00Z", "2026-01-01T00:25:00Z", "2026-01-01T00:20:00Z"),
    ("*/10 * * * *", "UTC", "2026-01-01T00:10:00Z", "2026-01-01T00:20:00Z", "2026-01-01T00:20:00Z"),
    ("*/10 * * * *", "UTC", "2026-01-01T00:20:00Z", "2026-01-01T00:25:00Z", None),
    ("*/10 * * * *", "UTC", "2026-01-01T00:20:00Z", "2026-01-01T00:20:00Z", None),
    ("*/10 * * * *", "UTC", "2026-01-01T00:20:00Z", "2026-01-01T00:29:59.999Z", None),
    # many missed ticks: only the latest runs
    ("*/10 * * * *", "UTC", "2025-12-31T09:00:00Z", "2026-01-01T00:25:00Z", "2026-01-01T00:20:00Z"),
    ("* * * * *", "UTC", "2025-01-01T00:00:00Z", "2026-01-01T00:00:30Z", "2026-01-01T00:00:00Z"),
    # a claim from the future (clock skew between workers) makes nothing due
    ("*/10 * * * *", "UTC", "2026-01-01T00:30:00Z", "2026-01-01T00:25:00Z", None),
    ("0 9 * * 1-5", "UTC", "2026-03-06T09:00:00Z", "2026-03-09T08:59:00Z", None),
    ("0 9 * * 1-5", "UTC", "2026-03-06T09:00:00Z", "2026-03-09T09:00:00Z", "2026-03-09T09:00:00Z"),
    ("0 9 * * 1-5", "UTC", None, "2026-03-08T12:00:00Z", "2026-03-06T09:00:00Z"),
    ("0 0 1 1 *", "UTC", "2020-01-01T00:00:00Z", "2026-06-01T00:00:00Z", "2026-01-01T00:00:00Z"),
    ("0 0 1 1 *", "UTC", "2026-01-01T00:00:00Z", "2026-06-01T00:00:00Z", None),
    ("0 0 29 2 *", "UTC", None, "2104-03-01T00:00:00Z", "2104-02-29T00:00:00Z"),
    ("0 0 29 2 *", "UTC", "2096-02-29T00:00:00Z", "2103-12-31T00:00:00Z", None),
    # daylight saving changes
    (
        "*/30 * * * *",
        "Europe/Berlin",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:10:00+01:00",
        "2026-10-25T02:00:00+01:00",
    ),
    (
        "30 2 * * *",
        "Europe/Berlin",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:45:00+01:00",
        None,
    ),
    (
        "30 2 * * *",
        "Europe/Berlin",
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T03:00:00+02:00",
    ),
    # interval schedules
    (timedelta(seconds=5), "UTC", None, "2026-01-01T00:00:12Z", "2026-01-01T00:00:10Z"),
    (
        timedelta(seconds=5),
        "UTC",
        "2026-01-01T00:00:05Z",
        "2026-01-01T00:00:12Z",
        "2026-01-01T00:00:10Z",
    ),
    (timedelta(seconds=5), "UTC", "2026-01-01T00:00:05Z", "2026-01-01T00:00:09Z", None),
    (timedelta(seconds=5), "UTC", "2026-01-01T00:00:10Z", "2026-01-01T00:00:10Z", None),
    (
        timedelta(hours=1),
        "UTC",
        "2025-06-01T00:00:00Z",
        "2026-01-01T05:30:00Z",
        "2026-01-01T05:00:00Z",
    ),
]


@pytest.mark.parametrize(("schedule", "tz", "last_claimed", "now", "expected"), DUE_TICKS)
def test_due_tick_skips_to_the_latest_fire_time_not_yet_claimed(
    schedule: str | timedelta, tz: str, last_claimed: str | None, now: str, expected: str | None
) -> None:
    last = None if last_claimed is None else at(last_claimed)
    due = due_tick(job(schedule, tz), last, at(now))
    assert due == (None if expected is None else at(expected))


# -- validation ---------------------------------------------------------------------------------

INVALID_SCHEDULES = [
    # (schedule, part of the message)
    ("*/61 * * * *", "step 61 in the minute field"),
    ("0 */25 * * *", "step 25 in the hour field"),
    ("0 0 */32 * *", "step 32 in the day-of-month field"),
    ("0 0 1 */13 *", "step 13 in the month field"),
    ("0 0 * * */8", "step 8 in the day-of-week field"),
    ("60 * * * *", "out of range"),
    ("0 24 * * *", "out of range"),
    ("0 0 0 * *", "out of range"),
    ("0 0 32 * *", "out of range"),
    ("0 0 * 13 *", "out of range"),
    ("0 0 * * 8", "out of range"),
    ("1-70 * * * *", "invalid schedule"),
    ("*/0 * * * *", "step"),
    ("foo * * * *", "invalid schedule"),
    ("0 9 * * funday", "invalid schedule"),
    ("", "empty"),
    ("   ", "empty"),
    ("* * * *", "4 fields, expected 5"),
    ("* * * * * * * *", "8 fields, expected 5"),
    ("*/10 * * * * *", "timedelta"),
    ("0 0 12 * * * 2026", "timedelta"),
    ("@reboot", "unknown macro"),
    ("@every 5m", "unknown macro"),
    ("R * * * *", "random (R)"),
    ("H * * * *", "hashed (H)"),
    ("0 H(0-5) * * *", "in the hour field"),
    ("H/15 * * * *", "hashed (H)"),
    ("0 0 30 2 *", "can never occur"),
    ("0 0 31 4 *", "can never occur"),
    ("0 0 31 2,4,6 *", "can never occur"),
]


@pytest.mark.parametrize(("schedule", "reason"), INVALID_SCHEDULES)
def test_an_invalid_cron_expression_is_refused_with_a_message_naming_the_job(
    schedule: str, reason: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        cron(schedule, poll_github)
    message = str(caught.value)
    assert message.startswith("cron job 'poll_github': invalid schedule")
    assert reason in message


def test_the_example_message_for_an_impossible_step_reads_well() -> None:
    with pytest.raises(ConfigurationError, match=r"^cron job 'poll_github': invalid schedule "):
        cron("*/61 * * * *", poll_github)


def test_a_seconds_field_is_refused_with_a_hint_to_use_a_timedelta() -> None:
    with pytest.raises(ConfigurationError, match=r"seconds.*timedelta\(seconds=10\)"):
        cron("*/10 * * * * *", poll_github)


INVALID_OPTIONS: list[tuple[dict[str, Any], str]] = [
    # (arguments to cron(), part of the message)
    ({"timezone": "Mars/Olympus_Mons"}, "unknown timezone 'Mars/Olympus_Mons'"),
    ({"timezone": "Europe/Berlinn"}, "unknown timezone"),
    ({"timezone": ""}, "unknown timezone"),
    ({"timezone": "../../etc/passwd"}, "unknown timezone"),
    ({"timezone": 5}, "timezone must be"),
    ({"schedule": timedelta(0)}, "at least 1 second"),
    ({"schedule": timedelta(seconds=-5)}, "at least 1 second"),
    ({"schedule": timedelta(milliseconds=500)}, "at least 1 second"),
    ({"schedule": timedelta(milliseconds=999)}, "at least 1 second"),
    ({"schedule": timedelta(seconds=1, microseconds=1)}, "whole number of milliseconds"),
    ({"schedule": 60}, "schedule must be"),
    ({"schedule": None}, "schedule must be"),
    ({"func": sync_task, "name": "poll_github"}, "not a coroutine function"),
    ({"func": lambda: None, "name": "poll_github"}, "not a coroutine function"),
    ({"timeout": 0}, "timeout must be"),
    ({"timeout": -1.5}, "timeout must be"),
    ({"timeout": math.nan}, "timeout must be"),
    ({"timeout": "10"}, "timeout must be"),
    ({"retries": -1}, "retries must be"),
    ({"retries": 1.5}, "retries must be"),
    ({"retries": True}, "retries must be"),
]


@pytest.mark.parametrize(("options", "reason"), INVALID_OPTIONS)
def test_invalid_options_are_refused_eagerly_with_a_message_naming_the_job(
    options: dict[str, Any], reason: str
) -> None:
    arguments: dict[str, Any] = {"schedule": "*/10 * * * *", "func": poll_github, **options}
    schedule, func = arguments.pop("schedule"), arguments.pop("func")
    with pytest.raises(ConfigurationError) as caught:
        cron(schedule, func, **arguments)
    message = str(caught.value)
    assert message.startswith("cron job 'poll_github'")
    assert reason in message


def test_a_sync_function_is_refused_under_its_own_name() -> None:
    with pytest.raises(ConfigurationError, match=r"^cron job 'sync_task': .*async def"):
        cron("* * * * *", sync_task)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "poll github", "tab\there"])
def test_an_empty_name_or_one_with_spaces_is_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="name"):
        cron("* * * * *", poll_github, name=name)


def test_constructing_a_cron_job_directly_validates_it_too() -> None:
    with pytest.raises(ConfigurationError, match=r"^cron job 'direct': invalid schedule"):
        CronJob(name="direct", func=poll_github, schedule="*/61 * * * *")


def test_duplicate_cron_job_names_are_refused_naming_the_duplicate() -> None:
    jobs = [
        cron("* * * * *", poll_github),
        cron("0 * * * *", other_task),
        cron("@daily", other_task, name="poll_github"),
    ]
    with pytest.raises(ConfigurationError, match=r"cron job 'poll_github' is defined more than"):
        validate_unique_names(jobs)


def test_distinct_cron_job_names_pass_validation() -> None:
    validate_unique_names([])
    validate_unique_names(
        [
            cron("* * * * *", poll_github),
            cron("* * * * *", poll_github, name="poll_github_fast"),
            cron(timedelta(seconds=5), other_task),
        ]
    )


# -- definitions that are accepted --------------------------------------------------------------


class TaskObject:
    """Looks like a registered task: a name, and the coroutine function as ``func``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.func = other_task

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self.func(*args, **kwargs)


def test_the_name_defaults_to_the_function_name() -> None:
    assert cron("* * * * *", poll_github).name == "poll_github"


def test_the_name_defaults_to_a_task_objects_name_and_its_func_is_accepted() -> None:
    task = TaskObject("reports.nightly")
    cron_job = cron("0 3 * * *", task)
    assert cron_job.name == "reports.nightly"
    assert cron_job.func is task


def test_an_explicit_name_wins() -> None:
    assert cron("* * * * *", TaskObject("t"), name="custom").name == "custom"


def test_options_are_stored_and_kwargs_are_an_immutable_copy() -> None:
    given_kwargs = {"x": 1}
    cron_job = cron(
        timedelta(seconds=30),
        other_task,
        name="sync_orders",
        timezone="Europe/Berlin",
        args=[1, 2],
        kwargs=given_kwargs,
        unique=False,
        timeout=12.5,
        retries=3,
    )
    given_kwargs["x"] = 2
    assert cron_job.args == (1, 2)
    assert cron_job.kwargs == {"x": 1}
    assert isinstance(cron_job.kwargs, MappingProxyType)
    assert cron_job.timezone == ZoneInfo("Europe/Berlin")
    assert (cron_job.unique, cron_job.timeout, cron_job.retries) == (False, 12.5, 3)


def test_defaults_are_unique_runs_no_timeout_no_retries_and_utc() -> None:
    cron_job = cron("* * * * *", poll_github)
    assert cron_job.args == ()
    assert dict(cron_job.kwargs) == {}
    assert (cron_job.unique, cron_job.timeout, cron_job.retries) == (True, None, 0)
    assert cron_job.timezone.utcoffset(datetime(2026, 7, 1)) == timedelta(0)


def test_whitespace_in_a_cron_expression_is_normalised() -> None:
    assert cron("  */5   *  * * *\t", poll_github).schedule == "*/5 * * * *"


@pytest.mark.parametrize(
    ("schedule", "tz", "expected"),
    [
        ("*/10 * * * *", "UTC", "*/10 * * * *"),
        ("@daily", "UTC", "@daily"),
        ("0 9 * * 1-5", "Europe/Berlin", "0 9 * * 1-5 (Europe/Berlin)"),
        (timedelta(seconds=5), "UTC", "every 5s"),
        (timedelta(seconds=1), "Europe/Berlin", "every 1s"),
        (timedelta(seconds=90), "UTC", "every 1m30s"),
        (timedelta(hours=1), "UTC", "every 1h"),
        (timedelta(days=1, hours=12), "UTC", "every 1d12h"),
        (timedelta(milliseconds=1500), "UTC", "every 1s500ms"),
    ],
)
def test_describe_reads_as_the_schedule(schedule: str | timedelta, tz: str, expected: str) -> None:
    assert job(schedule, tz).describe() == expected


# -- properties ---------------------------------------------------------------------------------

SCHEDULES = [
    ("*/10 * * * *", "UTC"),
    ("*/15 * * * *", "Europe/Berlin"),
    ("0 * * * *", "Europe/Berlin"),
    ("30 2 * * *", "Europe/Berlin"),
    ("*/20 2 * * *", "Europe/Berlin"),
    ("0 9 * * 1-5", "America/New_York"),
    ("30 1 * * *", "America/New_York"),
    ("0 0 L * *", "UTC"),
    ("0 0 29 2 *", "UTC"),
    ("0 * * * *", "Australia/Lord_Howe"),
    ("0 0 * * *", "America/Sao_Paulo"),
    ("0 12 * * *", "Pacific/Apia"),
    ("@weekly", "Asia/Kolkata"),
]

moments = st.datetimes(
    min_value=datetime(1995, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=300, deadline=None)
@given(schedule=st.sampled_from(SCHEDULES), after=moments)
def test_fire_times_are_strictly_increasing_and_each_is_the_next_after_the_previous(
    schedule: tuple[str, str], after: datetime
) -> None:
    cron_job = job(*schedule)
    fires = cron_job.fire_times(after, 6)
    assert fires[0] == cron_job.next_fire(after)
    assert fires[0] > after
    assert all(earlier < later for earlier, later in pairwise(fires))
    assert all(cron_job.next_fire(earlier) == later for earlier, later in pairwise(fires))
    assert all(fire.tzinfo is UTC for fire in fires)


@settings(max_examples=150, deadline=None)
@given(schedule=st.sampled_from(SCHEDULES), after=moments)
def test_due_tick_agrees_with_the_fire_times(schedule: tuple[str, str], after: datetime) -> None:
    cron_job = job(*schedule)
    fires = cron_job.fire_times(after, 4)
    tiny = timedelta(microseconds=1)
    for earlier, fire, later in zip(fires, fires[1:], fires[2:], strict=False):
        assert due_tick(cron_job, None, fire) == fire
        assert due_tick(cron_job, earlier, fire) == fire
        assert due_tick(cron_job, earlier, later - tiny) == fire
        assert due_tick(cron_job, fire, later - tiny) is None


@settings(max_examples=200, deadline=None)
@given(
    schedule=st.sampled_from(["*/10 * * * *", "0 9 * * 1-5", "0 0 L * *", "@hourly"]),
    after=moments,
)
def test_in_utc_the_fire_times_are_exactly_croniters(schedule: str, after: datetime) -> None:
    expected = croniter(schedule, after, ret_type=datetime)
    assert job(schedule).fire_times(after, 5) == [expected.get_next(datetime) for _ in range(5)]


@settings(max_examples=200, deadline=None)
@given(
    zone=st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Sydney"]),
    after=moments,
)
def test_a_quarter_hourly_job_fires_every_real_quarter_hour_whatever_the_clocks_do(
    zone: str, after: datetime
) -> None:
    fires = job("*/15 * * * *", zone).fire_times(after, 12)
    assert all(later - earlier == timedelta(minutes=15) for earlier, later in pairwise(fires))


@settings(max_examples=300, deadline=None)
@given(
    interval_ms=st.integers(min_value=1000, max_value=2 * 86_400_000),
    after=moments,
)
def test_an_interval_ticks_on_multiples_of_itself_since_the_epoch(
    interval_ms: int, after: datetime
) -> None:
    interval = timedelta(milliseconds=interval_ms)
    cron_job = job(interval)
    fire = cron_job.next_fire(after)
    assert after < fire <= after + interval
    assert (fire - EPOCH) % interval == timedelta(0)
    assert cron_job.fire_times(after, 3) == [fire, fire + interval, fire + 2 * interval]
    assert due_tick(cron_job, None, fire + interval - timedelta(microseconds=1)) == fire
