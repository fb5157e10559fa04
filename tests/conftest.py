"""Test fixtures: a private redis-server for the session, a fresh queue per test.

The suite never touches the machine's shared Redis: it starts its own ``redis-server`` on a
free loopback port, so tests can also kill and restart it to inject faults. Every test gets a
queue with a unique name, hence its own keys.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from deployments import fresh_cluster, redis_cluster, sentinel_group  # noqa: F401
from faultproxy import FaultProxy

from aioqueue import Queue
from aioqueue.brokers.memory import reset_stores
from aioqueue.brokers.redis import RedisBroker

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server subprocess the tests own: start, kill, restart."""

    def __init__(
        self, directory: Path, *, appendonly: bool = False, extra: tuple[str, ...] = ()
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, binary: str) -> list[str]:
        """The redis-server command line."""
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
            *self.extra,
        ]

    def client(self) -> redis.Redis:
        """A synchronous client of this server."""
        return redis.Redis(port=self.port, socket_timeout=1)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.exit("redis-server is not installed (apt-get install redis-server)", 2)
        self.process = subprocess.Popen(
            self.command(binary), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:  # a condition wait: the server answers PING, or the deadline passes
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.ConnectionError:
                pass
            if self.process.poll() is not None:
                self.not_started()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def not_started(self) -> None:
        """The server process exited at start."""
        raise RuntimeError(f"redis-server on port {self.port} exited at start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(params=["redis", "memory"])
def storage_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The suite's redis-server, then a fresh memory:// store: for tests run on both."""
    yield from _storage(request)


@pytest.fixture(params=["redis", "memory", "cluster"])
def every_storage_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The suite's redis-server, a fresh memory:// store, and the suite's Redis Cluster
    (three masters, a replica each)."""
    yield from _storage(request)


def _storage(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        url = f"memory://{uuid.uuid4().hex}"
        yield url
        reset_stores(url)
    else:
        server = "redis_server" if request.param == "redis" else "redis_cluster"
        yield request.getfixturevalue(server).url


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AIOQUEUE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def queue_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def queue(redis_server: RedisServer, queue_name: str) -> AsyncIterator[Queue]:
    q = Queue(redis_server.url, name=queue_name)
    yield q
    await q.close()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


@pytest.fixture
def fault_proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's redis-server: connect through ``fault_proxy.url``
    and inject lost replies, delays, cuts and partitions (see tests/faultproxy.py)."""
    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        yield proxy


@pytest.fixture
async def broker(fault_proxy: FaultProxy, queue_name: str) -> AsyncIterator[RedisBroker]:
    """A RedisBroker on a fresh queue, connected through ``fault_proxy`` (its scripts'
    replies can be lost), with the consumer group created."""
    broker = RedisBroker(fault_proxy.url, queue_name, result_ttl=60)
    await broker.connect()
    await broker.ensure_group()
    yield broker
    await broker.close()
