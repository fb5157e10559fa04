"""The ACL rights each role (producer, worker, monitor, operator) needs, derived from the
commands the broker and its Lua scripts send, and the harmless probes that check them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

from aioqueue.brokers.redis import scripts

_CALL = re.compile(r"redis\.p?call\(\s*'([A-Za-z]+)'(?:\s*,\s*'([A-Za-z]+)')?")
_FUNCTION = re.compile(r"^local function (\w+)\(", re.MULTILINE)
_CONTAINERS = frozenset({"xgroup", "xinfo", "script", "client", "object", "config"})


_COMMENT = re.compile(r"--[^\n]*")


def _code(source: str) -> str:
    """Lua source without its comments (which mention helpers they do not call)."""
    return _COMMENT.sub("", source)


def _calls(source: str) -> set[str]:
    found = set()
    for command, sub in _CALL.findall(source):
        command = command.lower()
        if command in _CONTAINERS and sub:
            command = f"{command}|{sub.lower()}"
        found.add(command)
    return found


@cache
def _preamble_commands() -> frozenset[str]:
    """The commands ``_prelude.lua`` runs before its first helper: every script runs them."""
    source = _code(scripts._read(scripts.PRELUDE))
    first = _FUNCTION.search(source)
    return frozenset(_calls(source[: first.start() if first else len(source)]))


@cache
def _prelude_commands() -> dict[str, frozenset[str]]:
    """The commands each helper of ``_prelude.lua`` runs, helpers it calls included."""
    source = _code(scripts._read(scripts.PRELUDE))
    starts = [(m.start(), m[1]) for m in _FUNCTION.finditer(source)]
    bodies = {
        name: source[start : starts[i + 1][0] if i + 1 < len(starts) else len(source)]
        for i, (start, name) in enumerate(starts)
    }
    direct = {name: _calls(body) for name, body in bodies.items()}
    resolved: dict[str, frozenset[str]] = {}
    for name in bodies:
        found, todo = set(), [name]
        while todo:
            helper = todo.pop()
            if helper in found:
                continue
            found.add(helper)
            todo += [h for h in bodies if h != helper and re.search(rf"\b{h}\(", bodies[helper])]
        resolved[name] = frozenset(c for helper in found for c in direct[helper])
    return resolved


@cache
def script_commands(name: str) -> frozenset[str]:
    """Every command script ``name`` may run (ACL names: ``hset``, ``xgroup|create``),
    the prelude helpers it calls included."""
    body = _code(scripts._read(name))
    commands = _calls(body) | _preamble_commands()
    for helper, used in _prelude_commands().items():
        if re.search(rf"\b{helper}\(", body):
            commands |= used
    return frozenset(commands)


OPTIONAL = frozenset({"spublish"})
"""Commands scripts only run with ``redis.pcall``, whose refusal does not stop the script (a
waiter re-checks its job on its own): a user without channel rights still enqueues and
settles, so the rights check before a script's first run leaves them out."""


ROLES = ("producer", "worker", "monitor", "operator")
"""The roles aioqueue knows the ACL rights of (``Securing Redis`` in docs/deploying.md):
a producer enqueues, waits for results and aborts jobs; a worker runs them; a monitor only
reads (``aioqueue info``, ``check``, ``job``, ``dlq list``/``show``, ``cron list``); an
operator also requeues and purges dead letters, pauses and resumes and purges the queue."""

# Commands each role sends itself (its scripts' commands are added from their source).
# Every role connects with TIME (the shared clock), EXISTS (the key check) and PING (redis-py's
# health checks); INFO tells the server version and configuration, which producers skip.
# WAIT confirms writes on replicas (the wait_replicas setting).
_DIRECT = {
    "producer": (
        "time",
        "ping",
        "exists",
        "hget",
        "hgetall",
        "ssubscribe",
        "xrange",
        "xrevrange",
        "xread",
        "wait",
    ),
    "worker": (
        "info",
        "time",
        "wait",
        "ping",
        "exists",
        "ssubscribe",
        "xreadgroup",
        "xautoclaim",
        "xpending",
        "xrange",
        "xack",
        "xdel",
        "xlen",
        "xinfo|groups",
        "xinfo|consumers",
        "xinfo|stream",
        "xadd",
        "hget",
        "hset",
        "del",
        "pexpire",
        "zadd",
        "zrem",
        "zcard",
        "zrange",
        "zrangebyscore",
        "zremrangebyscore",
        "smembers",
        "multi",
        "exec",
    ),
    "monitor": (
        "info",
        "time",
        "ping",
        "exists",
        "hget",
        "hgetall",
        "hmget",
        "xlen",
        "xpending",
        "xinfo|groups",
        "xrange",
        "xrevrange",
        "xread",
        "zcard",
        "zrange",
        "zrevrange",
        "zmscore",
        "smembers",
        "get",
    ),
}
_DIRECT["operator"] = (*_DIRECT["monitor"], "scan", "unlink", "set", "del")
ROLE_SCRIPTS = {
    "producer": ("abort", "enqueue", "keyed", "partitions", "watch"),
    "worker": (
        "begin",
        "cron_claim",
        "ensure_group",
        "fetch",
        "forget_consumers",
        "partitions",
        "progress",
        "promote",
        "release",
        "renew",
        "settle",
    ),
    "monitor": (),
    "operator": ("abort", "partitions", "purge_dead", "requeue"),
}
# What a role that runs scripts needs besides their commands: EVALSHA, SCRIPT LOAD (after a
# restart of Redis) and MULTI, which the rights check below queues its probes in.
SCRIPTING = ("evalsha", "script|load", "multi")


