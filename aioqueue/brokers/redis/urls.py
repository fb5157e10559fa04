"""Checks of a Redis URL before connecting: unknown or misspelt options, TLS options on a
plain URL, files that do not load; each is one ConfigurationError naming it.
"""

from __future__ import annotations

import difflib
import os
import ssl
import urllib.parse

from aioqueue.errors import (
    ConfigurationError,
)
from aioqueue.topology import SENTINEL_SCHEMES

_BOOLEANS = {"1", "0", "true", "false", "yes", "no"}
# Query parameters aioqueue passes on to redis-py, by scheme.
_OPTIONS = frozenset(
    {"db", "username", "password", "client_name", "socket_connect_timeout", "socket_keepalive"}
)
# Only for redis+sentinel:// URLs: the credentials of the sentinels themselves.
_SENTINEL_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})
_TLS_OPTIONS = frozenset(
    {
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_ca_data",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_ciphers",
        "ssl_min_version",
    }
)
# redis-py options aioqueue sets itself: a URL must not change them.
_MANAGED = {
    "socket_timeout": "aioqueue sets it above the block setting, so a blocking read never "
    "times out",
    "health_check_interval": "aioqueue sets it",
    "retry_on_timeout": "aioqueue decides which commands are re-sent",
    "max_connections": "set the max_connections setting instead",
    "decode_responses": "aioqueue reads bytes",
    "protocol": "aioqueue speaks RESP2",
    "timeout": "aioqueue sets its own timeouts",
}


def url_options_problem(url: str) -> str | None:
    """What is wrong with the query parameters of a Redis URL, without connecting or
    reading files (None if nothing)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    tls = scheme.startswith("rediss")
    accepted = _OPTIONS | _TLS_OPTIONS if tls else _OPTIONS
    if scheme in SENTINEL_SCHEMES:
        accepted |= _SENTINEL_OPTIONS
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    for name, values in query.items():
        if name in _MANAGED:
            return f"the option {name}= may not be given in the Redis URL: {_MANAGED[name]}"
        if name in _TLS_OPTIONS and not tls:
            return f"the option {name}= is a TLS option: it needs a rediss:// URL"
        if name in _SENTINEL_OPTIONS and name not in accepted:
            return f"the option {name}= is for redis+sentinel:// URLs"
        if name not in accepted:
            known = _OPTIONS | _TLS_OPTIONS | (accepted & _SENTINEL_OPTIONS)
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}=?)" if close else ""
            if close and close[0] not in accepted:
                hint = f" (did you mean {close[0]}=, with a rediss:// URL?)"
            return (
                f"unknown option {name}= in the Redis URL{hint}; it takes "
                f"{', '.join(sorted(accepted))}"
            )
        if len(values) > 1:
            return f"the option {name}= is given {len(values)} times in the Redis URL"
        value = values[0]
        if not value:
            return f"the option {name}= in the Redis URL is empty"
        if name in ("ssl_check_hostname", "socket_keepalive") and value.lower() not in _BOOLEANS:
            return f"the option {name}={value} in the Redis URL must be true or false"
        if name == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
            return (
                f"the option ssl_cert_reqs={value} in the Redis URL must be none, optional "
                "or required"
            )
    if "ssl_keyfile" in query and "ssl_certfile" not in query:
        return "the option ssl_keyfile= in the Redis URL needs ssl_certfile= too"
    return None


def tls_files_problem(url: str) -> str | None:
    """What is wrong with the CA, certificate and key files a ``rediss://`` URL names:
    missing, unreadable, or not what they should be (None if nothing)."""
    query = {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).items()}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        path = query.get(name)
        if path is not None and not os.path.isfile(path):
            kind = "CA" if name == "ssl_ca_certs" else name.removeprefix("ssl_")
            return f"the {kind} file {name}={path} in the Redis URL does not exist"
    capath = query.get("ssl_ca_path")
    if capath is not None and not os.path.isdir(capath):
        return f"the CA directory ssl_ca_path={capath} in the Redis URL does not exist"
    try:
        context = ssl.create_default_context(
            cafile=query.get("ssl_ca_certs"), capath=capath, cadata=query.get("ssl_ca_data")
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        return f"the CA certificates in the Redis URL cannot be loaded: {exc}"
    if "ssl_certfile" in query:
        try:
            context.load_cert_chain(
                query["ssl_certfile"], query.get("ssl_keyfile"), query.get("ssl_password")
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            return (
                f"the client certificate ssl_certfile={query['ssl_certfile']} (with its key) "
                f"cannot be loaded: {exc}"
            )
    return None


def check_url(url: str) -> None:
    """Raise :class:`ConfigurationError` for a Redis URL whose options redis-py would
    ignore or choke on, or whose TLS files are missing: before connecting, in one line."""
    problem = url_options_problem(url)
    if problem is None and urllib.parse.urlsplit(url).scheme.lower().startswith("rediss"):
        problem = tls_files_problem(url)
    if problem is not None:
        raise ConfigurationError(problem)


def url_user(url: str) -> str:
    """The ACL user a Redis URL logs in as (``default`` without one)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    if parts.username:
        return urllib.parse.unquote(parts.username)
    return query.get("username", ["default"])[0]
