"""Every knob aioqueue has, its default, and where its value comes from.

Precedence, lowest to highest: the defaults below, values given in code (``Queue(...)``,
``queue.worker(...)``, a settings class), environment variables, command-line flags. The
environment beats code so one image can be configured per deployment (12-factor):
``AIOQUEUE_REDIS_URL``, ``AIOQUEUE_CONCURRENCY``, ``AIOQUEUE_LEASE`` and so on, one variable
per field, named ``AIOQUEUE_`` + the field name in upper case. A misspelt variable or keyword
is an error, never silently ignored. Nothing is read at import time.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

import msgspec

from aioqueue.errors import ConfigurationError
from aioqueue.topology import CLUSTER_SCHEMES, SENTINEL_SCHEMES, parse_topology

__all__ = ["ENV_PREFIX", "Settings", "mask_credentials", "mask_url", "resolve_settings"]

ENV_PREFIX = "AIOQUEUE_"

_Positive = msgspec.Meta(gt=0)
QUEUE_NAME = r"^[\w.:-]{1,100}$"
LOG_LEVEL = r"(?i)^(debug|info|warning|error|critical)$"
SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES, *CLUSTER_SCHEMES, "memory")
"""The schemes ``redis_url`` accepts (``memory`` is the in-process store for tests)."""
MAX_DB = 2**31 - 1
"""Redis refuses larger database indexes (a smaller one above the server's ``databases``
is refused when connecting)."""
SECRET_FIELDS = frozenset({"signing_key"})
"""Settings shown as ``***`` by ``repr(settings)`` (the password in ``redis_url`` is masked
too)."""


def mask_url(url: str) -> str:
    """``url`` safe to show: the password replaced by ``***``.

    ``redis://app:s3cret@host:6379/0`` becomes ``redis://app:***@host:6379/0``. A lone
    ``redis://token@host`` is masked whole (``redis://***@host``): redis-py takes it as a user
    name, but it is usually a password put where the user goes. A ``password=`` query
    parameter is masked too. Everything between ``://`` and the last ``@`` counts as
    credentials, so an unencoded ``/`` or ``@`` in a password never leaks a piece of it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, location = rest.rpartition("@")
    masked = f"{_mask_userinfo(userinfo)}@{location}" if at else rest
    return _PASSWORD_PARAM.sub(r"\g<1>***", f"{scheme}://{masked}")


def mask_credentials(text: str) -> str:
    """``text`` (a message, a log line) with every URL in it masked as by :func:`mask_url`."""
    if "://" in text:
        text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{_mask_userinfo(m['userinfo'])}@", text)
    return _PASSWORD_PARAM.sub(r"\g<1>***", text) if "password=" in text.lower() else text


# \b: a scheme starts a word. Without it every position of a long word (a 100 KB job id
# in a log line) starts a failing match: quadratic time in the log formatter.
_URL_USERINFO = re.compile(r"\b(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>\S*)@")
_PASSWORD_PARAM = re.compile(r"(?i)([?&]password=)[^&#\s'\"]*")


def _mask_userinfo(userinfo: str) -> str:
    user, colon, _ = userinfo.partition(":")
    return f"{user}:***" if colon else "***"


def redis_url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a ``redis_url``, seen without connecting: its scheme,
    port, database index or socket path (None if nothing). Connection options in the query
    string are checked by the Redis broker."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        return (
            "it must start with redis://, rediss:// (TLS), unix://, redis+sentinel:// or "
            "redis+cluster:// (memory:// selects the in-process store)"
        )
    if scheme.lower() == "memory":
        return None
    if "+" in scheme:
        try:
            parse_topology(url)
        except ValueError as exc:
            return str(exc)
        return None
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return (
            "the port must be a number from 0 to 65535 (percent-encode any of : / @ ? # "
            "in the password)"
        )
    if scheme.lower() == "unix" and not parts.path:
        return "a unix:// URL needs the socket's path, like unix:///run/redis/redis.sock?db=0"
    query = urllib.parse.parse_qs(parts.query)
    if "db" in query:
        db = query["db"][0]
    elif scheme.lower() != "unix" and parts.path not in ("", "/"):
        match = re.fullmatch(r"/([^/]*)/?", urllib.parse.unquote(parts.path))
        db = match[1] if match else ""
    else:
        db = "0"
    if not (db.isascii() and db.isdigit() and len(db) <= 10 and int(db) <= MAX_DB):
        return f"the database index must be a number from 0 to {MAX_DB}, like /0 or ?db=0"
    return None


