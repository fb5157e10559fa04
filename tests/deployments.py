"""Real local Redis deployments for the tests: a Sentinel group and a Redis Cluster.

Everything runs from the ``redis-server`` binary (a sentinel is ``redis-server <conf>
--sentinel``) on free loopback ports, each process with its own directory, config file and log
file there; no containers, no mocks. Tests kill, fail over and restart nodes for real:

- :class:`SentinelGroup`: a primary, one replica (``replicaof``) and three sentinels watching
  ``mymaster`` with quorum 2. ``kill_primary()`` + ``wait_failover()`` is a real failover.
- :class:`ClusterDeployment`: three masters with one replica each, created with
  ``redis-cli --cluster create``. Manual failover, kill + automatic promotion, restart, and a
  slot migration done step by step (so a test can let jobs flow while a slot is half moved).

The fixtures ``sentinel_group`` (per test), ``redis_cluster`` (per session: for tests that leave
it healthy) and ``fresh_cluster`` (per test: for tests that break it) live here too; a test
module imports them by name::

    from deployments import fresh_cluster, redis_cluster, sentinel_group  # noqa: F401

(a test taking the fixture as an argument then shadows the import: ruff reports F811 there,
a false positive for pytest fixtures; ``# ruff: noqa: F811`` at the top of the module).
``redis_cluster`` is one cluster for the whole session even when several modules import it.

Every wait is a condition polled against a deadline. The waiting methods block: an ``async``
test that must keep its event loop running meanwhile (a worker in the same loop) calls them
through ``await asyncio.to_thread(...)``.

Start-up speed matters (the suite runs on a small CI machine), so the deployments are tuned
for tests: diskless replication without the default 5 s delay, sentinels that already know
each other and the replica from their config files and look at instances more often
(``SENTINEL DEBUG``), and a 2 s cluster node timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

HOST = "127.0.0.1"
MASTER_NAME = "mymaster"
SLOTS = 16384
POLL = 0.05  # seconds between two looks at a condition
# Commands that are not an application's load: ClusterDeployment.command_counts() skips them.
HOUSEKEEPING = frozenset(
    {"cluster", "info", "ping", "config", "command", "client", "hello", "readonly",
     "readwrite", "select", "role", "replconf", "psync", "sync", "asking", "auth", "echo"}
)  # fmt: skip

# Ports are taken below the kernel's ephemeral range (32768-60999 by default), so an outgoing
# connection never takes the port of a node that is down between a kill and a restart, and a
# cluster node's bus port (port + 10000) is below it as well.
_PORT_RANGE = (15000, 22700)
_reserved_ports: set[int] = set()
_live: set[RedisProcess] = set()

T = TypeVar("T")


def _binary(name: str) -> str:
    """The path of a Redis binary, or stop the test session with how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.exit(f"{name} is not installed (apt-get install redis-server redis-tools)", 2)
    return path


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, bus: bool = False) -> list[int]:
    """``n`` distinct free loopback ports, never handed out before in this process.

    With ``bus=True`` the port + 10000 (a cluster node's bus port) is free as well."""
    ports: list[int] = []
    for _ in range(10_000):
        if len(ports) == n:
            return ports
        port = random.randrange(*_PORT_RANGE)
        if port in _reserved_ports or (bus and port + 10000 in _reserved_ports):
            continue
        if _bindable(port) and (not bus or _bindable(port + 10000)):
            _reserved_ports.add(port)
            if bus:
                _reserved_ports.add(port + 10000)
            ports.append(port)
    raise RuntimeError(f"no {n} free ports in {_PORT_RANGE}")


def free_cluster_ports(n: int) -> list[int]:
    """``n`` free ports for cluster nodes: each port and its bus port (port + 10000) free."""
    return free_ports(n, bus=True)


def wait_until(
    condition: Callable[[], T | None], timeout: float, message: str | Callable[[], str]
) -> T:
    """Poll ``condition()`` until it returns something other than ``None``/``False``, and
    return that; raise ``TimeoutError`` with ``message`` after ``timeout`` seconds.

    Redis connection errors inside ``condition`` count as "not yet"."""
    deadline = time.monotonic() + timeout
    error: redis.RedisError | None = None
    while True:
        try:
            result = condition()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
            result, error = None, exc
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            last = f"; last error: {error!r}" if error is not None else ""
            raise TimeoutError(f"{text} (waited {timeout}s{last})")
        time.sleep(POLL)


