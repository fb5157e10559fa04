"""Backoff is a pure function: a table of attempts and ceilings."""

from __future__ import annotations

import pytest

from aioqueue import Backoff, ConfigurationError


@pytest.mark.parametrize(
    ("backoff", "attempt", "ceiling"),
    [
        (Backoff(), 1, 1.0),
        (Backoff(), 2, 2.0),
        (Backoff(), 3, 4.0),
        (Backoff(), 9, 256.0),
        (Backoff(), 10, 300.0),
        (Backoff(), 10_000, 300.0),
        (Backoff(base=0.5, factor=3), 3, 4.5),
        (Backoff(base=2, factor=1), 50, 2.0),
        (Backoff(base=1, cap=10), 5, 10.0),
        (Backoff(base=0), 4, 0.0),
    ],
)
def test_ceiling_grows_exponentially_up_to_the_cap(
    backoff: Backoff, attempt: int, ceiling: float
) -> None:
    assert backoff.ceiling(attempt) == ceiling


@pytest.mark.parametrize("draw", [0.0, 0.25, 0.5, 0.999])
def test_full_jitter_draws_between_zero_and_the_ceiling(draw: float) -> None:
    assert Backoff().delay(4, rng=lambda: draw) == pytest.approx(8.0 * draw)


def test_without_jitter_the_delay_is_the_ceiling() -> None:
    assert Backoff(jitter=False).delay(3, rng=lambda: 0.0) == 4.0


@pytest.mark.parametrize("kwargs", [{"base": -1}, {"factor": 0.5}, {"cap": -2}])
def test_nonsense_backoff_is_a_configuration_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        Backoff(**kwargs)
