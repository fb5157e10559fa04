"""A fault-injecting TCP proxy between Redis clients and the suite's redis-server.

Tests point a client (or a worker subprocess) at ``proxy.url`` instead of the server and then
break the connection on purpose, to prove that every state change survives a lost reply or a
cut connection::

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        client = redis.Redis.from_url(proxy.url, retry=Retry(NoBackoff(), 3))
        proxy.lose_reply(b"INCR")
        assert client.incr("n") == 2  # Redis ran INCR, the reply was lost, redis-py re-sent it
        assert proxy.fired(b"INCR") == 1

Faults:

- ``lose_reply(match)``: the next command whose raw RESP bytes contain ``match`` reaches Redis
  and runs; the first byte of *its* reply proves that, then the proxy drops the reply and closes
  the connection. Earlier replies on the connection (a pipeline) are delivered first.
- ``delay(seconds)``: every reply from Redis is held back that long.
- ``cut_all()``: every open connection is reset at once; new connections work.
- ``blackhole(seconds)``: a network partition: bytes are read but nothing is forwarded or
  answered; when it ends the black-holed connections are reset and new ones work.
- ``restore()``: clears all of the above.

The proxy runs its own event loop in a daemon thread, so it keeps working while a test blocks
its own loop (a synchronous redis-py call inside an ``async def`` test) and serves
subprocesses. Every public method is thread-safe and may be called from sync or async code;
the control methods return once the change is in effect. Waiting is done with
:meth:`FaultProxy.wait_until` / :meth:`FaultProxy.wait_fired` (async, with a deadline) or
:meth:`FaultProxy.wait_until_blocking` (sync), never with sleeps.

How a reply is matched to its command: the proxy frames both byte streams as RESP (requests are
arrays of bulk strings; replies are RESP2 or RESP3, with push messages and attributes) and
counts commands and replies per connection: reply *n* answers command *n*. Commands that break
that pairing (SUBSCRIBE and friends, MONITOR, CLIENT REPLY) or bytes that are not RESP switch the
connection to an approximate mode where the first reply bytes read after the matching command
count as its reply. A command queued between MULTI and EXEC runs at EXEC, so it is the EXEC
reply that is lost (after DISCARD the fault is re-armed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import logging
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

__all__ = ["FaultProxy"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Bytes read from a socket at a time.
CHUNK_SIZE = 64 * 1024
#: Reply chunks buffered per connection before the proxy stops reading from Redis.
OUTBOX_SIZE = 64
#: How long a control call may wait for the proxy's thread before it is declared stuck.
CONTROL_TIMEOUT = 10.0
#: Longest RESP header line accepted (a type byte, a number or a simple string, CRLF).
MAX_HEADER_LINE = 64 * 1024

_SIMPLE_TYPES = frozenset(b"+-:_,#(")  # a single line is the whole value
_BULK_TYPES = frozenset(b"$!=")  # a length line, then that many bytes and CRLF
_AGGREGATE_TYPES = frozenset(b"*~>%|")  # a count line, then that many values
_PAIRED_TYPES = frozenset(b"%|")  # maps and attributes count key/value pairs
_ATTRIBUTE = ord("|")
_PUSH = ord(">")

#: Commands after which replies no longer answer commands one for one.
_UNPAIRED_COMMANDS = frozenset(
    {b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"MONITOR", b"SYNC", b"PSYNC"}
)


# --------------------------------------------------------------------------------------------
# RESP framing


class _Desync(Exception):
    """The byte stream is not RESP the framer understands."""


class _Boundary(NamedTuple):
    """Where a top-level RESP message starts or ends, as an offset in the whole stream."""

    offset: int
    start: bool  # True: the message's first byte is at ``offset``; False: it ends before it
    push: bool  # a RESP3 push message (out of band: not the reply to a command)


class _RespFramer:
    """Finds the boundaries of top-level messages in a RESP2/RESP3 stream, incrementally.

    It never copies or buffers payloads: a bulk string is skipped by its length, so a 1 MB
    value costs as much as a short one, and a reply split over any number of reads is
    followed across them. A start boundary is reported as soon as a message's first byte is
    fed, an end boundary once its last byte is.
    """

    def __init__(self) -> None:
        self.offset = 0  # bytes fed so far
        self.broken = False  # set by the caller once feed() raised _Desync
        self._line = bytearray()  # a header line split across reads
        self._skip = 0  # payload bytes (and CRLF) of a bulk string still to pass over
        self._stack: list[list[int]] = []  # [values still expected, is attribute] per level
        self._in_message = False
        self._push = False

    def feed(self, data: bytes) -> list[_Boundary]:
        """Consume ``data``; return the boundaries inside it. Raises _Desync on bad input."""
        boundaries: list[_Boundary] = []
        base, size, i = self.offset, len(data), 0
        while i < size:
            if self._skip:
                step = min(self._skip, size - i)
                i += step
                self._skip -= step
                if not self._skip:
                    self._value_done(base + i, boundaries)
                continue
            if not self._in_message:
                self._in_message = True
                self._push = data[i] == _PUSH
                boundaries.append(_Boundary(base + i, start=True, push=self._push))
            newline = data.find(b"\n", i)
            if newline < 0:
                self._line += data[i:]
                if len(self._line) > MAX_HEADER_LINE:
                    raise _Desync("header line too long")
                break
            line = bytes(self._line) + data[i : newline + 1]
            self._line.clear()
            i = newline + 1
            self._header(line, base + i, boundaries)
        self.offset = base + size
        return boundaries

    def _header(self, line: bytes, end: int, boundaries: list[_Boundary]) -> None:
        kind = line[0]
        if len(line) < 3 or not line.endswith(b"\r\n"):
            raise _Desync(f"not a RESP header line: {line[:40]!r}")
        if kind in _SIMPLE_TYPES:
            self._value_done(end, boundaries)
            return
        try:
            count = int(line[1:-2])
        except ValueError:
            raise _Desync(f"bad RESP length: {line[:40]!r}") from None
        if kind in _BULK_TYPES:
            if count < 0:  # RESP2 null bulk string
                self._value_done(end, boundaries)
            else:
                self._skip = count + 2
        elif kind in _AGGREGATE_TYPES:
            if kind in _PAIRED_TYPES:
                count *= 2
            if count > 0:
                self._stack.append([count, kind == _ATTRIBUTE])
            elif kind != _ATTRIBUTE:  # empty or null aggregate; an empty attribute is nothing
                self._value_done(end, boundaries)
        else:
            raise _Desync(f"unknown RESP type: {line[:40]!r}")

    def _value_done(self, end: int, boundaries: list[_Boundary]) -> None:
        while self._stack:
            level = self._stack[-1]
            level[0] -= 1
            if level[0] > 0:
                return
            self._stack.pop()
            if level[1]:  # an attribute annotates the value that follows it
                return
        self._in_message = False
        boundaries.append(_Boundary(end, start=False, push=self._push))


def _command_words(raw: bytes, limit: int = 2) -> list[bytes]:
    """The first ``limit`` words of one RESP command (uppercased), or [] if unparsable."""
    words: list[bytes] = []
    try:
        head, rest = raw.split(b"\r\n", 1)
        count = int(head[1:])
        for _ in range(min(count, limit)):
            length_line, rest = rest.split(b"\r\n", 1)
            length = int(length_line[1:])
            words.append(rest[:length].upper())
            rest = rest[length + 2 :]
    except ValueError:
        return []
    return words


# --------------------------------------------------------------------------------------------
# Connections


class _Signal(enum.Enum):
    EOF = "eof"  # Redis closed its side: half-close the client's side
    CUT = "cut"  # a lost reply begins here: drop it and close the connection


class _Loss(NamedTuple):
    match: bytes
    reply_index: int | None  # which reply to drop; None: the next bytes Redis sends


async def _forever() -> None:
    """Wait until cancelled."""
    await asyncio.get_running_loop().create_future()


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close a socket with an RST (SO_LINGER 0), discarding anything not yet sent."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One client connection and, unless it was accepted during a blackhole, its Redis side."""

    def __init__(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.number = number
        self.client_reader = reader
        self.client_writer = writer
        self.server_reader: asyncio.StreamReader | None = None
        self.server_writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.blackholed = False
        self.outbox: asyncio.Queue[tuple[float, bytes] | _Signal] = asyncio.Queue(OUTBOX_SIZE)
        # Request side: framing, the command being received (for matching), commands seen.
        self.requests = _RespFramer()
        self.command = bytearray()
        self.command_start = 0
        self.commands = 0
        # Reply side: framing and replies begun; `paired` while reply n answers command n.
        self.replies = _RespFramer()
        self.replies_started = 0
        self.paired = True
        self.loss: _Loss | None = None
        # Inside MULTI a matching command only runs at EXEC: its fault waits here until then.
        self.in_multi = False
        self.queued_loss: bytes | None = None

    def abort(self) -> None:
        """Reset both sockets and stop serving the connection."""
        _reset(self.client_writer)
        _reset(self.server_writer)
        if self.task is not None:
            self.task.cancel()

    def __repr__(self) -> str:
        return f"<connection #{self.number}{' blackholed' if self.blackholed else ''}>"


# --------------------------------------------------------------------------------------------
# The proxy


class FaultProxy:
    """A TCP proxy to ``target_host:target_port`` that injects faults on demand.

    Create it, ``start()`` it (or use it as a context manager), point clients at :attr:`url`,
    and ``stop()`` it. See the module docstring for the faults it injects.
    """

    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0) -> None:
        self.target: tuple[str, int] = (target_host, target_port)
        self._listen_port = listen_port
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        # Owned by the proxy's thread (set up in _main, touched only on its loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._connections: set[_Connection] = set()
        self._delay = 0.0
        self._blackhole_timer: asyncio.TimerHandle | None = None
        self._lingering: set[asyncio.StreamWriter] = set()  # closed, still flushing
        # Shared with other threads: guarded by the lock.
        self._lock = threading.RLock()
        self._armed: dict[bytes, int] = {}
        self._fired: dict[bytes, int] = {}
        self._blackholed = False
        self._open = 0
        self._accepted = 0
        self._commands = 0
        self._waiters: list[
            tuple[Callable[[FaultProxy], bool], concurrent.futures.Future[None]]
        ] = []

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("a FaultProxy can be started only once")
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main,
            args=(started,),
            name=f"FaultProxy->{self.target[0]}:{self.target[1]}",
            daemon=True,
        )
        self._thread.start()
        self._port = started.result(timeout=CONTROL_TIMEOUT)
        return self

    def stop(self) -> None:
        """Close the listener and reset every connection; wait for the thread. Idempotent."""
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None or self._stopped:
            return
        self._check_thread()
        self._stopped = True
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is already gone
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout=CONTROL_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("the FaultProxy thread did not stop")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- addresses and counters --------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (127.0.0.1)."""
        if self._port is None:
            raise RuntimeError("the FaultProxy is not started")
        return self._port

    @property
    def url(self) -> str:
        """A Redis URL (database 0) that reaches the target through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def connections(self) -> int:
        """Client connections open right now (black-holed ones included)."""
        with self._lock:
            return self._open

    @property
    def accepted(self) -> int:
        """Client connections accepted since start."""
        with self._lock:
            return self._accepted

    @property
    def commands(self) -> int:
        """Complete commands forwarded to Redis since start (over all connections)."""
        with self._lock:
            return self._commands

    @property
    def blackholed(self) -> bool:
        """Whether a blackhole is in effect."""
        with self._lock:
            return self._blackholed

    def fired(self, match: bytes) -> int:
        """How many replies ``lose_reply(match)`` has dropped since start."""
        with self._lock:
            return self._fired.get(match, 0)

    def armed(self, match: bytes) -> int:
        """How many more commands matching ``match`` will have their reply lost."""
        with self._lock:
            return self._armed.get(match, 0)

    # ---- faults ------------------------------------------------------------------------------

    def lose_reply(self, match: bytes, count: int = 1) -> None:
        """Lose the reply to each of the next ``count`` commands containing ``match``.

        ``match`` is compared with the raw RESP bytes of each whole command (name and
        arguments), e.g. ``b"INCR"``, ``b"XREADGROUP"`` or a script's SHA1 hex for EVALSHA;
        it is case-sensitive and redis-py sends command names in capitals. Such a command is
        forwarded and runs; when the first byte of its reply arrives, everything before it is
        delivered, the reply is dropped, the client's connection is closed (after flushing)
        and the Redis side reset. Calls add up: arming twice loses two replies. If the
        connection ends before that reply comes (cut, client gone), the fault is re-armed.
        """
        if not match:
            raise ValueError("match must not be empty")
        if count < 1:
            raise ValueError("count must be at least 1")

        async def arm() -> None:
            with self._lock:
                self._armed[match] = self._armed.get(match, 0) + count

        self._call(arm)

    def delay(self, seconds: float) -> None:
        """Hold every reply from Redis back ``seconds`` from when it arrives; 0 turns it off."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")

        async def set_delay() -> None:
            self._delay = seconds

        self._call(set_delay)

    def cut_all(self) -> int:
        """Reset every open connection at once and return how many there were.

        Clients see a connection reset; connections made afterwards work. When this returns,
        the connections it cut are gone from :attr:`connections`.
        """

        async def cut() -> int:
            connections = list(self._connections)
            await self._close(connections)
            logger.debug("cut %d connections", len(connections))
            return len(connections)

        return self._call(cut)

    def blackhole(self, seconds: float | None) -> None:
        """Partition the network for ``seconds`` (``None``: until :meth:`restore`).

        Meanwhile connections are still accepted and client bytes read, but nothing is
        forwarded in either direction and nothing is answered. When it ends, every connection
        that was black-holed (open at the start or accepted since) is reset; new ones work.
        """
        if seconds is not None and seconds < 0:
            raise ValueError("seconds must not be negative")

        async def begin() -> None:
            loop = asyncio.get_running_loop()
            if self._blackhole_timer is not None:
                self._blackhole_timer.cancel()
                self._blackhole_timer = None
            for connection in self._connections:
                connection.blackholed = True
            with self._lock:
                self._blackholed = True
                self._changed()
            if seconds is not None:
                self._blackhole_timer = loop.call_later(seconds, self._end_blackhole)

        self._call(begin)

    def restore(self) -> None:
        """Clear every fault: armed and pending lost replies, the delay and a blackhole."""

        async def clear() -> None:
            with self._lock:
                self._armed.clear()
            self._delay = 0.0
            for connection in self._connections:
                connection.loss = connection.queued_loss = None
            await self._close(self._end_blackhole())

        self._call(clear)

    # ---- waiting -----------------------------------------------------------------------------

    async def wait_until(
        self, predicate: Callable[[FaultProxy], bool], timeout: float = 5.0
    ) -> None:
        """Wait (without blocking the loop) until ``predicate(proxy)`` is true.

        The predicate is checked now and whenever a counter or the blackhole changes (on the
        proxy's thread, so it must be quick and must not call control methods). Raises
        TimeoutError after ``timeout`` seconds.
        """
        future = self._subscribe(predicate)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"proxy condition not met within {timeout}s") from None
        finally:
            self._unsubscribe(future)

    def wait_until_blocking(
        self, predicate: Callable[[FaultProxy], bool], timeout: float = 5.0
    ) -> None:
        """Like :meth:`wait_until`, for synchronous code: blocks the calling thread."""
        future = self._subscribe(predicate)
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"proxy condition not met within {timeout}s") from None
        finally:
            self._unsubscribe(future)

    async def wait_fired(self, match: bytes, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``lose_reply(match)`` has dropped ``count`` replies in total."""
        await self.wait_until(lambda proxy: proxy.fired(match) >= count, timeout)

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self._port}" if self._port is not None else "not started"
        return f"<FaultProxy {where} -> {self.target[0]}:{self.target[1]}>"

    # ---- the proxy's thread --------------------------------------------------------------------

    def _thread_main(self, started: concurrent.futures.Future[int]) -> None:
        try:
            asyncio.run(self._main(started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            else:
                logger.exception("FaultProxy thread crashed")

    async def _main(self, started: concurrent.futures.Future[int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", self._listen_port)
        started.set_result(int(server.sockets[0].getsockname()[1]))
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            if self._blackhole_timer is not None:
                self._blackhole_timer.cancel()
            await self._close(list(self._connections))
            for writer in self._lingering:
                _reset(writer)
            await server.wait_closed()

    def _check_thread(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy control methods cannot run on the proxy's own thread")

    def _call(self, function: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``function()`` on the proxy's loop and return its result (thread-safe)."""
        loop = self._loop
        if loop is None or self._stopped:
            raise RuntimeError("the FaultProxy is not running")
        self._check_thread()
        return asyncio.run_coroutine_threadsafe(function(), loop).result(CONTROL_TIMEOUT)

    def _subscribe(
        self, predicate: Callable[[FaultProxy], bool]
    ) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if predicate(self):
                future.set_result(None)
            else:
                self._waiters.append((predicate, future))
        return future

    def _unsubscribe(self, future: concurrent.futures.Future[None]) -> None:
        future.cancel()
        with self._lock:
            self._waiters = [waiter for waiter in self._waiters if waiter[1] is not future]

    def _changed(self) -> None:
        """Wake the waiters whose condition now holds. Called with the lock held."""
        still_waiting: list[
            tuple[Callable[[FaultProxy], bool], concurrent.futures.Future[None]]
        ] = []
        for predicate, future in self._waiters:
            if future.done():
                continue
            try:
                if predicate(self):
                    future.set_result(None)
                else:
                    still_waiting.append((predicate, future))
            except concurrent.futures.InvalidStateError:
                pass  # cancelled by its waiter meanwhile
            except Exception as exc:
                future.set_exception(exc)
        self._waiters = still_waiting

    def _end_blackhole(self) -> list[_Connection]:
        """End a blackhole: reset the black-holed connections and return them."""
        if self._blackhole_timer is not None:
            self._blackhole_timer.cancel()
            self._blackhole_timer = None
        victims = [connection for connection in self._connections if connection.blackholed]
        for connection in victims:
            connection.abort()
        with self._lock:
            if self._blackholed:
                logger.debug("blackhole over, reset %d connections", len(victims))
            self._blackholed = False
            self._changed()
        return victims

    async def _close(self, connections: list[_Connection]) -> None:
        """Reset connections and wait until their tasks are done."""
        for connection in connections:
            connection.abort()
        tasks = [connection.task for connection in connections if connection.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- one connection --------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._accepted += 1
            self._open += 1
            connection = _Connection(self._accepted, reader, writer)
            self._changed()
        connection.blackholed = self._blackholed
        self._connections.add(connection)
        connection.task = asyncio.get_running_loop().create_task(self._serve(connection))
        connection.task.add_done_callback(functools.partial(self._forget, connection))

    def _forget(self, connection: _Connection, task: asyncio.Task[None]) -> None:
        self._connections.discard(connection)
        for writer in (connection.client_writer, connection.server_writer):
            if writer is not None and not writer.transport.is_closing():
                _reset(writer)
        unfired = connection.queued_loss or (connection.loss and connection.loss.match)
        with self._lock:
            if unfired:  # the connection ended before the reply came: not lost yet
                self._armed[unfired] = self._armed.get(unfired, 0) + 1
            self._open -= 1
            self._changed()
        if not task.cancelled() and task.exception() is not None:
            logger.error("%r failed", connection, exc_info=task.exception())

    async def _serve(self, connection: _Connection) -> None:
        if connection.blackholed:
            while await connection.client_reader.read(CHUNK_SIZE):
                pass  # a partition: swallow everything, answer nothing
            await _forever()
            return
        try:
            server = await asyncio.open_connection(*self.target)
        except OSError as exc:
            logger.debug("%r: cannot reach %s:%d: %s", connection, *self.target, exc)
            return  # _forget resets the client's socket
        connection.server_reader, connection.server_writer = server
        pumps = [
            asyncio.create_task(self._pump_requests(connection)),
            asyncio.create_task(self._read_replies(connection)),
            asyncio.create_task(self._write_replies(connection)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pump in pumps:
                pump.cancel()
            results = await asyncio.gather(*pumps, return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        for error in errors:
            if not isinstance(error, (OSError, asyncio.CancelledError)):
                logger.error("%r: unexpected error", connection, exc_info=error)
        if not errors:  # both sides half-closed in turn: close for good
            self._close_gracefully(connection.client_writer)
            self._close_gracefully(connection.server_writer)

    def _close_gracefully(self, writer: asyncio.StreamWriter) -> None:
        """Close after sending what is buffered; stop() resets it if that never happens."""
        writer.close()
        self._lingering = {w for w in self._lingering if w.transport.get_write_buffer_size()}
        if writer.transport.get_write_buffer_size():
            self._lingering.add(writer)

    async def _pump_requests(self, connection: _Connection) -> None:
        """Client to Redis: frame the commands, arm lost replies, forward the bytes."""
        server = connection.server_writer
        assert server is not None
        while True:
            data = await connection.client_reader.read(CHUNK_SIZE)
            if connection.blackholed:
                if not data:
                    await _forever()
                continue
            if not data:  # the client half-closed: pass it on, keep the other direction
                if server.can_write_eof():
                    server.write_eof()
                return
            self._inspect_requests(connection, data)
            server.write(data)
            await server.drain()

    def _inspect_requests(self, connection: _Connection, data: bytes) -> None:
        """Count the commands completed by ``data`` and arm a lost reply for a match.

        Runs before ``data`` is forwarded, so no reply can overtake the decision.
        """
        framer = connection.requests
        if framer.broken:
            self._match(connection, data, None)
            return
        try:
            boundaries = framer.feed(data)
        except _Desync as exc:
            logger.debug("%r: requests are not RESP (%s); losses are approximate", connection, exc)
            framer.broken = True
            connection.paired = False
            connection.command.clear()
            self._match(connection, data, None)
            return
        connection.command += data
        for boundary in boundaries:
            if boundary.start:
                continue
            size = boundary.offset - connection.command_start
            raw = bytes(connection.command[:size])
            del connection.command[:size]
            connection.command_start = boundary.offset
            index = connection.commands
            connection.commands += 1
            words = _command_words(raw)
            name = words[0] if words else b""
            if name in _UNPAIRED_COMMANDS or words == [b"CLIENT", b"REPLY"]:
                connection.paired = False
            reply_index = index if connection.paired else None
            if name in (b"EXEC", b"DISCARD") and connection.in_multi:
                self._end_multi(connection, name == b"EXEC", reply_index)
            self._match(connection, raw, reply_index)
            if name == b"MULTI":
                connection.in_multi = True
        if boundaries:
            with self._lock:
                self._commands += sum(1 for boundary in boundaries if not boundary.start)
                self._changed()

    def _match(self, connection: _Connection, raw: bytes, index: int | None) -> None:
        """Arm a lost reply on the connection if ``raw`` matches an armed fault."""
        if connection.loss is not None or connection.queued_loss is not None:
            return  # the connection is already doomed
        with self._lock:
            for match, left in self._armed.items():
                if match in raw:
                    if left > 1:
                        self._armed[match] = left - 1
                    else:
                        del self._armed[match]
                    if connection.in_multi:
                        connection.queued_loss = match
                    else:
                        connection.loss = _Loss(match, index)
                        logger.debug("%r: reply %s to %r will be lost", connection, index, match)
                    return

    def _end_multi(self, connection: _Connection, executed: bool, index: int | None) -> None:
        """EXEC loses its reply for a matched queued command; DISCARD re-arms the fault."""
        connection.in_multi = False
        match, connection.queued_loss = connection.queued_loss, None
        if match is None:
            return
        if executed:
            connection.loss = _Loss(match, index)
            logger.debug("%r: EXEC reply %s (for %r) will be lost", connection, index, match)
        else:
            with self._lock:
                self._armed[match] = self._armed.get(match, 0) + 1

    async def _read_replies(self, connection: _Connection) -> None:
        """Redis to outbox: frame the replies, find where a lost reply begins."""
        server = connection.server_reader
        assert server is not None
        loop = asyncio.get_running_loop()
        while True:
            data = await server.read(CHUNK_SIZE)
            if connection.blackholed:
                if not data:
                    await _forever()
                continue
            if not data:
                await connection.outbox.put(_Signal.EOF)
                return
            due = loop.time() + self._delay
            cut = self._find_cut(connection, data)
            if cut is None:
                await connection.outbox.put((due, data))
                continue
            if cut:
                await connection.outbox.put((due, data[:cut]))
            await connection.outbox.put(_Signal.CUT)
            return

    def _find_cut(self, connection: _Connection, data: bytes) -> int | None:
        """Offset in ``data`` where the reply to lose begins, or None to forward it all."""
        framer = connection.replies
        base = framer.offset
        boundaries: list[_Boundary] = []
        if not framer.broken:
            try:
                boundaries = framer.feed(data)
            except _Desync as exc:
                logger.debug("%r: replies are not RESP (%s)", connection, exc)
                framer.broken = True
                connection.paired = False
        loss = connection.loss
        for boundary in boundaries:
            if boundary.start and not boundary.push:
                index = connection.replies_started
                connection.replies_started += 1
                if loss is not None and loss.reply_index == index:
                    return boundary.offset - base
        if loss is not None and (loss.reply_index is None or framer.broken):
            return 0
        return None

    async def _write_replies(self, connection: _Connection) -> None:
        """Outbox to client: apply the delay, pass on a half-close, carry out a lost reply."""
        client = connection.client_writer
        loop = asyncio.get_running_loop()
        while True:
            item = await connection.outbox.get()
            if item is _Signal.EOF:
                if connection.blackholed:
                    await _forever()
                if client.can_write_eof():
                    client.write_eof()
                return
            if item is _Signal.CUT:
                self._lose(connection)
                return
            due, data = item
            while (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)  # the injected delay itself
            if not connection.blackholed:
                client.write(data)
                await client.drain()

    def _lose(self, connection: _Connection) -> None:
        """Drop the reply that begins now: close the client gracefully, reset Redis's side."""
        loss, connection.loss = connection.loss, None
        assert loss is not None
        with self._lock:  # counted first: a client that sees the close also sees the count
            self._fired[loss.match] = self._fired.get(loss.match, 0) + 1
            self._changed()
        logger.debug("%r: lost the reply to %r", connection, loss.match)
        self._close_gracefully(connection.client_writer)  # earlier replies are flushed, FIN
        _reset(connection.server_writer)
        if connection.task is not None:
            connection.task.cancel()
