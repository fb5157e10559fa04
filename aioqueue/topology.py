"""Where a queue's Redis is, read from its URL without connecting: one server, a primary
found through Redis Sentinel, or a Redis Cluster (docs/deploying.md#sentinel-and-cluster).

``redis+sentinel://[user:password@]host:port[,host:port...]/<master name>[/<db>][?options]``
names the sentinels (port 26379 unless given) and the master they watch;
``redis+cluster://[user:password@]host:port[,host:port...][?options]`` names some nodes of a
cluster (port 6379 unless given), from which the client learns the others. ``rediss+`` in
front of either speaks TLS to every server. The user and password are those of the data
servers; ``sentinel_username=`` and ``sentinel_password=`` log in to sentinels that ask.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

__all__ = ["CLUSTER_SCHEMES", "SENTINEL_SCHEMES", "Topology", "parse_topology"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_DEFAULT_PORT = {"sentinel": 26379, "cluster": 6379}
_SERVICE = re.compile(r"^[\w.:-]{1,200}$")


@dataclass(frozen=True, slots=True)
class Topology:
    """A Sentinel or Cluster URL taken apart."""

    kind: Literal["sentinel", "cluster"]
    hosts: tuple[tuple[str, int], ...]
    """The sentinels (kind ``sentinel``) or the cluster's seed nodes (kind ``cluster``)."""
    service: str
    """The master's name the sentinels know it by ('' for a cluster)."""
    db: int
    tls: bool
    single_url: str
    """A ``redis://`` (``rediss://``) URL of the first host with the same credentials,
    database and options: what redis-py's URL parser reads the connection options from."""


def parse_topology(url: str) -> Topology:
    """Take a ``redis+sentinel://`` or ``redis+cluster://`` URL apart; ValueError names what
    is wrong with it."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in (*SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
        raise ValueError("it is not a redis+sentinel:// or redis+cluster:// URL")
    kind: Literal["sentinel", "cluster"] = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
    rest = rest.partition("#")[0]
    rest, qmark, query = rest.partition("?")
    location, slash, path = rest.partition("/")
    userinfo, at, hostlist = location.rpartition("@")
    hosts = tuple(_host(h, _DEFAULT_PORT[kind]) for h in hostlist.split(","))
    segments = [urllib.parse.unquote(s) for s in path.split("/")] if slash else []
    segments = [s for s in segments if s]
    service = ""
    if kind == "sentinel":
        if not segments:
            raise ValueError(
                "a redis+sentinel:// URL names the master after the sentinels, like "
                "redis+sentinel://host1:26379,host2:26379/mymaster/0"
            )
        service = segments.pop(0)
        if not _SERVICE.match(service):
            raise ValueError(f"the master name {service!r} is not a name Sentinel accepts")
    if len(segments) > 1:
        raise ValueError(f"the URL's path has more parts than {kind} takes: /{path}")
    options = urllib.parse.parse_qs(query, keep_blank_values=True)
    db_text = segments[0] if segments else options.get("db", ["0"])[0]
    if not (db_text.isascii() and db_text.isdigit() and len(db_text) <= 10):
        raise ValueError(f"the database index must be a number, like /0 or ?db=0: {db_text!r}")
    db = int(db_text)
    if kind == "cluster" and db != 0:
        raise ValueError("a Redis Cluster has database 0 only")
    tls = scheme.startswith("rediss")
    first_host, first_port = hosts[0]
    shown_host = f"[{first_host}]" if ":" in first_host else first_host
    single = f"{'rediss' if tls else 'redis'}://{userinfo}{at}{shown_host}:{first_port}/{db}"
    query = "&".join(
        f"{urllib.parse.quote(k)}={urllib.parse.quote(v)}"
        for k, values in options.items()
        if k not in ("db", "sentinel_username", "sentinel_password")
        for v in values
    )
    if qmark and query:
        single += f"?{query}"
    return Topology(kind, hosts, service, db, tls, single)


def _host(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6 address]:port`` as a pair."""
    text = text.strip()
    if not text:
        raise ValueError("an empty host in the URL's host list (host1:port,host2:port)")
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"the host {text!r} is not [address]:port")
        port_text = port_text[1:]
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text:
            raise ValueError(f"the host {text!r}: an IPv6 address goes in brackets, [::1]:6379")
    if not host:
        raise ValueError(f"the host {text!r} has no address")
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"the port of {text!r} must be a number from 1 to 65535")
    return host, int(port_text)