def _shown(name: str, value: Any) -> Any:
    """A setting's value as ``repr()`` shows it: credentials masked."""
    if name == "redis_url" and isinstance(value, str):
        return mask_url(value)
    if name in SECRET_FIELDS and value:
        return "***"
    return value


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The complete configuration of a queue and the workers that consume it."""

    redis_url: str = "redis://localhost:6379/0"
    """Where Redis is: ``redis://``, ``rediss://`` (TLS) or ``unix://``; through Sentinel,
    ``redis+sentinel://host1:26379,host2:26379/mymaster/0``; a Redis Cluster,
    ``redis+cluster://host1:6379,host2:6379``. ACL user and password in the URL."""
    queue: Annotated[str, msgspec.Meta(pattern=QUEUE_NAME)] = "default"
    """Queue name: 1 to 100 letters (any script), digits, ``_ . : -``. All keys of a queue
    share the hash tag ``{queue}`` and the name is part of every key and channel, so braces
    and spaces, which would break both, are refused."""
    partitions: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    """Hash tags the queue is spread over (docs/deploying.md#partitioned-queues): in a Redis
    Cluster, partitions land on different masters. Every producer and worker of a queue
    must say the same number; a queue made with another number is refused."""
    max_size: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Most unfinished jobs (ready + running + delayed) the queue accepts; 0 means no limit.
    A partitioned queue gives each partition an even share (rounded up)."""
    max_payload_bytes: Annotated[int, _Positive] = 1_048_576
    """Largest encoded job accepted at enqueue."""
    result_ttl: Annotated[float, _Positive] = 86_400.0
    """Seconds a finished job (status and result) is kept. Dead letters are kept until purged."""
    events_max_len: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    """Entries kept in the queue's job-event stream (each holds the events of one state
    change, which may cover many jobs); 0 keeps no events."""
    concurrency: Annotated[int, msgspec.Meta(ge=1)] = 100
    """Jobs one worker process runs at the same time."""
    sync_threads: Annotated[int, msgspec.Meta(ge=1)] = 32
    """Threads a worker runs plain ``def`` tasks in; more such jobs wait for a thread. They
    count against ``concurrency`` too, so more threads than that are never used."""
    lease: Annotated[float, _Positive] = 30.0
    """Seconds a delivered job stays owned by a silent worker before another takes it over."""
    max_deliveries: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Deliveries of one attempt (crashes included) before the job is dead-lettered."""
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """Seconds in-flight jobs may finish after SIGTERM before they are cancelled and released."""
    burst: bool = False
    """Exit once the queue (ready and delayed jobs) is empty and nothing runs."""
    poll_interval: Annotated[float, _Positive] = 0.5
    """Longest sleep of the delayed-job promoter when it knows of nothing due sooner."""
    block: Annotated[float, _Positive] = 5.0
    """Seconds one blocking stream read waits before it is reissued."""
    max_connections: Annotated[int, msgspec.Meta(ge=4)] = 64
    """Size of each process's Redis connection pool; callers beyond it wait for a connection."""
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    """Serve Prometheus metrics on this port from each worker (0 = off; needs the
    ``prometheus`` extra)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint binds: loopback unless you choose otherwise (``0.0.0.0``
    for a scraper on another machine)."""
    log_level: Annotated[str, msgspec.Meta(pattern=LOG_LEVEL)] = "INFO"
    """Log level of ``aioqueue run``: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or
    ``CRITICAL`` (any case)."""
    signing_key: str = ""
    """Sign every job with HMAC-SHA256, and have workers dead-letter unsigned or badly signed
    jobs ("bad signature"). Several keys separated by commas: the first signs, each one is
    accepted (key rotation). Producers and workers need the same keys."""
    wait_replicas: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    """Replicas that must confirm each enqueue and each recorded outcome before the call
    returns (Redis ``WAIT``); 0 returns as soon as the primary has it. With 1 or more, an
    acknowledged job or outcome survives the loss of the primary (Sentinel or Cluster
    failover) as long as a confirming replica is promoted. See
    docs/deploying.md#durability-wait_replicas."""
    wait_replicas_timeout: Annotated[float, _Positive] = 1.0
    """Seconds to wait for the replicas of ``wait_replicas``; fewer in that time raises
    :class:`NotReplicated` (the primary has the change; repeating the call is safe)."""
    allow_eviction: bool = False
    """Start workers even when Redis's ``maxmemory-policy`` evicts keys. Eviction deletes
    jobs at random, so this breaks every guarantee; it exists for throwaway setups."""

    def __post_init__(self) -> None:
        problem = redis_url_problem(self.redis_url)
        if problem:
            raise ConfigurationError(f"invalid redis_url {mask_url(self.redis_url)!r}: {problem}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.__rich_repr__())
        return f"Settings({shown})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [(name, _shown(name, getattr(self, name))) for name in self.__struct_fields__]


_FIELDS = frozenset(Settings.__struct_fields__)


def resolve_settings(
    code: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from code values, the environment and explicit overrides.

    ``code`` entries that are ``None`` mean "not given". ``overrides`` (command-line flags)
    win over everything. Raises :class:`ConfigurationError` for unknown names or bad values;
    the message says where the bad value came from (argument, variable or flag).
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, label in ((code, "argument"), (overrides, "option")):
        for name in source or {}:
            if name not in _FIELDS:
                known = ", ".join(sorted(_FIELDS))
                raise ConfigurationError(f"unknown setting {label} {name!r}; known: {known}")
    for name, value in (code or {}).items():
        if value is not None:
            values[name] = value
            origin[name] = f"{name}={_shown(name, value)!r}"
    env = os.environ if environ is None else environ
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in _FIELDS:
            raise ConfigurationError(
                f"unknown environment variable {key}; known: "
                + ", ".join(ENV_PREFIX + f.upper() for f in sorted(_FIELDS))
            )
        values[name] = raw
        origin[name] = f"{key}={_shown(name, raw)!r}"
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
            origin[name] = f"--{name.replace('_', '-')} {_shown(name, value)!r}"
    url = values.get("redis_url")
    if isinstance(url, str):
        problem = redis_url_problem(url)
        if problem:
            raise ConfigurationError(f"invalid redis_url ({origin['redis_url']}): {problem}")
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        detail, _, where = str(exc).rpartition(" - at `$.")
        name = where.rstrip("`")
        if not detail or name not in origin:
            raise ConfigurationError(f"invalid setting: {exc}") from exc
        raise ConfigurationError(
            f"invalid setting {name} ({origin[name]}): {_HINTS.get(name, detail)}"
        ) from exc


def unknown_keywords(
    owner: str, given: Iterable[str], signature_of: Callable[..., Any]
) -> ConfigurationError:
    """The error for keyword arguments ``owner`` does not take (``Queue(url, max_sise=5)``):
    a close match for a typo, where a setting goes instead, and the keywords it takes."""
    accepted = [
        p.name
        for p in inspect.signature(signature_of).parameters.values()
        if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    notes = []
    for name in sorted(given):
        if name in _FIELDS:
            notes.append(
                f"{name!r} is a setting {owner} does not take: set {ENV_PREFIX}{name.upper()}, "
                f"or pass it to queue.worker() for a worker"
            )
            continue
        close = difflib.get_close_matches(name, [*accepted, *sorted(_FIELDS)], n=1)
        notes.append(
            f"unknown keyword {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    return ConfigurationError(
        f"{owner}: {'; '.join(notes)}; it takes {', '.join(accepted)} "
        "(every setting: see aioqueue.Settings)"
    )


_HINTS = {
    "log_level": "expected DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)",
    "queue": "expected 1 to 100 letters, digits or _ . : - (no spaces or braces)",
}
"""Plainer words than a regular expression for the fields checked by a pattern."""
