"""The connection to Redis every part of the broker shares: the client, the scripts, the
shared clock, and the one place where redis-py errors become aioqueue errors.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript

from aioqueue.brokers.base import ServerFacts
from aioqueue.brokers.redis import scripts
from aioqueue.brokers.redis.access import (
    CLUSTER,
    OPTIONAL,
    OUTSIDE,
    READS,
    ROLE_SCRIPTS,
    SCRIPTING,
    probe_command,
    role_commands,
    script_commands,
)
from aioqueue.brokers.redis.keys import Keys
from aioqueue.brokers.redis.refusals import is_refusal, permission_denied, refusal, was_reset
from aioqueue.brokers.redis.urls import check_url, url_user
from aioqueue.brokers.redis.waiter import DoneWaiter, raised_in_redis_py
from aioqueue.errors import (
    AioqueueError,
    AuthenticationFailed,
    ConfigurationError,
    NotReplicated,
    RedisUnavailable,
    UnsupportedRedis,
)
from aioqueue.settings import mask_url
from aioqueue.topology import parse_topology

MIN_REDIS = (7, 0)
# Jobs per script call: large enough to amortise the round trip, small enough that one
# script never blocks Redis for long.
CHUNK = 500
FINAL = frozenset({"complete", "failed", "dead", "aborted"})


def local_now_ms() -> int:
    """This machine's wall clock in ms (only for figures nobody compares across machines)."""
    return int(time.time() * 1000)


def text(value: Any) -> str:
    """A Redis reply value as text (bytes that are not UTF-8, written by someone else, are
    replaced rather than raised)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _version(info: dict[str, Any]) -> tuple[int, ...]:
    """The server's major and minor version from ``INFO server`` (0.0 if unreadable)."""
    try:
        return tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
    except ValueError:
        return (0, 0)


class redis_errors:
    """Map redis-py's errors to aioqueue's, chained: connection failures to
    :class:`RedisUnavailable` (they pass: callers retry), refused credentials, ACL rights and
    certificates to :class:`AccessDenied` (they do not).

    A plain class rather than a generator-based context manager: it wraps every command,
    and this is the cheapest way Python offers.
    """

    __slots__ = ("what",)
    # The queue's keys and the ACL user, when known, make a refusal's message exact.
    keys: Keys | None = None
    user: str | None = None

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None or (isinstance(exc, TimeoutError) and not isinstance(exc, rexc.RedisError)):
            # A builtin TimeoutError (an OSError) is a caller's deadline, not an outage.
            return
        if isinstance(exc, AioqueueError):
            return  # already said (NotReplicated is a ConnectionError, hence an OSError)
        if isinstance(exc, rexc.RedisError):
            denied = refusal(exc, self.what, self.keys, self.user)
            if denied is not None:
                raise denied from exc
        if isinstance(exc, rexc.OutOfMemoryError):
            message = (
                f"Redis is out of memory (maxmemory) while {self.what}: "
                "let workers drain the queue, or raise maxmemory"
            )
            raise RedisUnavailable(message) from exc
        if isinstance(exc, rexc.ResponseError) and str(exc).startswith("BUSY"):
            raise RedisUnavailable(f"Redis is busy running a script while {self.what}") from exc
        if isinstance(exc, rexc.BusyLoadingError):
            raise RedisUnavailable(
                f"Redis is loading its dataset while {self.what}: {exc}"
            ) from exc
        if isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError)):
            raise RedisUnavailable(f"Redis unavailable while {self.what}: {exc}") from exc
        if isinstance(exc, rexc.RedisClusterException) and not isinstance(
            exc, rexc.SlotNotCoveredError
        ):
            # redis-py could not read the slot map from any seed node, and says why.
            said = str(exc)
            if "username-password" in said or "WRONGPASS" in said or "NOAUTH" in said:
                raise AuthenticationFailed(
                    f"the Redis Cluster refused the credentials while {self.what}: check the "
                    "user name and password in the Redis URL (users exist per node: create "
                    "them on every node)"
                ) from exc
            if "Cluster mode is not enabled" in said:
                raise ConfigurationError(
                    f"the seed nodes do not answer CLUSTER SLOTS as Redis Cluster nodes while "
                    f"{self.what}: use redis+cluster:// for a Redis Cluster only, and grant "
                    "the ACL user +cluster|slots +command +asking"
                ) from exc
        if slot_moving(exc) or isinstance(
            exc, (rexc.ReadOnlyError, rexc.SlotNotCoveredError, rexc.RedisClusterException)
        ):
            # A failover or a slot migration under way: redis-py followed the redirections
            # it could; the call fails like an outage, and callers retry it.
            raise RedisUnavailable(
                f"Redis is failing over or moving the queue's slot while {self.what}: {exc}"
            ) from exc
        if isinstance(exc, AttributeError) and raised_in_redis_py(exc):
            # redis-py tearing a connection down under a command (seen in its cluster
            # client during a failover: a writer already gone): an outage, not a bug here.
            raise RedisUnavailable(f"Redis dropped the connection while {self.what}") from exc


