"""The Lua scripts, one per state change, loaded from the ``lua/`` directory.

Each file starts with a header giving its KEYS, ARGV, return value and the invariant it
keeps. ``lua/_prelude.lua`` holds the helpers they share; it is put in front of every script
here, so each script is still one self-contained EVALSHA (no Redis Functions library to
install or version). Scripts whose net effect frees memory (begin, settle, renew, ...) start
with ``#!lua flags=allow-oom`` so workers can drain a Redis that hit ``maxmemory``; enqueue
has no such flag, so producers get "out of memory" instead. The broker's modules hold one
typed method per script.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

NAMES = (
    "abort",
    "begin",
    "cron_claim",
    "enqueue",
    "ensure_group",
    "fetch",
    "forget_consumers",
    "keyed",
    "partitions",
    "progress",
    "promote",
    "purge_dead",
    "release",
    "renew",
    "requeue",
    "settle",
    "watch",
)

PRELUDE = "_prelude"
"""Helpers every script shares (Redis's clock, ack, notify), put in front of each script."""


@cache
def source(name: str) -> str:
    """The Lua source of script ``name``."""
    if name not in NAMES:
        raise KeyError(name)
    body = _read(name)
    # A shebang (script flags, e.g. allow-oom) must stay the first line.
    if body.startswith("#!"):
        flags, _, rest = body.partition("\n")
        return f"{flags}\n{_read(PRELUDE)}{rest}"
    return _read(PRELUDE) + body


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")
