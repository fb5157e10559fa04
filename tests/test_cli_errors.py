"""The CLI prints what it reads from Redis as plain text and never crashes on a strange
record; configuration and server mistakes are one ``error:`` line with exit status 2; URLs
it shows have their password masked."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis
from conftest import RedisServer
from helpers import ROOT

from aioqueue import Context, JobFailed, Queue
from aioqueue.brokers.redis.keys import Keys
from aioqueue.serialization import Envelope, ErrorInfo, encode

pytestmark = pytest.mark.timeout(60)

MARKUP = "see [/etc/passwd] [bold green]ok[/bold green]"
"""Rich markup in data: an unknown closing tag (MarkupError) and a style."""
DEEP = b"\x91" * 100_000 + b"\xc0"
"""A msgpack value nested 100,000 deep (RecursionError when decoded)."""


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m aioqueue ARGS`` from ``tests/apps`` with only ``env`` configured."""
    return subprocess.run(
        [sys.executable, "-m", "aioqueue", *args],
        cwd=cwd or ROOT / "tests" / "apps",
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def on(url: str, queue: str = "default") -> dict[str, str]:
    return {"AIOQUEUE_REDIS_URL": url, "AIOQUEUE_QUEUE": queue}


def one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert ``result`` failed with exit status 2 and exactly one ``error:`` line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    """Assert ``result`` either succeeded or failed in one ``error:`` line."""
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode != 0:
        one_error_line(result)


def plant(client: redis.Redis, queue: str, job_id: str, **fields: bytes | str | int) -> None:
    """Write a job record as the scripts do, bypassing every check; a dead one is also put
    in the dead-letter set."""
    keys = Keys(queue)
    client.hset(keys.job(job_id), mapping=fields)  # type: ignore[arg-type]
    if fields.get("status") == "dead":
        client.zadd(keys.dead, {job_id: int(time.time() * 1000)})


def envelope(task: str, *args: object, **kwargs: object) -> bytes:
    return encode(Envelope(task=task, args=args, kwargs=kwargs))


# -- data printed as plain text (item 8) ---------------------------------------------------


async def test_job_and_dlq_commands_print_markup_in_data_literally(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(redis_server.url, name=queue_name)

    @queue.task(retries=0)
    async def echo(ctx: Context, text: str) -> str:
        return text

    @queue.task(retries=0)
    async def fragile(ctx: Context, text: str) -> None:
        raise RuntimeError(text)

    done = await echo.enqueue(MARKUP)
    dead = await fragile.enqueue(MARKUP)
    await asyncio.wait_for(queue.worker(burst=True).run(handle_signals=False), 30)
    assert await done.result(timeout=5) == MARKUP
    with pytest.raises(JobFailed):
        await dead.result(timeout=5)
    await queue.close()
    env = on(redis_server.url, queue_name)

    shown = await asyncio.to_thread(cli, "job", "basic_app:queue", done.id, env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"args=({MARKUP!r},)" in shown.stdout
    assert f"result: {MARKUP!r}" in shown.stdout

    failed = await asyncio.to_thread(cli, "job", "basic_app:queue", dead.id, env=env)
    assert failed.returncode == 0, failed.stderr
    assert f"RuntimeError: {MARKUP}" in failed.stdout
    assert "Traceback (most recent call last)" in failed.stdout  # the job's own traceback
    assert "Traceback" not in failed.stderr

    details = await asyncio.to_thread(cli, "dlq", "show", "basic_app:queue", dead.id, env=env)
    assert details.returncode == 0, details.stderr
    assert f"args=({MARKUP!r},)" in details.stdout
    assert f"RuntimeError: {MARKUP}" in details.stdout

    listing = await asyncio.to_thread(cli, "dlq", "list", "basic_app:queue", env=env)
    assert listing.returncode == 0, listing.stderr
    assert dead.id in listing.stdout
    assert "[bold green]ok[/bold green]" in listing.stdout


def test_names_reasons_and_control_characters_from_redis_are_printed_as_text(
    redis_server: RedisServer, redis_client: redis.Redis, queue_name: str
) -> None:
    plant(
        redis_client,
        queue_name,
        "odd",
        env=envelope("[red]task[/red]", 1),
        status="dead",
        attempt=2,
        deliveries=1,
        reason="[bold]why[/] \x1b[2J\rspoof",
        worker="[blue]w-1[/blue]",
        error=encode(ErrorInfo("[red]E[/red]", "\x1b]0;title\x07msg", "line 1\nline 2\x1b[31m")),
    )
    env = on(redis_server.url, queue_name)
    shown = cli("job", "basic_app:queue", "odd", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "task [red]task[/red]" in shown.stdout
    assert "[bold]why[/] \\x1b[2J\\rspoof" in shown.stdout
    assert "worker [blue]w-1[/blue]" in shown.stdout
    assert "[red]E[/red]: \\x1b]0;title\\x07msg" in shown.stdout
    assert "line 1\nline 2\\x1b[31m" in shown.stdout
    assert "\x1b" not in shown.stdout
    assert "\r" not in shown.stdout
    listing = cli("dlq", "list", "basic_app:queue", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "[red]task[/red]" in listing.stdout
    assert "\x1b" not in listing.stdout


def test_info_prints_worker_ids_and_hosts_as_text(
    redis_server: RedisServer, redis_client: redis.Redis, queue_name: str
) -> None:
    keys = Keys(queue_name)
    worker_id = "[bold]w[/bold]-[/x]"
    now = time.time()
    redis_client.hset(
        keys.worker(worker_id),
        mapping={
            "host": "[red]host[/red]",
            "pid": 7,
            "concurrency": 3,
            "started": now,
            "beat": now,
        },
    )
    redis_client.zadd(keys.workers, {worker_id: int(now * 1000)})
    shown = cli("info", "basic_app:queue", env=on(redis_server.url, queue_name))
    assert shown.returncode == 0, shown.stderr
    assert worker_id in shown.stdout
    assert "[red]host[/red]" in shown.stdout


@pytest.mark.parametrize(
    ("fields", "text_has", "undecodable"),
    [
        ({"env": b"\x93\xff\xff\xff", "status": "dead"}, "<undecodable: ", "envelope"),
        ({"env": b"\x92\xa1t" + DEEP, "status": "dead"}, "<undecodable: ", "envelope"),
        ({"env": b"\xc1" + b"x" * 40, "status": "queued"}, "<undecodable: ", "envelope"),
        ({"status": "complete", "result": DEEP}, "result: <undecodable: ", "result"),
        ({"status": "complete", "result": b"\xc1"}, "result: <undecodable: ", "result"),
        ({"status": "complete", "result": b"\xd4\x01\x02"}, "result: <msgspec", "result"),
        ({"status": "complete", "result": b"\x81\x91\x01\x02"}, "result: {(1,): 2}", "result"),
        ({"status": "dead", "error": b"\xff\xfe"}, "UnreadableError", None),
        ({"status": "done?", "enqueued": 10**17}, "<invalid time: ", "enqueued_at"),
        ({"status": "complete", "result": encode(MARKUP)}, f"result: {MARKUP!r}", None),
    ],
    ids=[
        "garbage-envelope",
        "deep-arguments",
        "signed-garbage",
        "deep-result",
        "bad-result",
        "ext-result",
        "tuple-key-result",
        "bad-error",
        "time-out-of-range",
        "markup-result",
    ],
)
def test_a_strange_record_is_shown_never_raised(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    queue_name: str,
    fields: dict[str, bytes | str | int],
    text_has: str,
    undecodable: str | None,
) -> None:
    plant(redis_client, queue_name, "strange", **fields)
    env = on(redis_server.url, queue_name)
    shown = cli("job", "basic_app:queue", "strange", env=env)
    assert shown.returncode == 0, shown.stderr
    assert text_has in shown.stdout
    as_json = cli("job", "basic_app:queue", "strange", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    details = json.loads(as_json.stdout)
    assert details["id"] == "strange"
    assert details["status"] == fields["status"]
    if undecodable is None:
        assert "undecodable" not in details
    else:
        assert undecodable in details["undecodable"]
    if fields["status"] == "dead":
        listing = cli("dlq", "list", "basic_app:queue", env=env)
        assert listing.returncode == 0, listing.stderr
        assert "strange" in listing.stdout
        shown_dead = cli("dlq", "show", "basic_app:queue", "strange", env=env)
        assert shown_dead.returncode == 0, shown_dead.stderr


@pytest.mark.parametrize(
    "fields",
    [{"attempt": "x"}, {"deliveries": "1.5"}, {"reason": b"\xff\xfe"}, {"finished": "soon"}],
    ids=["attempt", "deliveries", "reason-not-utf8", "finished"],
)
def test_a_dead_job_whose_fields_do_not_parse_leaves_the_others_listed(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    queue_name: str,
    fields: dict[str, bytes | str],
) -> None:
    plant(redis_client, queue_name, "good-one", env=envelope("fine"), status="dead")
    plant(redis_client, queue_name, "bad-one", env=envelope("odd"), status="dead", **fields)
    env = on(redis_server.url, queue_name)
    listing = cli("dlq", "list", "basic_app:queue", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "good-one" in listing.stdout
    assert "bad-one" in listing.stdout
    for command in (["job"], ["dlq", "show"]):
        no_traceback(cli(*command, "basic_app:queue", "bad-one", env=env))


def test_a_worker_heartbeat_that_does_not_parse_is_not_a_traceback(
    redis_server: RedisServer, redis_client: redis.Redis, queue_name: str
) -> None:
    keys = Keys(queue_name)
    redis_client.hset(keys.worker("w"), mapping={"host": b"\xff", "pid": "nan", "beat": "inf"})
    redis_client.zadd(keys.workers, {"w": int(time.time() * 1000)})
    env = on(redis_server.url, queue_name)
    for args in (["info"], ["info", "--json"], ["check"]):
        result = cli(*args, "basic_app:queue", env=env)
        assert "Traceback" not in result.stderr, result.stderr


# -- one error line for configuration mistakes (item 12) -----------------------------------


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["run", "basic_app:worker", "--log-level", "LOUD"], {}),
        (["run", "basic_app:worker"], {"AIOQUEUE_LOG_LEVEL": "LOUD"}),
        (["info", "basic_app:queue"], {"AIOQUEUE_LOG_LEVEL": "LOUD"}),
    ],
    ids=["flag", "environment-run", "environment-info"],
)
def test_a_bad_log_level_is_one_error_line(args: list[str], env: dict[str, str]) -> None:
    line = one_error_line(cli(*args, env=env), "log_level", "LOUD")
    assert "DEBUG, INFO, WARNING, ERROR or CRITICAL" in line


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://app:s3cret@localhost:6379/0", "redis://, rediss://"),
        ("localhost:6379", "redis://, rediss://"),
        ("redis://app:s3cret@localhost:6379/99999999999", "database index"),
        ("redis://app:s3cret@localhost:6379/db1", "database index"),
        ("redis://localhost:6379?db=-1", "database index"),
        ("redis://app:s3cret@localhost:99999/0", "port"),
        ("unix://", "socket's path"),
    ],
)
@pytest.mark.parametrize("command", ["run", "info"])
def test_a_url_that_cannot_work_is_one_error_line_without_the_password(
    url: str, fragment: str, command: str
) -> None:
    target = "basic_app:worker" if command == "run" else "basic_app:queue"
    line = one_error_line(cli(command, target, env=on(url)), "redis_url", fragment)
    assert "s3cret" not in line


def test_a_database_the_server_does_not_have_is_one_error_line(
    redis_server: RedisServer, queue_name: str
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/16"  # 16 databases: 0 to 15
    for args in (["info", "basic_app:queue"], ["run", "basic_app:worker", "--burst"]):
        one_error_line(cli(*args, env=on(url, queue_name)), "has no database with the index")


def test_run_given_a_task_says_it_needs_a_worker() -> None:
    one_error_line(cli("run", "basic_app:sleep_then_return"), "task 'sleep_then_return'", "worker")


def test_run_given_a_function_it_cannot_call_says_so(tmp_path: Path) -> None:
    (tmp_path / "factories.py").write_text(
        textwrap.dedent(
            """
            from aioqueue import Queue

            queue = Queue()

            def needs_arguments(concurrency):
                return queue.worker(concurrency=concurrency)

            async def make_worker():
                return queue.worker()
            """
        )
    )
    one_error_line(cli("run", "factories:needs_arguments", cwd=tmp_path), "needs arguments")
    one_error_line(cli("run", "factories:make_worker", cwd=tmp_path), "async function")


# -- servers that are not (a recent enough) Redis (items 9 and 12) ------------------------


Reply = Callable[[list[bytes]], bytes | None]


class FakeServer:
    """A TCP server speaking just enough RESP to stand in for a server that is not Redis
    >= 7.0: ``reply(command)`` gives the bytes to answer with (None closes)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, credentials: str = "app:s3cret@") -> str:
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while (parsed := _command(buffer)) is not None:
                    command, buffer = parsed
                    answer = self.reply(command)
                    if answer is None:
                        return
                    conn.sendall(answer)

    def close(self) -> None:
        self.sock.close()


def _command(buffer: bytes) -> tuple[list[bytes], bytes] | None:
    """One RESP command (an array of bulk strings, or an inline line) and the rest."""
    if not buffer.startswith(b"*"):
        line, sep, rest = buffer.partition(b"\r\n")
        return (line.split(), rest) if sep else None
    header, sep, rest = buffer.partition(b"\r\n")
    if not sep:
        return None
    args = []
    for _ in range(int(header[1:])):
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep or len(rest) < int(size_line[1:]) + 2:
            return None
        size = int(size_line[1:])
        args.append(rest[:size])
        rest = rest[size + 2 :]
    return args, rest


def _bulk(text: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(text), text)


def redis_6(command: list[bytes]) -> bytes:
    """A Redis 6.2: knows HELLO, too old for aioqueue."""
    name = command[0].upper()
    if name == b"HELLO":
        return b"%1\r\n+proto\r\n:3\r\n"
    if name == b"INFO":
        return _bulk(b"# Server\r\nredis_version:6.2.0\r\n")
    if name == b"TIME":
        return b"*2\r\n" + _bulk(b"%d" % int(time.time())) + _bulk(b"0")
    return b"+OK\r\n"


def redis_5(command: list[bytes]) -> bytes:
    """A server without HELLO (Redis 5 and older, or a proxy)."""
    return b"-ERR unknown command '%s'\r\n" % command[0]


def http_server(command: list[bytes]) -> bytes:
    return b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeServer]:
    server = FakeServer(request.param)
    yield server
    server.close()


@pytest.mark.parametrize(
    ("fake_server", "fragments"),
    [
        (redis_6, ["7.0", "6.2.0"]),
        (redis_5, ["HELLO"]),
        (http_server, []),
    ],
    indirect=["fake_server"],
    ids=["redis-6", "no-hello", "http"],
)
@pytest.mark.parametrize(
    "args", [["info", "basic_app:queue"], ["run", "basic_app:worker"]], ids=["info", "run"]
)
def test_a_server_that_is_not_redis_7_is_one_error_line_without_the_password(
    fake_server: FakeServer, fragments: list[str], args: list[str]
) -> None:
    line = one_error_line(cli(*args, env=on(fake_server.url())), *fragments)
    assert "s3cret" not in line
    if f":{fake_server.port}" in line:
        assert f"redis://app:***@127.0.0.1:{fake_server.port}/0" in line


@pytest.mark.parametrize("fake_server", [redis_6], indirect=True)
def test_a_lone_token_in_the_url_is_masked_too(fake_server: FakeServer) -> None:
    line = one_error_line(cli("info", "basic_app:queue", env=on(fake_server.url("t0ken@"))))
    assert "t0ken" not in line
    if f":{fake_server.port}" in line:
        assert f"redis://***@127.0.0.1:{fake_server.port}/0" in line


def test_json_of_an_undecodable_result_is_still_json(
    redis_server: RedisServer, redis_client: redis.Redis, queue_name: str
) -> None:
    plant(redis_client, queue_name, "deep", status="complete", result=DEEP, env=envelope("t"))
    shown = cli("job", "basic_app:queue", "deep", "--json", env=on(redis_server.url, queue_name))
    details = msgspec.json.decode(shown.stdout)
    assert details["task"] == "t"
    assert details["args"] == []
    assert details["result"] is None
    assert "recursion" in details["undecodable"]["result"]
