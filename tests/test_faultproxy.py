"""The fault-injecting proxy does what it says, against the real redis-server.

Each fault is checked from the client's side (what redis-py sees) and from Redis's side (what
actually ran, read over a direct connection that bypasses the proxy).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from conftest import RedisServer, free_port
from faultproxy import FaultProxy, _Boundary, _Desync, _RespFramer
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

MB = 1024 * 1024


@pytest.fixture
def direct(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client that talks to Redis without the proxy: the ground truth."""
    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def key(direct: redis.Redis) -> Iterator[str]:
    """A fresh key name; it and every ``{key}:...`` key are deleted after the test."""
    name = f"fp-{uuid.uuid4().hex[:10]}"
    yield name
    for found in direct.scan_iter(match=f"{name}*"):
        direct.delete(found)


@pytest.fixture
def sync_clients(fault_proxy: FaultProxy) -> Iterator[list[redis.Redis]]:
    """Clients made by ``through()`` are closed after the test."""
    made: list[redis.Redis] = []
    yield made
    for client in made:
        client.close()


def through(
    proxy: FaultProxy, made: list[redis.Redis], retries: int = 0, **options: Any
) -> redis.Redis:
    """A sync client connected through the proxy, retrying ``retries`` times (no backoff)."""
    options.setdefault("socket_timeout", 5)
    client = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), retries), **options)
    made.append(client)
    return client


@pytest.fixture
async def async_clients(fault_proxy: FaultProxy) -> AsyncIterator[list[aioredis.Redis]]:
    made: list[aioredis.Redis] = []
    yield made
    for client in made:
        await client.aclose()


def through_async(
    proxy: FaultProxy, made: list[aioredis.Redis], retries: int = 0, **options: Any
) -> aioredis.Redis:
    """An asyncio client connected through the proxy, retrying ``retries`` times."""
    options.setdefault("socket_timeout", 5)
    client = aioredis.Redis(port=proxy.port, retry=AsyncRetry(NoBackoff(), retries), **options)
    made.append(client)
    return client


