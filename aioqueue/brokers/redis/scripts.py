"""The Lua scripts, one per state change, loaded from the ``lua/`` directory.

Each file starts with a header giving its KEYS, ARGV, return value and the invariant it
keeps. :class:`~aioqueue.brokers.redis.broker.RedisBroker` holds one typed method per script.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

NAMES = (
    "abort",
    "begin",
    "cron_claim",
    "enqueue",
    "promote",
    "purge_dead",
    "release",
    "renew",
    "requeue",
    "settle_done",
    "settle_fail",
    "settle_retry",
    "watch",
)


@cache
def source(name: str) -> str:
    """The Lua source of script ``name``."""
    if name not in NAMES:
        raise KeyError(name)
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")
