"""Every knob aioqueue has, its default, and where its value comes from.

Precedence, lowest to highest: the defaults below, values given in code (``Queue(...)``,
``queue.worker(...)``, a settings class), environment variables, command-line flags. The
environment beats code so one image can be configured per deployment (12-factor):
``AIOQUEUE_REDIS_URL``, ``AIOQUEUE_CONCURRENCY``, ``AIOQUEUE_LEASE`` and so on, one variable
per field, named ``AIOQUEUE_`` + the field name in upper case. A misspelt variable or keyword
is an error, never silently ignored. Nothing is read at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from aioqueue.errors import ConfigurationError

__all__ = ["ENV_PREFIX", "Settings", "resolve_settings"]

ENV_PREFIX = "AIOQUEUE_"

_Positive = msgspec.Meta(gt=0)
QUEUE_NAME = r"^[\w.:-]{1,100}$"
LOG_LEVEL = r"(?i)^(debug|info|warning|error|critical)$"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The complete configuration of a queue and the workers that consume it."""

    redis_url: str = "redis://localhost:6379/0"
    """Where Redis is: ``redis://``, ``rediss://`` (TLS) or ``unix://``; ACL user in the URL."""
    queue: Annotated[str, msgspec.Meta(pattern=QUEUE_NAME)] = "default"
    """Queue name: 1 to 100 letters (any script), digits, ``_ . : -``. All keys of a queue
    share the hash tag ``{queue}`` and the name is part of every key and channel, so braces
    and spaces, which would break both, are refused."""
    max_size: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Most unfinished jobs (ready + running + delayed) the queue accepts; 0 means no limit."""
    max_payload_bytes: Annotated[int, _Positive] = 1_048_576
    """Largest encoded job accepted at enqueue."""
    result_ttl: Annotated[float, _Positive] = 86_400.0
    """Seconds a finished job (status and result) is kept. Dead letters are kept until purged."""
    concurrency: Annotated[int, msgspec.Meta(ge=1)] = 100
    """Jobs one worker process runs at the same time."""
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
    allow_eviction: bool = False
    """Start workers even when Redis's ``maxmemory-policy`` evicts keys. Eviction deletes
    jobs at random, so this breaks every guarantee; it exists for throwaway setups."""


_FIELDS = frozenset(Settings.__struct_fields__)


def resolve_settings(
    code: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from code values, the environment and explicit overrides.

    ``code`` entries that are ``None`` mean "not given". ``overrides`` (command-line flags)
    win over everything. Raises :class:`ConfigurationError` for unknown names or bad values.
    """
    values: dict[str, Any] = {}
    for source, label in ((code, "argument"), (overrides, "option")):
        for name in source or {}:
            if name not in _FIELDS:
                known = ", ".join(sorted(_FIELDS))
                raise ConfigurationError(f"unknown setting {label} {name!r}; known: {known}")
    values.update({k: v for k, v in (code or {}).items() if v is not None})
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
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"invalid setting: {exc}") from exc