def role_commands(role: str) -> list[str]:
    """Every command ``role`` sends, as ACL names, sorted."""
    commands = set(_DIRECT[role])
    for name in ROLE_SCRIPTS[role]:
        commands |= script_commands(name)
    if ROLE_SCRIPTS[role]:
        commands |= set(SCRIPTING)
    return sorted(commands)


CLUSTER = ("cluster|slots", "command", "asking")
"""What every role needs besides on a Redis Cluster: redis-py reads the slot map and the
commands' key positions when it connects, and ASKING follows a slot being moved."""


def acl_rules(role: str, queues: Iterable[str], *, cluster: bool = False) -> str:
    """The ACL rules that let ``role`` use ``queues``: their keys (read-only for a monitor),
    their channels if it needs any, and exactly its commands (with ``cluster``, those a
    Redis Cluster client needs too). For a user that has no other rights:
    ``ACL SETUSER <name> reset on ><password> <rules>``."""
    commands = sorted({*role_commands(role), *(CLUSTER if cluster else ())})
    key_rule = "%R~" if role == "monitor" else "~"
    rules = [f"{key_rule}aioqueue:{{{queue}}}:*" for queue in queues]
    if {"spublish", "ssubscribe"} & set(commands):
        rules += [f"&aioqueue:{{{queue}}}:*" for queue in queues]
    return " ".join([*rules, *(f"+{c}" for c in commands)])


# A harmless form of each command: probes are queued inside MULTI, never run (see _probe).
_PROBES: dict[str, tuple[str, ...]] = {
    "del": ("K",),
    "exists": ("K",),
    "get": ("K",),
    "set": ("K", "1"),
    "pexpire": ("K", "1"),
    "persist": ("K",),
    "pttl": ("K",),
    "unlink": ("K",),
    "hdel": ("K", "f"),
    "hexists": ("K", "f"),
    "hget": ("K", "f"),
    "hgetall": ("K",),
    "hincrby": ("K", "f", "1"),
    "hkeys": ("K",),
    "hmget": ("K", "f"),
    "hset": ("K", "f", "v"),
    "hsetnx": ("K", "f", "v"),
    "hstrlen": ("K", "f"),
    "xack": ("K", "g", "0-1"),
    "xadd": ("K", "*", "f", "v"),
    "xautoclaim": ("K", "g", "c", "0", "0-0"),
    "xclaim": ("K", "g", "c", "0", "0-1"),
    "xdel": ("K", "0-1"),
    "xgroup|create": ("CREATE", "K", "g", "0"),
    "xgroup|delconsumer": ("DELCONSUMER", "K", "g", "c"),
    "xinfo|consumers": ("CONSUMERS", "K", "g"),
    "xinfo|groups": ("GROUPS", "K"),
    "xinfo|stream": ("STREAM", "K"),
    "xlen": ("K",),
    "xpending": ("K", "g"),
    "xrange": ("K", "-", "+"),
    "xrevrange": ("K", "+", "-"),
    "xread": ("STREAMS", "K", "0-0"),
    "xreadgroup": ("GROUP", "g", "c", "STREAMS", "K", ">"),
    "sadd": ("K", "m"),
    "smembers": ("K",),
    "zadd": ("K", "1", "m"),
    "zrank": ("K", "m"),
    "zcard": ("K",),
    "zmscore": ("K", "m"),
    "zrange": ("K", "0", "0"),
    "zrangebyscore": ("K", "0", "0"),
    "zrem": ("K", "m"),
    "zremrangebyscore": ("K", "0", "0"),
    "zrevrange": ("K", "0", "0"),
    "zscore": ("K", "m"),
    "spublish": ("C", "probe"),
    "ssubscribe": ("C",),
    "info": ("server",),
    "time": (),
    "wait": ("0", "0"),
    "cluster|slots": ("SLOTS",),
    "command": ("COUNT",),
    "asking": (),
    "ping": (),
    "scan": ("0",),
    "script|load": ("LOAD", "return 1"),
    "evalsha": ("0" * 40, "0"),
}
# Checked outside the transaction, where they cannot run anything: EVALSHA of a script that
# does not exist answers NOSCRIPT, EXEC without MULTI an error; both say NOPERM if refused.
OUTSIDE = ("evalsha", "exec")
# Commands whose probe may really run (it changes nothing): a role without MULTI (a monitor)
# is checked with them.
READS = frozenset(
    {
        "asking",
        "cluster|slots",
        "command",
        "exists",
        "get",
        "hexists",
        "hget",
        "hgetall",
        "hkeys",
        "hmget",
        "hstrlen",
        "info",
        "ping",
        "pttl",
        "scan",
        "smembers",
        "time",
        "xinfo|consumers",
        "xinfo|groups",
        "xinfo|stream",
        "xlen",
        "xpending",
        "xrange",
        "xrevrange",
        "xread",
        "zcard",
        "zmscore",
        "zrange",
        "zrangebyscore",
        "zrevrange",
        "zscore",
    }
)


def probe_command(command: str, key: str, channel: str) -> tuple[str, ...]:
    """The harmless form of ``command`` (an ACL name) on ``key`` and ``channel``."""
    name = command.partition("|")[0].upper()
    if command in ("exec", "multi"):
        return (name,)
    args = _PROBES[command]
    return (name, *(key if a == "K" else channel if a == "C" else a for a in args))