class queue_errors(redis_errors):
    """:class:`redis_errors` for one queue and user: a refusal names their exact rights."""

    __slots__ = ("keys", "user")

    def __init__(self, what: str, keys: Keys, user: str) -> None:
        self.what = what
        self.keys = keys
        self.user = user


def is_nogroup(exc: BaseException) -> bool:
    """True for the errors Redis returns when the stream or consumer group is missing (a
    blocked XREADGROUP whose stream was flushed gets UNBLOCKED)."""
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


MOVING_PATIENCE = 30.0
"""Seconds a script refused while its queue's cluster slot is being moved is sent again."""


def slot_moving(exc: BaseException) -> bool:
    """True for the errors of a cluster slot on the move: a script stopped by the guard in
    ``_prelude.lua`` ('non local key'), TRYAGAIN, or redis-py's redirections exhausted."""
    return isinstance(exc, (rexc.TryAgainError, rexc.ClusterError, rexc.AskError)) or (
        isinstance(exc, rexc.ResponseError) and "non local key" in str(exc)
    )


Call = tuple[str, list[str], list[Any]]
"""One script call: script name, KEYS, ARGV."""


class RedisConnection:
    """A queue's connection to Redis >= 7.0: the redis-py client, the loaded scripts and the
    clock every worker shares (Redis ``TIME``)."""

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        result_ttl: float,
        block: float = 5.0,
        max_connections: int = 64,
        max_payload_bytes: int = 1_048_576,
        events_max_len: int = 10_000,
        wait_replicas: int = 0,
        wait_replicas_timeout: float = 1.0,
    ) -> None:
        self.url = url
        # Replicas that must confirm an enqueue or a settle (WAIT) before it returns.
        self.wait_replicas = wait_replicas
        self._wait_ms = max(int(wait_replicas_timeout * 1000), 1)
        self.keys = Keys(queue)
        self.result_ttl_ms = int(result_ttl * 1000)
        # Entries the events stream keeps (XADD MAXLEN ~); 0: the scripts record no events.
        self.events_cap = events_max_len
        # A worker refuses larger jobs itself: anyone who can write to Redis can write one.
        self.max_payload_bytes = max_payload_bytes
        # A blocking read must never look like a dead connection: the socket timeout is
        # well above the longest BLOCK the worker issues.
        self._socket_timeout = block + 10.0
        # Bounds the connections concurrent callers use (the pool itself is unbounded, which
        # is measurably cheaper per command than redis-py's blocking pool): a burst of
        # thousands of enqueues or result waits queues here instead of opening sockets.
        self._slots = asyncio.Semaphore(max_connections)
        self._client: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        # A Redis Cluster: each script call goes to the node of its queue's slot, and
        # keys of several queues never meet in one command.
        self.cluster = False
        self._sentinel: Sentinel | None = None
        self._sentinel_options: dict[str, Any] = {}
        self._scripts: dict[str, AsyncScript] = {}
        self._waiter: DoneWaiter | None = None
        self._connect_lock = asyncio.Lock()
        # The ACL user, and the scripts whose rights were checked (see _probe).
        self.user = url_user(url)
        self._checked: set[str] = set()
        self._check_lock = asyncio.Lock()
        # Redis TIME minus this machine's clock, in ms: lets this process estimate the shared
        # clock without a round trip (scripts that decide anything read TIME themselves).
        self._clock_offset_ms = 0
        # Where each lane's takeover sweep (XAUTOCLAIM) goes on from.
        self._reclaim_cursors: dict[str, str] = {}
        # A worker's tasks' limits as begin.lua reads them (see configure), its lease, and
        # what to call when begin deferred a job.
        self._limits = ""
        self._lease_ms = 30_000
        self._on_deferred: Callable[[], None] | None = None

    @property
    def client(self) -> aioredis.Redis:
        """The connected redis-py client (connect() first)."""
        if self._client is None:
            raise RuntimeError("broker is not connected")
        return self._client

    @property
    def reader(self) -> aioredis.Redis:
        """A client that never re-sends a command: for the reads that hand entries over
        (``XREADGROUP``, ``XAUTOCLAIM``). Re-sending one whose reply was lost would leave
        the entries it handed over unseen in this consumer's pending list for a whole lease;
        the caller gets :class:`RedisUnavailable` instead and adopts them."""
        if self._reader is None:
            raise RuntimeError("broker is not connected")
        return self._reader

    def _errors(self, what: str) -> queue_errors:
        return queue_errors(what, self.keys, self.user)

    async def connect(self) -> None:
        """Check the URL, open the connection pool, check the server version and that the
        user may use the queue's keys; idempotent.

        Raises :class:`ConfigurationError` for a bad URL option or a missing TLS file,
        :class:`AccessDenied` for refused credentials, rights or certificates (both final),
        :class:`RedisUnavailable` when Redis cannot be reached (that may pass).
        """
        async with self._connect_lock:
            if self._client is not None:
                return
            check_url(self.url)
            options: dict[str, Any] = {
                "socket_connect_timeout": 5.0,
                "socket_timeout": self._socket_timeout,
                "socket_keepalive": True,
                "health_check_interval": 30,
            }
            parts = urllib.parse.urlsplit(self.url)
            if parts.scheme.lower().startswith("rediss") and "none" not in urllib.parse.parse_qs(
                parts.query
            ).get("ssl_cert_reqs", []):
                # Whatever redis-py's default: the server's certificate must name the host
                # (ssl_check_hostname=false in the URL turns that off; ssl_cert_reqs=none
                # verifies nothing at all).
                options["ssl_check_hostname"] = True
            # A pooled connection that went stale (Redis restarted, the primary failed
            # over), or one that dropped after Redis ran a command, is replaced and the
            # command re-sent: every script is safe to repeat (each recognises the event it
            # records). The reader never re-sends (see ``reader``).
            client, reader = self._clients(options)
            try:
                if self._sentinel is not None:
                    await self._ask_sentinels()
                info = await self._first_contact(client, reader)
                if info and _version(info) < MIN_REDIS:
                    raise UnsupportedRedis(
                        f"aioqueue needs Redis >= 7.0, the server at {mask_url(self.url)} runs "
                        f"{info.get('redis_version')}: upgrade Redis"
                    )
            except BaseException:
                await client.aclose()
                await reader.aclose()
                await self._close_sentinels()
                raise
            self._scripts = {
                name: client.register_script(scripts.source(name)) for name in scripts.NAMES
            }
            self._waiter = DoneWaiter(
                client, self.keys.done_channel(uuid.uuid4().hex), self._listener_error
            )
            self._client = client
            self._reader = reader

    def _clients(self, options: dict[str, Any]) -> tuple[aioredis.Redis, aioredis.Redis]:
        """The client (re-sends a command whose reply was lost) and the reader (never does)
        for the URL's deployment: one server, the primary Sentinel names (followed through
        failovers), or a Redis Cluster (followed through MOVED and ASK)."""
        resend = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3)
        once = Retry(ExponentialWithJitterBackoff(), 0)
        if "+" not in urllib.parse.urlsplit(self.url).scheme:
            pool = aioredis.ConnectionPool.from_url(
                self.url, retry=resend, retry_on_error=[rexc.ConnectionError], **options
            )
            reader_pool = aioredis.ConnectionPool.from_url(self.url, retry=once, **options)
            return aioredis.Redis.from_pool(pool), aioredis.Redis.from_pool(reader_pool)
        where = parse_topology(self.url)
        kwargs: dict[str, Any] = dict(parse_url(where.single_url))
        for name in ("host", "port", "connection_class"):
            kwargs.pop(name, None)
        kwargs.update(options, ssl=where.tls)
        if where.kind == "cluster":
            kwargs.pop("db", None)
            self.cluster = True
            nodes = [ClusterNode(host, port) for host, port in where.hosts]
            # redis-py types RedisCluster apart from Redis; it answers every command the
            # broker sends a queue's keys (all in one slot) the same way.
            return (
                cast(aioredis.Redis, RedisCluster(startup_nodes=nodes, retry=resend, **kwargs)),
                cast(aioredis.Redis, RedisCluster(startup_nodes=nodes, retry=once, **kwargs)),
            )
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.url).query)
        sentinel_options: dict[str, Any] = {
            "socket_connect_timeout": options["socket_connect_timeout"],
            "socket_timeout": 5.0,
            "ssl": where.tls,
        }
        for name in ("username", "password"):
            if f"sentinel_{name}" in query:
                sentinel_options[name] = query[f"sentinel_{name}"][0]
        if where.tls:
            sentinel_options.update({k: v for k, v in kwargs.items() if k.startswith("ssl_")})
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(where.hosts), sentinel_kwargs=sentinel_options, **kwargs
        )
        self._sentinel_options = sentinel_options
        return (
            self._sentinel.master_for(
                where.service, retry=resend, retry_on_error=[rexc.ConnectionError]
            ),
            self._sentinel.master_for(where.service, retry=once),
        )

    async def _ask_sentinels(self) -> None:
        """Ask each sentinel for the master once, without retries: refused credentials and
        a master name no sentinel knows are errors of their own (redis-py's lookup would
        take them for an outage, and retry it for ever). None answering is an outage,
        reported at once (redis-py's lookup takes half a minute to say so)."""
        where = parse_topology(self.url)
        refused: Exception | None = None
        answered = known = False
        for host, port in where.hosts:
            probe = aioredis.Redis(
                host=host,
                port=port,
                retry=Retry(ExponentialWithJitterBackoff(), 0),
                **{**self._sentinel_options, "socket_connect_timeout": 2.0, "socket_timeout": 2.0},
            )
            try:
                # SENTINEL MASTERS, as redis-py's own lookup: no other right is needed.
                masters = await probe.sentinel_masters()
            except rexc.AuthenticationError as exc:
                refused = exc
                continue
            except rexc.ResponseError as exc:
                if "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
                    refused = exc
                elif "unknown command" in str(exc):
                    raise ConfigurationError(
                        f"the server at {host}:{port} is no sentinel (it does not know "
                        "SENTINEL): a redis+sentinel:// URL names the sentinels, not Redis"
                    ) from None
                continue
            except (rexc.ConnectionError, rexc.TimeoutError, OSError):
                continue
            finally:
                await probe.aclose()
            answered = True
            known = known or where.service in masters
        if refused is not None and not answered:
            raise AuthenticationFailed(
                f"the sentinels of {mask_url(self.url)} refused the login ({refused}): check "
                "sentinel_username= and sentinel_password= in the URL"
            ) from None
        if not answered:
            raise RedisUnavailable(
                f"no sentinel of {mask_url(self.url)} answered: are they running, and "
                "reachable from here?"
            )
        if not known:
            raise ConfigurationError(
                f"no sentinel of {mask_url(self.url)} watches a master named "
                f"{where.service!r}: check the name after the hosts in the URL"
            )

    async def _close_sentinels(self) -> None:
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
            self._sentinel = None

    async def _first_contact(
        self, client: aioredis.Redis, reader: aioredis.Redis
    ) -> dict[str, Any]:
        """One round trip: the server's version (``INFO``; {} if the user may not run it, as
        a producer need not), Redis's clock, and whether the user may use the queue's keys.

        A server that answers in a way no Redis >= 7.0 would (no HELLO, not Redis at all, a
        database index it does not have) is one typed error, not redis-py's traceback."""
        try:
            return await self._first_replies(client, reader)
        except rexc.ResponseError as exc:
            text_ = str(exc)
            if "DB index is out of range" in text_:
                raise ConfigurationError(
                    f"the server at {mask_url(self.url)} has no database with the index in "
                    "the URL (see its 'databases' setting)"
                ) from None
            if "unknown command" in text_:
                raise UnsupportedRedis(
                    f"the server at {mask_url(self.url)} answered {text_!r}: "
                    "aioqueue needs Redis >= 7.0 (a Sentinel answers like this too: reach "
                    "the primary it watches with redis+sentinel://host:26379/<master name>)"
                ) from None
            raise
        except (rexc.InvalidResponse, AttributeError, ValueError) as exc:
            raise UnsupportedRedis(
                f"the server at {mask_url(self.url)} does not answer like Redis >= 7.0 "
                f"({type(exc).__name__}: {exc}); is it a Redis server?"
            ) from None

    async def _first_replies(
        self, client: aioredis.Redis, reader: aioredis.Redis
    ) -> dict[str, Any]:
        try:
            with self._errors("connecting"):
                if self.cluster:
                    # Both read the slot map now: a first command sent before it is known
                    # goes to any node and comes back MOVED. redis-py's cluster pipeline
                    # refuses INFO and TIME: three calls, once.
                    await cast(RedisCluster, client).initialize()
                    await cast(RedisCluster, reader).initialize()
                    here = self._node_of_queue(client)
                    info, now, exists = await asyncio.gather(
                        client.info("server", **here),
                        client.time(**here),
                        client.exists(self.keys.stream),
                        return_exceptions=True,
                    )
                else:
                    pipe = client.pipeline(transaction=False)
                    pipe.info("server")
                    pipe.time()
                    pipe.exists(self.keys.stream)
                    info, now, exists = await pipe.execute(raise_on_error=False)
                    if isinstance(exists, rexc.AskError):  # MOVED: a cluster node
                        raise ConfigurationError(
                            f"the server at {mask_url(self.url)} is a node of a Redis Cluster "
                            "(it answered MOVED): use a redis+cluster:// URL"
                        )
                for reply in (now, exists):
                    if isinstance(reply, Exception):
                        raise reply
                if isinstance(info, rexc.NoPermissionError):
                    info = {}
                elif isinstance(info, Exception):
                    raise info
        except RedisUnavailable as exc:
            hint = ""
            if was_reset(exc):
                hint = (
                    "a server that speaks TLS answers a redis:// URL like this, and so may one "
                    "that refused this client's certificate"
                )
            elif "Timeout connecting" in str(exc) and self.url.lower().startswith("rediss:"):
                hint = "a server that does not speak TLS leaves a rediss:// URL waiting like this"
            if hint:
                raise RedisUnavailable(f"{exc} (if this persists: {hint})") from exc.__cause__
            raise
        self._set_offset(now)
        return dict(info)

    def _node_of_queue(self, client: aioredis.Redis | None = None) -> dict[str, Any]:
        """For a command that names no key, in a cluster: the node holding the queue's slot
        (its clock, its configuration), as redis-py's ``target_nodes``; else nothing."""
        if not self.cluster:
            return {}
        cluster = cast(RedisCluster, client or self.client)
        return {"target_nodes": cluster.get_node_from_key(self.keys.stream)}

    def _time_in(self, pipe: Any) -> None:
        """Queue Redis's ``TIME`` in ``pipe``: in a cluster, of the node of the queue's slot,
        through ``execute_command`` (redis-py's cluster pipeline refuses ``time()`` by name)."""
        pipe.execute_command("TIME", **self._node_of_queue())

    def _listener_error(self, exc: Exception) -> Exception:
        """The error waiters get when the result listener's subscription fails."""
        return refusal(exc, "subscribing to job notifications", self.keys, self.user) or exc

    async def check_access(self, role: str) -> None:
        """Check that the ACL user has every right ``role`` needs (see :data:`ROLES`), without
        changing anything: raise one :class:`PermissionDenied` naming all that are missing.

        A worker calls this before it starts consuming, so a missing right is one clear error
        at start-up instead of a script that stops half-way through a job."""
        if self._client is None:
            await self.connect()
        with self._errors(f"checking the rights of a {role}"):
            needed = role_commands(role)
            if self.cluster:
                needed = sorted({*needed, *CLUSTER})
            await self._probe(needed, f", which a {role} needs")
        self._checked.update(ROLE_SCRIPTS[role])

    async def _check_scripts(self, names: Collection[str]) -> None:
        """Check once per process, before a script first runs, that the user may run every
        command in it: Redis does not undo a script that fails half-way."""
        async with self._check_lock:
            todo = sorted(set(names) - self._checked)
            if not todo:
                return
            commands = set(SCRIPTING)
            for name in todo:
                commands |= script_commands(name) - OPTIONAL
            what = f"the {' and '.join(todo)} script{'s' if len(todo) > 1 else ''}"
            with self._errors(f"checking the rights {what} needs"):
                await self._probe(sorted(commands), f", which {what} needs")
            self._checked.update(todo)

    async def _probe(self, commands: Sequence[str], context: str) -> None:
        """Ask Redis whether the user may run ``commands`` on the queue's keys and channels,
        running none that writes: on a connection of its own, EVALSHA of a script that does
        not exist and EXEC without MULTI (both only fail), then MULTI and every other command
        queued in the transaction, where Redis checks the ACL; the connection is then closed,
        which discards the transaction unrun. Without MULTI among ``commands`` (a monitor),
        they must all be reads, and run. Raises one :class:`PermissionDenied` naming every
        refused right."""
        key = f"{self.keys.prefix}:probe"
        channel = f"{self.keys.prefix}:probe"
        transaction = "multi" in commands
        if not transaction and not set(commands) <= READS:
            raise ValueError(f"probing writes needs MULTI: {sorted(set(commands) - READS)}")
        outside = [c for c in OUTSIDE if c in commands]
        queued = [c for c in commands if c not in OUTSIDE and c != "multi"]
        refused: list[str] = []
        refused_commands: list[str] = []

        async def send(batch: Sequence[str]) -> list[Any]:
            packed = [probe_command(c, key, channel) for c in batch]
            await connection.send_packed_command(connection.pack_commands(packed))
            replies: list[Any] = []
            for command in batch:
                try:
                    replies.append(await connection.read_response())
                except rexc.ResponseError as exc:
                    replies.append(exc)
                    if is_refusal(exc):
                        refused.append(str(exc))
                        refused_commands.append(command)
            return replies

        if self.cluster:
            node = cast(RedisCluster, self.client).get_node_from_key(key)
            if node is None:
                raise RedisUnavailable(f"no node of the cluster serves the slot of {key}")
            connection: Any = node.connection_class(**node.connection_kwargs)
        else:
            connection = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.connect()
            replies = await send([*outside, *(["multi"] if transaction else [])])
            # Only inside a transaction Redis has opened may writes be sent: they never run.
            if not transaction or text(replies[-1]) == "OK":
                await send(queued)
        finally:
            await connection.disconnect()
        if refused:
            raise permission_denied(
                refused, context, self.keys, self.user, commands=refused_commands
            )

    async def close(self) -> None:
        """Close the pub/sub listener and the connection pool."""
        if self._waiter is not None:
            await self._waiter.close()
            self._waiter = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._reader is not None:
            await self._reader.aclose()
            self._reader = None
        await self._close_sentinels()

    def _set_offset(self, reply: tuple[int, int]) -> None:
        seconds, micros = reply
        self._observe_clock(seconds * 1000 + micros // 1000)

    def _observe_clock(self, redis_ms: int) -> None:
        """Remember how far Redis's clock (read just now) is from this machine's."""
        self._clock_offset_ms = redis_ms - local_now_ms()

    async def _lanes(self) -> list[str]:
        """The priorities jobs of this queue were enqueued with, highest first ("0" always)."""
        members = await self.client.smembers(self.keys.lanes)
        levels = {0} | {int(text(m)) for m in members if text(m).lstrip("-").isdigit()}
        return [str(level) for level in sorted(levels, reverse=True)]

    def _untoken(self, token: str) -> tuple[str, str]:
        """The stream key and entry id an entry token names (see ``Keys.lane``)."""
        entry, _, level = token.partition("@")
        return self.keys.lane(level or "0"), entry

    def server_now_ms(self) -> int:
        """Redis's clock as estimated from the last reading, without a round trip."""
        return local_now_ms() + self._clock_offset_ms

    async def now_ms(self) -> int:
        """Redis's clock (``TIME``): the one clock every worker agrees on."""
        with self._errors("reading the Redis clock"):
            self._set_offset(await self.client.time(**self._node_of_queue()))
        return self.server_now_ms()

    async def server_facts(self) -> ServerFacts:
        """``maxmemory-policy`` and append-only persistence, from ``INFO`` (which needs no
        CONFIG permission)."""
        with self._errors("reading the Redis configuration"):
            here = self._node_of_queue()
            memory = await self.client.info("memory", **here)
            persistence = await self.client.info("persistence", **here)
        policy = str(memory.get("maxmemory_policy", "noeviction"))
        return ServerFacts(
            evicting_policy=None if policy == "noeviction" else policy,
            persistent=bool(int(persistence.get("aof_enabled", 0))),
        )

    async def _eval(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, once: bool = False
    ) -> Any:
        """EVALSHA one script; on NOSCRIPT (Redis restarted and lost its cache) load it and
        run it again. ``once``: on the connection that never re-sends a command after a
        lost reply (for a script whose repeat would not answer the same: the caller learns
        the reply was lost and looks for what the first run did).

        In a cluster, a script refused because its queue's slot is being moved (it stops
        before writing: see ``_prelude.lua``) is sent again with backoff until the move is
        over, for up to MOVING_PATIENCE seconds."""
        if not self.cluster:
            return await self._eval_once(name, keys, args, once=once)
        loop = asyncio.get_running_loop()
        started = loop.time()
        pause = 0.02
        while True:
            try:
                return await self._eval_once(name, keys, args, once=once)
            except (rexc.ResponseError, rexc.ClusterError) as exc:
                if not slot_moving(exc) or loop.time() - started > MOVING_PATIENCE:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _eval_once(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, once: bool
    ) -> Any:
        if self._client is None:
            await self.connect()
        if name not in self._checked:
            await self._check_scripts((name,))
        script = self._scripts[name]
        client = self.reader if once else self.client
        async with self._slots:
            try:
                return await client.evalsha(script.sha, len(keys), *keys, *args)
            except rexc.NoScriptError:
                script.sha = await self.client.script_load(script.script)
                return await client.evalsha(script.sha, len(keys), *keys, *args)
            except rexc.ResponseError as exc:
                if not is_refusal(exc) or "NOPERM" in str(exc):
                    raise
                refused = exc
        # Redis does not say which command a script was refused (rights revoked while
        # running): probe the script's commands again, which names it.
        self._checked.discard(name)
        await self._check_scripts((name,))
        raise refused

    async def _eval_many(
        self,
        calls: Sequence[Call],
        *,
        errors: bool = False,
        durable: bool = False,
        moving_since: float | None = None,
    ) -> list[Any]:
        """Run several scripts in one round trip (a pipeline of EVALSHA). With ``errors``,
        a call that failed has its exception in its place instead of raising it. With
        ``durable`` and ``wait_replicas`` set, the same round trip ends with ``WAIT`` on the
        same connection, and too few confirmations raise :class:`NotReplicated`, once every
        call is written: a call refused for a lost script cache or a moving slot is sent
        again first (with a WAIT of its own when durable)."""
        wait = durable and self.wait_replicas > 0
        if len(calls) == 1 and not errors and not wait:
            name, keys, args = calls[0]
            return [await self._eval(name, keys, args)]
        if self._client is None:
            await self.connect()
        if any(name not in self._checked for name, _, _ in calls):
            await self._check_scripts({name for name, _, _ in calls})
        pipe = self.client.pipeline(transaction=False)
        for name, keys, args in calls:
            # execute_command, not evalsha: redis-py's cluster pipeline refuses the latter
            # by name, yet routes EVALSHA by its keys like any keyed command.
            pipe.execute_command("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)
        here = self._node_of_queue() if wait else {}
        if wait:
            pipe.wait(self.wait_replicas, self._wait_ms, **here)
        async with self._slots:
            results: list[Any] = await pipe.execute(raise_on_error=False)
        confirmed = results.pop() if wait else None
        if wait and here != self._node_of_queue():
            # The slot moved (MOVED) during the round trip: the scripts were written on
            # another node than the one the WAIT asked, so nothing is confirmed.
            confirmed = RedisUnavailable("the queue's slot moved to another node meanwhile")
        again = [
            i
            for i, result in enumerate(results)
            if isinstance(result, rexc.NoScriptError)
            or (self.cluster and isinstance(result, Exception) and slot_moving(result))
        ]
        if again:
            redo = await self._again(
                [calls[i] for i in again], [results[i] for i in again], wait, moving_since
            )
            for i, result in zip(again, redo, strict=True):
                results[i] = result
        if wait:
            self._confirmed(confirmed)
        if not errors:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

    async def _again(
        self,
        calls: Sequence[Call],
        failures: Sequence[Exception],
        wait: bool,
        moving_since: float | None,
    ) -> list[Any]:
        """Send again the calls Redis refused for a lost script cache (Redis restarted) or
        a moving slot (see ``_eval``), their failures in their places: each on its own
        without ``wait``, else all in one round trip that ends with a WAIT of its own."""
        if not wait:
            answers: list[Any] = []
            for name, keys, args in calls:
                try:
                    answers.append(await self._eval(name, keys, args))
                except rexc.RedisError as exc:
                    answers.append(exc)
            return answers
        for name in {
            name
            for (name, _, _), failure in zip(calls, failures, strict=True)
            if isinstance(failure, rexc.NoScriptError)
        }:
            script = self._scripts[name]
            script.sha = await self.client.script_load(script.script)
        loop = asyncio.get_running_loop()
        if any(not isinstance(failure, rexc.NoScriptError) for failure in failures):
            moving_since = loop.time() if moving_since is None else moving_since
            if loop.time() - moving_since > MOVING_PATIENCE:
                return list(failures)
            await asyncio.sleep(0.05)
        return await self._eval_many(calls, errors=True, durable=True, moving_since=moving_since)

    def _confirmed(self, confirmed: Any) -> None:
        """Raise NotReplicated unless WAIT's answer counts ``wait_replicas`` replicas."""
        if isinstance(confirmed, Exception):
            # WAIT went to a node that is no longer the primary (a failover redis-py learnt
            # of from this very call): nothing confirmed, the repeat goes right.
            raise NotReplicated(
                f"Redis stored it, but confirming it on replicas failed ({confirmed}): a "
                "failover now could lose it (repeating the call is safe)",
                self.wait_replicas,
                0,
            ) from confirmed
        if int(confirmed) < self.wait_replicas:
            raise NotReplicated(
                f"Redis stored it, but {confirmed} of the {self.wait_replicas} replicas "
                f"wait_replicas asks for confirmed it within {self._wait_ms} ms: a failover "
                "now could lose it (repeating the call is safe)",
                self.wait_replicas,
                int(confirmed),
            )
