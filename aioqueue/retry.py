"""Retry policy: how long to wait before the next attempt.

Backoff is exponential with *full jitter* (a uniform draw between 0 and the exponential
ceiling), which spreads a burst of failures out instead of retrying them in lock-step. The
delay is computed here, but the waiting happens in Redis: a retried job sits in the queue's
delayed set until it is due, so no worker holds it in memory.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from aioqueue.errors import ConfigurationError, Fail, Retry

__all__ = ["Backoff", "Fail", "Retry"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff: attempt ``n`` waits up to ``min(cap, base * factor ** (n - 1))``.

    With ``jitter=True`` (the default) the wait is drawn uniformly from ``[0, ceiling]``;
    with ``jitter=False`` it is exactly the ceiling, which is useful when a downstream service
    asks for a fixed schedule.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0:
            raise ConfigurationError("Backoff base and cap must be >= 0")
        if self.factor < 1:
            raise ConfigurationError("Backoff factor must be >= 1")

    def ceiling(self, attempt: int) -> float:
        """The longest wait after failed attempt number ``attempt`` (1-based)."""
        exponent = max(attempt - 1, 0)
        # Avoid float overflow for absurd attempt numbers: past the cap it no longer matters.
        if self.factor > 1 and exponent > 64:
            return self.cap
        return float(min(self.cap, self.base * self.factor**exponent))

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt ``attempt``; ``rng`` returns floats in [0, 1)."""
        ceiling = self.ceiling(attempt)
        return ceiling * rng() if self.jitter else ceiling