def command(*words: str | bytes) -> bytes:
    """One command in RESP, as a client sends it."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode() if isinstance(word, str) else word
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def raw_socket(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# Plain forwarding


def test_forwards_many_commands(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through(fault_proxy, sync_clients)
    for i in range(300):
        client.set(f"{key}:{i}", i)
        assert client.get(f"{key}:{i}") == str(i).encode()
    pipe = client.pipeline(transaction=False)
    for _ in range(2000):
        pipe.incr(key)
    assert pipe.execute() == list(range(1, 2001))
    assert direct.get(key) == b"2000"
    assert fault_proxy.commands >= 2600
    assert fault_proxy.accepted == 1


def test_forwards_one_megabyte_values_and_large_pipelines(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through(fault_proxy, sync_clients)
    value = os.urandom(MB)
    client.set(key, value)
    assert client.get(key) == value
    assert direct.get(key) == value

    values = [os.urandom(MB) for _ in range(12)]
    pipe = client.pipeline(transaction=False)
    for i, item in enumerate(values):
        pipe.set(f"{key}:{i}", item)
    pipe.mget([f"{key}:{i}" for i in range(len(values))])
    assert pipe.execute()[-1] == values


async def test_forwards_asyncio_clients(
    fault_proxy: FaultProxy, async_clients: list[aioredis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through_async(fault_proxy, async_clients)
    value = os.urandom(MB)
    await client.set(key, value)
    assert await client.get(key) == value
    counter = f"{key}:n"
    results = await asyncio.gather(*(client.incr(counter) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))
    assert direct.get(counter) == b"50"
    assert fault_proxy.connections >= 1


async def test_forwards_pubsub(
    fault_proxy: FaultProxy, async_clients: list[aioredis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through_async(fault_proxy, async_clients)
    async with client.pubsub() as pubsub:
        await pubsub.subscribe(key)
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        direct.publish(key, "hello")
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None
        assert message["data"] == b"hello"


def test_a_half_closed_client_still_gets_its_reply(fault_proxy: FaultProxy) -> None:
    with raw_socket(fault_proxy) as sock:
        sock.sendall(command("PING"))
        sock.shutdown(socket.SHUT_WR)  # the client half-closes; the reply must still come
        assert read_to_eof(sock) == b"+PONG\r\n"
    fault_proxy.wait_until_blocking(lambda proxy: proxy.connections == 0)


def test_redis_closing_first_reaches_the_client(fault_proxy: FaultProxy) -> None:
    with raw_socket(fault_proxy) as sock:
        sock.sendall(command("QUIT"))  # Redis answers, then closes its side
        assert read_to_eof(sock) == b"+OK\r\n"
    fault_proxy.wait_until_blocking(lambda proxy: proxy.connections == 0)


def test_an_unreachable_target_refuses_clients_and_counts_nothing_open() -> None:
    with FaultProxy("127.0.0.1", free_port()) as proxy:
        client = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0), socket_timeout=5)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.close()
        proxy.wait_until_blocking(lambda p: p.connections == 0 and p.accepted == 1)


# --------------------------------------------------------------------------------------------
# Lost replies


def test_lost_reply_is_resent_by_a_retrying_client_so_the_command_runs_twice(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through(fault_proxy, sync_clients, retries=3)
    fault_proxy.lose_reply(b"INCR")
    assert fault_proxy.armed(b"INCR") == 1
    assert client.incr(key) == 2  # Redis ran it, the reply was lost, redis-py re-sent it
    assert direct.get(key) == b"2"
    assert fault_proxy.fired(b"INCR") == 1
    assert fault_proxy.armed(b"INCR") == 0
    assert fault_proxy.accepted == 2


async def test_lost_reply_with_an_asyncio_client(
    fault_proxy: FaultProxy, async_clients: list[aioredis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through_async(fault_proxy, async_clients, retries=3)
    await client.ping()
    fault_proxy.lose_reply(b"INCR")
    assert await client.incr(key) == 2
    await fault_proxy.wait_fired(b"INCR", timeout=5)
    assert direct.get(key) == b"2"


def test_without_retries_the_client_sees_an_error_after_the_write(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through(fault_proxy, sync_clients)
    client.ping()
    fault_proxy.lose_reply(b"INCR")
    with pytest.raises(redis.ConnectionError):
        client.incr(key)
    assert direct.get(key) == b"1"  # the write happened; only its reply was lost
    assert fault_proxy.fired(b"INCR") == 1
    assert client.incr(key) == 2  # the fault fired once; the next INCR is untouched


def test_count_loses_that_many_replies(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through(fault_proxy, sync_clients, retries=5)
    fault_proxy.lose_reply(b"INCR", count=2)
    assert client.incr(key) == 3
    assert fault_proxy.fired(b"INCR") == 2
    assert direct.get(key) == b"3"


def test_lost_evalsha_reply_runs_the_script_twice(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through(fault_proxy, sync_clients, retries=3)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    direct.script_load(script.script)  # so the first EVALSHA runs instead of failing NOSCRIPT
    fault_proxy.lose_reply(script.sha.encode())
    assert script(keys=[key]) == 2
    assert fault_proxy.fired(script.sha.encode()) == 1
    assert direct.get(key) == b"2"


def test_replies_before_the_lost_one_are_delivered(
    fault_proxy: FaultProxy, direct: redis.Redis, key: str
) -> None:
    marker = f"{key}:marker"
    fault_proxy.lose_reply(marker.encode())
    with raw_socket(fault_proxy) as sock:
        sock.sendall(
            command("SET", key, "1")
            + command("GET", key)
            + command("INCR", marker)
            + command("PING")
        )
        assert read_to_eof(sock) == b"+OK\r\n$1\r\n1\r\n"  # then the connection closes
    assert direct.get(marker) == b"1"
    assert fault_proxy.fired(marker.encode()) == 1


def test_a_lost_reply_at_the_end_of_a_large_pipeline(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through(fault_proxy, sync_clients)
    marker = f"{key}:marker"
    fault_proxy.lose_reply(marker.encode())
    pipe = client.pipeline(transaction=False)
    for i in range(16):
        pipe.set(f"{key}:{i}", os.urandom(MB // 2))
    pipe.incr(marker)
    with pytest.raises(redis.ConnectionError):
        pipe.execute()
    assert direct.exists(*(f"{key}:{i}" for i in range(16))) == 16
    assert direct.get(marker) == b"1"


def test_a_command_queued_in_multi_loses_the_exec_reply(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through(fault_proxy, sync_clients)
    marker = f"{key}:marker"
    fault_proxy.lose_reply(marker.encode())
    pipe = client.pipeline(transaction=True)
    pipe.incr(marker)
    pipe.incr(key)
    with pytest.raises(redis.ConnectionError):
        pipe.execute()
    assert direct.mget(marker, key) == [b"1", b"1"]  # EXEC ran the whole transaction


def test_discard_gives_the_fault_back(fault_proxy: FaultProxy, key: str) -> None:
    fault_proxy.lose_reply(key.encode())
    with raw_socket(fault_proxy) as sock:
        sock.sendall(command("MULTI") + command("INCR", key) + command("DISCARD"))
        sock.sendall(command("QUIT"))
        assert read_to_eof(sock) == b"+OK\r\n+QUEUED\r\n+OK\r\n+OK\r\n"
    assert fault_proxy.armed(key.encode()) == 1
    assert fault_proxy.fired(key.encode()) == 0


async def test_the_reply_to_a_blocked_command_is_lost_when_it_comes(
    fault_proxy: FaultProxy, async_clients: list[aioredis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through_async(fault_proxy, async_clients)
    await client.ping()
    fault_proxy.lose_reply(b"BLPOP")
    sent = fault_proxy.commands
    blpop = asyncio.create_task(client.blpop([key], timeout=30))
    await fault_proxy.wait_until(lambda proxy: proxy.commands > sent)
    assert fault_proxy.fired(b"BLPOP") == 0  # no reply yet, so nothing lost yet
    direct.rpush(key, "job")
    await fault_proxy.wait_fired(b"BLPOP")
    with pytest.raises(redis.ConnectionError):
        await blpop
    assert direct.llen(key) == 0  # Redis popped it; the client never heard


async def test_a_fault_whose_connection_ends_before_the_reply_is_rearmed(
    fault_proxy: FaultProxy, async_clients: list[aioredis.Redis], key: str
) -> None:
    client = through_async(fault_proxy, async_clients)
    await client.ping()
    fault_proxy.lose_reply(b"BLPOP")
    sent = fault_proxy.commands
    blpop = asyncio.create_task(client.blpop([key], timeout=30))
    await fault_proxy.wait_until(lambda proxy: proxy.commands > sent)
    assert fault_proxy.armed(b"BLPOP") == 0  # taken by this connection
    fault_proxy.cut_all()
    with pytest.raises(redis.ConnectionError):
        await blpop
    assert fault_proxy.armed(b"BLPOP") == 1  # no reply was lost, so it is still to come
    assert fault_proxy.fired(b"BLPOP") == 0


async def test_wait_fired_has_a_deadline(fault_proxy: FaultProxy) -> None:
    fault_proxy.lose_reply(b"NEVER-SENT")
    with pytest.raises(TimeoutError):
        await fault_proxy.wait_fired(b"NEVER-SENT", timeout=0.05)


def test_the_proxy_serves_while_the_test_loop_is_blocked_and_other_processes(
    fault_proxy: FaultProxy, direct: redis.Redis, key: str
) -> None:
    fault_proxy.lose_reply(b"INCR")
    program = (
        "import redis, redis.backoff, redis.retry; "
        "retry = redis.retry.Retry(redis.backoff.NoBackoff(), 3); "
        f"print(redis.Redis(port={fault_proxy.port}, retry=retry).incr({key!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "2"  # its retry re-sent the INCR
    assert direct.get(key) == b"2"
    assert fault_proxy.fired(b"INCR") == 1


async def test_control_methods_work_from_other_threads(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    client = through(fault_proxy, sync_clients, retries=3)
    await asyncio.to_thread(fault_proxy.lose_reply, b"INCR")
    assert await asyncio.to_thread(client.incr, key) == 2
    await asyncio.to_thread(fault_proxy.wait_until_blocking, lambda p: p.fired(b"INCR") == 1)


def test_restore_clears_every_fault(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    fault_proxy.lose_reply(b"INCR", count=3)
    fault_proxy.delay(30)
    fault_proxy.blackhole(None)
    fault_proxy.restore()
    assert not fault_proxy.blackholed
    assert fault_proxy.armed(b"INCR") == 0
    client = through(fault_proxy, sync_clients, socket_timeout=5)  # a 30 s delay would time out
    assert client.incr(key) == 1
    assert fault_proxy.fired(b"INCR") == 0


# --------------------------------------------------------------------------------------------
# Cut connections


async def test_cut_all_breaks_a_command_in_flight_and_new_connections_work(
    fault_proxy: FaultProxy, async_clients: list[aioredis.Redis], key: str
) -> None:
    client = through_async(fault_proxy, async_clients)
    await client.ping()
    sent = fault_proxy.commands
    blpop = asyncio.create_task(client.blpop([key], timeout=30))
    await fault_proxy.wait_until(lambda proxy: proxy.commands > sent)
    assert fault_proxy.cut_all() == 1
    assert fault_proxy.connections == 0
    with pytest.raises(redis.ConnectionError):
        await blpop
    assert await client.ping()  # on a fresh connection
    assert fault_proxy.accepted == 2


def test_cut_all_resets_an_idle_connection(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis]
) -> None:
    client = through(fault_proxy, sync_clients, single_connection_client=True)
    assert client.ping()
    assert fault_proxy.cut_all() == 1
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert client.ping()  # it reconnects on the next command
    assert through(fault_proxy, sync_clients).ping()


# --------------------------------------------------------------------------------------------
# Blackhole and delay


async def test_blackhole_times_out_commands_then_heals(
    fault_proxy: FaultProxy, sync_clients: list[redis.Redis], direct: redis.Redis, key: str
) -> None:
    existing = through(fault_proxy, sync_clients, socket_timeout=0.3)
    assert existing.ping()
    began = time.monotonic()
    fault_proxy.blackhole(1.0)
    assert fault_proxy.blackholed
    with pytest.raises(redis.TimeoutError):
        existing.set(key, "lost")  # on the connection opened before the partition
    fresh = through(fault_proxy, sync_clients, socket_timeout=0.3)
    with pytest.raises(redis.TimeoutError):
        fresh.ping()  # connects, but the handshake is never answered
    await fault_proxy.wait_until(lambda proxy: not proxy.blackholed, timeout=5)
    assert time.monotonic() - began >= 1.0
    await fault_proxy.wait_until(lambda proxy: proxy.connections == 0)  # all were reset
    assert existing.ping()
    assert fresh.ping()
    assert direct.get(key) is None  # nothing was forwarded during the partition


def test_blackhole_until_restore_resets_its_connections(
    fault_proxy: FaultProxy, direct: redis.Redis, key: str
) -> None:
    fault_proxy.blackhole(None)
    with raw_socket(fault_proxy, timeout=0.3) as sock:
        sock.sendall(command("SET", key, "1"))
        with pytest.raises(socket.timeout):
            sock.recv(1)
        fault_proxy.restore()
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    with raw_socket(fault_proxy) as sock:
        sock.sendall(command("PING"))
        assert sock.recv(100) == b"+PONG\r\n"
    assert direct.get(key) is None


def test_delay_holds_replies_back(fault_proxy: FaultProxy, sync_clients: list[redis.Redis]) -> None:
    client = through(fault_proxy, sync_clients)
    assert client.ping()
    fault_proxy.delay(0.2)
    began = time.monotonic()
    assert client.ping()
    assert time.monotonic() - began >= 0.2
    fault_proxy.delay(0)
    assert client.ping()


async def test_delay_holds_replies_back_for_asyncio_clients(
    fault_proxy: FaultProxy, async_clients: list[aioredis.Redis]
) -> None:
    client = through_async(fault_proxy, async_clients)
    assert await client.ping()
    fault_proxy.delay(0.2)
    began = time.monotonic()
    assert await client.ping()
    assert time.monotonic() - began >= 0.2


# --------------------------------------------------------------------------------------------
# Lifecycle


async def test_stop_closes_the_listener_and_every_connection(
    redis_server: RedisServer, key: str
) -> None:
    threads_before = set(threading.enumerate())
    proxy = FaultProxy("127.0.0.1", redis_server.port).start()
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    client = aioredis.Redis(port=proxy.port, retry=AsyncRetry(NoBackoff(), 0), socket_timeout=5)
    await client.ping()
    sent = proxy.commands
    blpop = asyncio.create_task(client.blpop([key], timeout=30))
    await proxy.wait_until(lambda p: p.commands > sent)
    partitioned = raw_socket(proxy)
    proxy.blackhole(None)
    partitioned.sendall(command("PING"))
    proxy.delay(10)
    proxy.stop()
    proxy.stop()  # idempotent
    with pytest.raises(redis.ConnectionError):
        await blpop
    with pytest.raises(ConnectionError):
        partitioned.recv(1)  # reset
    partitioned.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    with pytest.raises(RuntimeError):
        proxy.cut_all()
    started = set(threading.enumerate()) - threads_before
    assert not [thread for thread in started if thread.name.startswith("FaultProxy")]
    await client.aclose()


# --------------------------------------------------------------------------------------------
# RESP framing


RESP3_REPLIES = [
    b"+OK\r\n",
    b"$-1\r\n",
    b"*0\r\n",
    b"_\r\n",
    b"$0\r\n\r\n",
    b"=8\r\ntxt:abcd\r\n",
    b"*2\r\n$3\r\nfoo\r\n%1\r\n+a\r\n:1\r\n",
    b"|1\r\n+ttl\r\n:3\r\n*1\r\n,1.5\r\n",  # an attribute, then the reply it annotates
    b">2\r\n+message\r\n$5\r\nhello\r\n",  # a push message: not a reply
    b"~2\r\n#t\r\n(12345678901234567890\r\n",
    b"-ERR wrong\r\n",
]


def _expected_boundaries(messages: list[bytes]) -> list[_Boundary]:
    boundaries, offset = [], 0
    for message in messages:
        push = message.startswith(b">")
        boundaries.append(_Boundary(offset, start=True, push=push))
        offset += len(message)
        boundaries.append(_Boundary(offset, start=False, push=push))
    return boundaries


def test_framer_finds_resp3_message_boundaries_whole_or_byte_by_byte() -> None:
    stream = b"".join(RESP3_REPLIES)
    assert _RespFramer().feed(stream) == _expected_boundaries(RESP3_REPLIES)
    framer = _RespFramer()
    found = [boundary for i in range(len(stream)) for boundary in framer.feed(stream[i : i + 1])]
    assert found == _expected_boundaries(RESP3_REPLIES)


def test_framer_skips_large_bulk_strings_across_reads() -> None:
    messages = [command("SET", "k", os.urandom(MB)), command("GET", "k")]
    stream = b"".join(messages)
    framer = _RespFramer()
    found = [b for i in range(0, len(stream), 4096) for b in framer.feed(stream[i : i + 4096])]
    assert found == _expected_boundaries(messages)


def test_framer_rejects_what_is_not_resp() -> None:
    with pytest.raises(_Desync):
        _RespFramer().feed(b"PING\r\n")
    with pytest.raises(_Desync):
        _RespFramer().feed(b"$abc\r\n")