def client(port: int, *, timeout: float = 2.0) -> redis.Redis:
    """A synchronous, decoding redis-py client of the server on ``port`` (close it after use).

    It does not retry: redis-py's default retries a refused connection for ~5 s, and the
    waits here poll on their own."""
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )


def command(port: int, *args: str | int) -> object:
    """Run one command on the server on ``port`` on a connection of its own."""
    with client(port) as c:
        return c.execute_command(*args)


def _kill_leftovers() -> None:
    """The last resort at interpreter exit: no redis-server outlives the test session."""
    for process in list(_live):
        process.kill()


atexit.register(_kill_leftovers)


class RedisProcess:
    """One ``redis-server`` process (a data node or, with ``sentinel=True``, a sentinel) run
    from a config file in a directory of its own.

    The config file is written once, at the first start: Redis and Sentinel rewrite it
    (``CONFIG REWRITE``, a sentinel's state, a cluster's ``nodes.conf`` beside it) and a
    restart reads what they wrote, like a real server restarting."""

    def __init__(
        self, port: int, directory: Path, config: list[str], *, sentinel: bool = False
    ) -> None:
        self.port = port
        self.directory = directory
        self.config = config
        self.sentinel = sentinel
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def config_file(self) -> Path:
        return self.directory / ("sentinel.conf" if self.sentinel else "redis.conf")

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        """Start the process without waiting for it to answer (see :meth:`wait_ready`)."""
        if self.alive:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        if not self.config_file.exists():
            lines = [
                f"port {self.port}",
                f"bind {HOST}",
                "protected-mode no",
                f'dir "{self.directory}"',
                f'logfile "{self.log_file}"',
                *self.config,
            ]
            self.config_file.write_text("\n".join(lines) + "\n")
        args = [_binary("redis-server"), str(self.config_file)]
        if self.sentinel:
            args.append("--sentinel")
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory
        )
        _live.add(self)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the server answers PING; fail with its log if it exited."""

        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{self.log_tail()}")
            with client(self.port, timeout=0.5) as c:
                return bool(c.ping())

        wait_until(ready, timeout, lambda: f"redis-server on port {self.port} did not start")

    def start(self, timeout: float = 10.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL the process (no shutdown, no save) and reap it."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()
            self.process = None
        _live.discard(self)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _replication(port: int) -> dict[str, object]:
    with client(port) as c:
        return dict(c.info("replication"))


def _role(port: int) -> str:
    """``master`` or ``slave``: the first element of ``ROLE``."""
    reply = command(port, "ROLE")
    assert isinstance(reply, list)
    return str(reply[0])


# --------------------------------------------------------------------------------------------
# Sentinel


class SentinelGroup:
    """A primary, one replica and three sentinels (quorum 2) on loopback, master ``mymaster``.

    Data servers keep nothing on disk (``save ""``, ``appendonly no``). The sentinels find a
    failed primary down after ``down_after_ms`` and a whole failover takes 2-4 s::

        with SentinelGroup(tmp_path) as group:
            old = group.kill_primary()
            new = group.wait_failover(old)
            group.restart(old)  # comes back as a replica of ``new``
    """

    def __init__(
        self, directory: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000
    ) -> None:
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        primary, replica, *sentinel_ports = free_ports(5)
        self.initial_primary = primary
        data = ['save ""', "appendonly no", "repl-diskless-sync-delay 0"]
        self.servers: dict[int, RedisProcess] = {
            primary: RedisProcess(primary, directory / f"redis-{primary}", data),
            replica: RedisProcess(
                replica, directory / f"redis-{replica}", [*data, f"replicaof {HOST} {primary}"]
            ),
        }
        ids = {port: f"{port:040x}" for port in sentinel_ports}  # fixed sentinel ids
        self.sentinels: list[RedisProcess] = []
        for port in sentinel_ports:
            config = [
                f"sentinel myid {ids[port]}",
                f"sentinel monitor {MASTER_NAME} {HOST} {primary} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
                # The replica and the other sentinels are known from the start, as after a
                # sentinel's own config rewrite: no waiting for INFO and hello messages.
                f"sentinel known-replica {MASTER_NAME} {HOST} {replica}",
                *(
                    f"sentinel known-sentinel {MASTER_NAME} {HOST} {other} {ids[other]}"
                    for other in sentinel_ports
                    if other != port
                ),
            ]
            self.sentinels.append(
                RedisProcess(port, directory / f"sentinel-{port}", config, sentinel=True)
            )

    # -- addresses

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, s.port) for s in self.sentinels]

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/mymaster/0``."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    @property
    def data_ports(self) -> list[int]:
        """The ports of the two data servers (primary and replica, whichever is which now)."""
        return list(self.servers)

    # -- life cycle

    def start(self, timeout: float = 20.0) -> None:
        """Start every process; return once the replica is in sync and every sentinel sees a
        healthy primary, replica and both other sentinels (so a failover can happen)."""
        try:
            for server in self.servers.values():
                server.launch()
            for server in self.servers.values():
                server.wait_ready()
            self._wait_replicas_synced(self.initial_primary, timeout)
            for sentinel in self.sentinels:
                sentinel.launch()
            for sentinel in self.sentinels:
                sentinel.wait_ready()
                self._tune(sentinel.port)
            self.wait_sentinels_agree(self.initial_primary, timeout)
        except BaseException:
            self.stop()
            raise

    def _tune(self, port: int) -> None:
        """Shorter sentinel periods than production (``SENTINEL DEBUG``, Redis >= 7.0):

        - PING every 250 ms (default: every min(down-after, 1 s)): a PING a second against a
          down-after of 1 s leaves no margin; in trials a sentinel marked a just-promoted
          primary down 1 s after the switch and started a spurious second failover;
        - is-master-down-by-addr every 250 ms (1 s): the quorum is reached sooner;
        - INFO every second (10 s) and hello messages every 0.5 s (2 s): a restarted old
          primary is turned into a replica after ~2 s instead of 8-20 s;
        - a TILT lasts 5 s instead of 30 s, should a slow machine trigger one."""
        command(
            port,
            "SENTINEL", "DEBUG",
            "ping-period", 250, "ask-period", 250, "info-period", 1000,
            "publish-period", 500, "tilt-period", 5000,
        )  # fmt: skip

    def stop(self) -> None:
        """Kill every process (sentinels first, so they do not fail over a stopping group)."""
        for process in [*self.sentinels, *self.servers.values()]:
            process.kill()

    def __enter__(self) -> SentinelGroup:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- questions

    def _live_sentinels(self) -> list[RedisProcess]:
        return [s for s in self.sentinels if s.alive]

    def primary_port(self) -> int:
        """The primary's port as a sentinel names it (``SENTINEL get-master-addr-by-name``)."""
        errors: list[Exception] = []
        for sentinel in self._live_sentinels():
            try:
                reply = command(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            except redis.RedisError as error:
                errors.append(error)
                continue
            assert isinstance(reply, list)
            return int(reply[1])
        raise RuntimeError(f"no sentinel answered: {errors}")

    def _named_primaries(self) -> set[int]:
        """What every live sentinel names as the primary (a set of one when they agree)."""
        named = set()
        for sentinel in self._live_sentinels():
            reply = command(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            assert isinstance(reply, list)
            named.add(int(reply[1]))
        return named

    def _replicas_synced(self, primary: int) -> bool:
        """Every other live data server replicates ``primary`` with its link up."""
        for port, server in self.servers.items():
            if port == primary or not server.alive:
                continue
            info = _replication(port)
            if (
                info.get("role") != "slave"
                or int(str(info.get("master_port"))) != primary
                or info.get("master_link_status") != "up"
                or info.get("master_sync_in_progress") != 0
            ):
                return False
        return True

    def _wait_replicas_synced(self, primary: int, timeout: float) -> None:
        wait_until(
            lambda: self._replicas_synced(primary),
            timeout,
            lambda: f"replicas not in sync with {primary}: {self._describe()}",
        )

    def _sentinel_view_ok(self, sentinel: int, primary: int) -> bool:
        """``sentinel`` names ``primary``, sees it up, every other live data server as its
        replica (up, link ok) and both other sentinels connected."""
        with client(sentinel) as c:
            master = c.sentinel_master(MASTER_NAME)
            if (
                int(master["port"]) != primary
                or not master["is_master"]
                or master["is_sdown"]
                or master["is_odown"]
                or master["is_disconnected"]
                or "failover_in_progress" in master["flags"]
            ):
                return False
            replicas = {
                int(r["port"]): r
                for r in c.sentinel_slaves(MASTER_NAME)
                if not r["is_sdown"] and not r["is_disconnected"]
            }
            expected = {p for p, s in self.servers.items() if p != primary and s.alive}
            if not expected <= set(replicas):
                return False
            for port in expected:
                r = replicas[port]
                if r["master-link-status"] != "ok" or int(r["master-port"]) != primary:
                    return False
            others = {
                int(s["port"])
                for s in c.sentinel_sentinels(MASTER_NAME)
                if not s["is_sdown"] and not s["is_disconnected"]
            }
        wanted = {s.port for s in self._live_sentinels() if s.port != sentinel}
        return wanted <= others

    def wait_sentinels_agree(self, primary: int, timeout: float = 20.0) -> None:
        """Wait until every live sentinel has a healthy view of ``primary``, its replicas and
        the other sentinels."""
        wait_until(
            lambda: all(self._sentinel_view_ok(s.port, primary) for s in self._live_sentinels()),
            timeout,
            lambda: f"sentinels do not agree on primary {primary}: {self._describe()}",
        )

    def _describe(self) -> str:
        """The state of every process, for a timeout's message."""
        parts = []
        for port in self.servers:
            try:
                info = _replication(port)
                state = f"{info.get('role')} link={info.get('master_link_status', '-')}"
            except redis.RedisError as error:
                state = f"down ({error.__class__.__name__})"
            parts.append(f"data {port}: {state}")
        for sentinel in self.sentinels:
            try:
                with client(sentinel.port) as c:
                    m = c.sentinel_master(MASTER_NAME)
                    state = (
                        f"master={m['port']} flags={m['flags']} "
                        f"replicas={m['num-slaves']} sentinels={m['num-other-sentinels']}"
                    )
            except redis.RedisError as error:
                state = f"down ({error.__class__.__name__})"
            parts.append(f"sentinel {sentinel.port}: {state}")
        return "; ".join(parts)

    # -- faults

    def kill_primary(self) -> int:
        """SIGKILL the current primary; return its port."""
        port = self.primary_port()
        self.servers[port].kill()
        return port

    def kill(self, port: int) -> None:
        """SIGKILL the data server or sentinel on ``port``."""
        for process in [*self.servers.values(), *self.sentinels]:
            if process.port == port:
                process.kill()
                return
        raise KeyError(port)

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Wait until every live sentinel names a primary other than ``old_port`` and that
        server answers ``ROLE`` as master; return its port."""

        def promoted() -> int | None:
            named = self._named_primaries()
            if len(named) != 1:
                return None
            (port,) = named
            if port == old_port or _role(port) != "master":
                return None
            return port

        return wait_until(
            promoted, timeout, lambda: f"no failover from {old_port}: {self._describe()}"
        )

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Restart the killed data server (or sentinel) on ``port`` from its config file.

        A data server: wait until it is a replica of the current primary, in sync, and every
        sentinel sees it so. A killed old primary restarts as a master and the sentinels turn
        it into a replica (``+convert-to-slave``, ~3 s): nothing here does it for them.
        A sentinel: wait until it and the others see each other and the same primary."""
        sentinel = next((s for s in self.sentinels if s.port == port), None)
        if sentinel is not None:
            sentinel.start()
            self._tune(port)
            self.wait_sentinels_agree(self.primary_port(), timeout)
            return
        self.servers[port].start()
        primary = self.primary_port()
        if primary == port:
            raise RuntimeError(f"{port} is still the primary: it had not failed over")
        wait_until(
            lambda: self._replicas_synced(primary),
            timeout,
            lambda: f"{port} did not rejoin as a replica of {primary}: {self._describe()}",
        )
        self.wait_sentinels_agree(primary, timeout)

    def replica_ports(self) -> list[int]:
        """The live data servers other than the primary the sentinels name."""
        primary = self.primary_port()
        return [port for port, s in self.servers.items() if port != primary and s.alive]


# --------------------------------------------------------------------------------------------
# Cluster


@dataclass(frozen=True)
class ClusterNode:
    """One line of ``CLUSTER NODES``: a node as another node sees it."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool
    slots: frozenset[int] = field(default_factory=frozenset)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def parse_cluster_nodes(text: str) -> dict[str, ClusterNode]:
    """``CLUSTER NODES`` output by node id (slot ranges expanded; migration marks dropped)."""
    nodes: dict[str, ClusterNode] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        node_id, address, flags, master, _ping, _pong, _epoch, link, *slot_specs = line.split()
        port = int(address.split("@")[0].rsplit(":", 1)[1])
        slots: set[int] = set()
        for spec in slot_specs:
            if spec.startswith("["):
                continue  # [slot->-node] / [slot-<-node]: migrating / importing
            first, _, last = spec.partition("-")
            slots.update(range(int(first), int(last or first) + 1))
        nodes[node_id] = ClusterNode(
            id=node_id,
            port=port,
            flags=frozenset(flags.split(",")),
            master_id=None if master == "-" else master,
            connected=link == "connected",
            slots=frozenset(slots),
        )
    return nodes


class ClusterDeployment:
    """A Redis Cluster on loopback: ``masters`` masters with ``replicas`` replica(s) each.

    Nodes run with ``cluster-node-timeout`` = ``node_timeout_ms`` (2 s): a killed master is
    replaced by its replica 3-5 s later. ``cluster-replica-validity-factor 0`` lets a replica
    take over however long it was cut off, and nothing is kept on disk but ``nodes.conf``::

        with ClusterDeployment(tmp_path) as cluster:
            slot = cluster.slot_of("key")
            master = cluster.master_of_slot(slot)
            cluster.failover(master)  # its replica takes over, the cluster agrees
    """

    def __init__(
        self,
        directory: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
    ) -> None:
        self.directory = directory
        self.replicas_per_master = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: dict[int, RedisProcess] = {}
        for port in free_cluster_ports(masters * (1 + replicas)):
            config = [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {node_timeout_ms}",
                "cluster-replica-validity-factor 0",
                'save ""',
                "appendonly no",
                "repl-diskless-sync-delay 0",
            ]
            self.nodes[port] = RedisProcess(port, directory / f"node-{port}", config)
        self.ids: dict[int, str] = {}  # port -> node id, known once started
        self._killed: dict[int, frozenset[int]] = {}  # port of a killed node -> its slots
        self._migrations: dict[int, tuple[int, int]] = {}  # slot -> (source, target)

    @property
    def ports(self) -> list[int]:
        """Every node's port, masters and replicas."""
        return list(self.nodes)

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3``: the current masters."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.masters())

    @property
    def running(self) -> bool:
        """Every node's process is up."""
        return all(node.alive for node in self.nodes.values())

    def live_ports(self) -> list[int]:
        return [port for port, node in self.nodes.items() if node.alive]

    # -- life cycle

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, create the cluster with ``redis-cli --cluster create`` and wait
        until it is healthy (see :meth:`wait_healthy`)."""
        cli = _binary("redis-cli")
        try:
            for node in self.nodes.values():
                node.launch()
            for node in self.nodes.values():
                node.wait_ready()
            create = [cli, "--cluster", "create", *(f"{HOST}:{port}" for port in self.nodes)]
            create += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
            result = subprocess.run(
                create,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}"
                )
            for port in self.nodes:
                self.ids[port] = str(command(port, "CLUSTER", "MYID"))
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()

    def __enter__(self) -> ClusterDeployment:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the cluster's view

    def view(self, port: int | None = None) -> dict[str, ClusterNode]:
        """``CLUSTER NODES`` as the node on ``port`` (default: any live node) sees it."""
        if port is None:
            port = self.live_ports()[0]
        text = command(port, "CLUSTER", "NODES")
        assert isinstance(text, str)
        return parse_cluster_nodes(text)

    def _port(self, node_id: str) -> int:
        for port, known in self.ids.items():
            if known == node_id:
                return port
        raise KeyError(node_id)

    def masters(self) -> list[int]:
        """The ports of the nodes that serve slots now (live masters), as the cluster says."""
        return sorted(
            n.port
            for n in self.view().values()
            if n.is_master and n.slots and not n.failing and self.nodes[n.port].alive
        )

    def master_of_slot(self, slot: int) -> int:
        """The port of the master that owns ``slot`` (the source, while it is migrating)."""
        for node in self.view().values():
            if node.is_master and slot in node.slots:
                return node.port
        raise RuntimeError(f"no node owns slot {slot}")

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        """The hash slot of ``key`` (hash tags honoured), as ``CLUSTER KEYSLOT`` computes it."""
        return int(key_slot(key.encode() if isinstance(key, str) else key))

    def replica_of(self, master_port: int) -> int:
        """The port of a live replica of the master on ``master_port``."""
        view = self.view()
        master_id = self.ids[master_port]
        for node in view.values():
            if node.master_id == master_id and not node.failing and self.nodes[node.port].alive:
                return node.port
        raise RuntimeError(f"{master_port} has no live replica")

    def _describe(self) -> str:
        parts = []
        for port, node in self.nodes.items():
            if not node.alive:
                parts.append(f"{port}: killed")
                continue
            try:
                info = command(port, "CLUSTER", "INFO")
                state = str(info).split("\r\n")[0] if isinstance(info, str) else str(info)
                view = self.view(port)
                summary = ", ".join(
                    f"{n.port}:{'M' if n.is_master else 'S'}{len(n.slots)}"
                    + ("!" if n.failing else "")
                    for n in sorted(view.values(), key=lambda n: n.port)
                )
                parts.append(f"{port}: {state} [{summary}]")
            except redis.RedisError as error:
                parts.append(f"{port}: {error.__class__.__name__} {error}")
        return "\n".join(parts)

    def healthy(self) -> bool:
        """Every live node: ``cluster_state:ok``, the same roles, masters and slot owners as
        every other live node, no live node flagged failing or in handshake, and every live
        replica in sync with a live master."""
        live = self.live_ports()
        topology: set[tuple[tuple[str, bool, str | None, frozenset[int]], ...]] = set()
        for port in live:
            with client(port) as c:
                info = c.execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in str(info):
                    return False
                view = parse_cluster_nodes(str(c.execute_command("CLUSTER", "NODES")))
            for other in live:
                node = view.get(self.ids[other])
                if node is None or node.failing or not (node.connected or other == port):
                    return False
            topology.add(
                tuple(
                    sorted(
                        (n.id, n.is_master, n.master_id, n.slots if n.is_master else frozenset())
                        for n in view.values()
                    )
                )
            )
        if len(topology) != 1:
            return False
        (agreed,) = topology
        for node_id, is_master, master_id, _slots in agreed:
            port = self._port(node_id)
            if is_master or not self.nodes[port].alive:
                continue
            if master_id is None or not self.nodes[self._port(master_id)].alive:
                return False
            info = _replication(port)
            if (
                info.get("role") != "slave"
                or int(str(info.get("master_port"))) != self._port(master_id)
                or info.get("master_link_status") != "up"
                or info.get("master_sync_in_progress") != 0
            ):
                return False
        return True

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until :meth:`healthy`."""
        wait_until(self.healthy, timeout, lambda: f"cluster not healthy:\n{self._describe()}")

    # -- faults

    def failover(self, master_port: int, timeout: float = 30.0) -> int:
        """``CLUSTER FAILOVER`` on a replica of ``master_port``; wait until that replica is a
        master, the old master its replica, and the cluster healthy. Return the new master's
        port."""
        replica = self.replica_of(master_port)
        command(replica, "CLUSTER", "FAILOVER")
        issued = time.monotonic()

        def done() -> bool:
            nonlocal issued
            if _role(replica) != "master":
                # A manual failover gives up after 5 s (the master did not pause its clients
                # in time, say on a loaded machine) and is not retried by Redis: ask again.
                if time.monotonic() - issued > 6:
                    command(replica, "CLUSTER", "FAILOVER")
                    issued = time.monotonic()
                return False
            view = self.view(replica)
            old = view[self.ids[master_port]]
            return (
                view[self.ids[replica]].is_master
                and old.master_id == self.ids[replica]
                and self.healthy()
            )

        wait_until(
            done, timeout, lambda: f"failover of {master_port} not done:\n{self._describe()}"
        )
        return replica

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (remembering which slots it served)."""
        view = self.view(port)
        self._killed[port] = view[self.ids[port]].slots
        self.nodes[port].kill()

    def wait_promoted(self, old_master_port: int, timeout: float = 30.0) -> int:
        """After :meth:`kill` of a master: wait until a replica took over all its slots and
        the live nodes are healthy again; return the new master's port."""
        slots = self._killed.get(old_master_port)
        if not slots:
            raise RuntimeError(f"{old_master_port} was not a killed master with slots")

        def promoted() -> int | None:
            view = self.view()
            owners = {n.port for n in view.values() if n.is_master and n.slots & slots}
            if len(owners) != 1:
                return None
            (owner,) = owners
            if owner == old_master_port or not view[self.ids[owner]].slots >= slots:
                return None
            return owner if self.healthy() else None

        return wait_until(
            promoted,
            timeout,
            lambda: f"no replica took over from {old_master_port}:\n{self._describe()}",
        )

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Restart the killed node on ``port`` with its ``nodes.conf``; wait until the cluster
        is healthy with it (a replaced master rejoins as a replica of its successor)."""
        self.nodes[port].start()
        self._killed.pop(port, None)
        self.wait_healthy(timeout)

    # -- slot migration (the manual protocol, step by step)

    def begin_migration(self, slot: int, to_port: int) -> None:
        """``CLUSTER SETSLOT slot IMPORTING`` on the target, then ``MIGRATING`` on the source.
        From now on the source answers ``ASK`` for keys of ``slot`` it no longer has."""
        source = self.master_of_slot(slot)
        if source == to_port:
            raise ValueError(f"slot {slot} is already on {to_port}")
        command(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[source])
        command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[to_port])
        self._migrations[slot] = (source, to_port)

    def move_keys(self, slot: int, batch: int = 100, *, replace: bool = False) -> int:
        """Move up to ``batch`` keys of a migrating ``slot`` (``GETKEYSINSLOT`` + ``MIGRATE ...
        KEYS``); return how many moved (0: none left on the source)."""
        source, target = self._migrations[slot]
        keys = command(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
        assert isinstance(keys, list)
        if not keys:
            return 0
        extra = ["REPLACE"] if replace else []
        command(source, "MIGRATE", HOST, target, "", 0, 10_000, *extra, "KEYS", *keys)
        return len(keys)

    def finish_migration(self, slot: int, timeout: float = 30.0) -> None:
        """Move the keys left, then ``CLUSTER SETSLOT slot NODE target`` on the target, the
        source and every other master; wait until every node agrees."""
        source, target = self._migrations[slot]
        while self.move_keys(slot):
            pass
        target_id = self.ids[target]
        others = [p for p in self.masters() if p not in (source, target)]
        for port in [target, source, *others]:
            command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        del self._migrations[slot]

        def agreed() -> bool:
            return (
                all(slot in self.view(port)[target_id].slots for port in self.live_ports())
                and self.healthy()
            )

        wait_until(agreed, timeout, lambda: f"slot {slot} not on {target}:\n{self._describe()}")

    def migrate_slot(self, slot: int, to_port: int, batch: int = 100) -> None:
        """Move ``slot`` and its keys to the master on ``to_port``: begin, move, finish."""
        self.begin_migration(slot, to_port)
        while self.move_keys(slot, batch):
            pass
        self.finish_migration(slot)

    # -- load

    def command_counts(self, *, exclude: Collection[str] = HOUSEKEEPING) -> dict[int, int]:
        """{master port: commands it ran} from ``INFO commandstats``, since the node started or
        the last :meth:`reset_stats`.

        Commands in ``exclude`` are not counted (by default the housekeeping of clients, of
        replicas and of this class: ``CLUSTER``, ``INFO``, ``PING``, ``REPLCONF``...); pass
        ``exclude=()`` to count everything."""
        skipped = {name.lower() for name in exclude}
        counts = {}
        for port in self.masters():
            with client(port) as c:
                stats = c.info("commandstats")
            counts[port] = sum(
                int(value["calls"])
                for name, value in stats.items()
                if isinstance(value, dict)
                and name.removeprefix("cmdstat_").split("|")[0].lower() not in skipped
            )
        return counts

    def reset_stats(self) -> None:
        """``CONFIG RESETSTAT`` on every live node."""
        for port in self.live_ports():
            command(port, "CONFIG", "RESETSTAT")


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A fresh Sentinel group per test (failover tests destroy it)."""
    with SentinelGroup(tmp_path_factory.mktemp("sentinel")) as group:
        yield group


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDeployment]:
    """One Redis Cluster for the whole session (conftest.py imports the fixtures): for tests
    that leave it healthy (they may move slots or fail a master over, not kill nodes for
    good)."""
    with ClusterDeployment(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def fresh_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDeployment]:
    """A Redis Cluster of its own for a test that breaks it."""
    with ClusterDeployment(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster
