"""Securing Redis: ACL users with exactly the rights of their role, a missing right as one
typed error naming it, refused credentials, and TLS with a CA the suite makes.

ACL users are made on the suite's redis-server and deleted after each test; TLS tests run
their own redis-server that speaks only TLS (see tests/tls.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import RedisServer
from helpers import ROOT, eventually, output_of, run_cli, running, spawn_worker, wait_exit
from helpers import worker_env as base_env
from tls import Certificates, TLSRedis, make_certificates

from aioqueue import (
    AccessDenied,
    AuthenticationFailed,
    ConfigurationError,
    Context,
    JobAborted,
    JobFailed,
    JobStatus,
    PermissionDenied,
    Queue,
    RedisUnavailable,
    TLSError,
)
from aioqueue.brokers.redis import RedisBroker
from aioqueue.brokers.redis.access import (
    ROLES,
    acl_rules,
    probe_command,
    role_commands,
    script_commands,
)
from aioqueue.brokers.redis.keys import Keys

pytestmark = pytest.mark.timeout(60)

MakeUser = Callable[..., str]


@pytest.fixture
def make_user(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[MakeUser]:
    """``make_user(role, queue, without=rule)``: a new ACL user with exactly the rights of
    ``role`` on ``queue`` (minus one rule), or with the given ``rules``; returns its URL.
    Every user made is deleted after the test."""
    made: list[str] = []

    def make(
        role: str | None = None,
        queue: str = "",
        *,
        rules: str | None = None,
        without: str | None = None,
        password: str = "pw",
    ) -> str:
        name = f"sec-{uuid.uuid4().hex[:10]}"
        line = rules if rules is not None else acl_rules(str(role), [queue])
        tokens = [token for token in line.split() if token != without]
        assert without is None or len(tokens) < len(line.split()), without
        redis_client.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *tokens)
        made.append(name)
        return f"redis://{name}:{password}@127.0.0.1:{redis_server.port}/0"

    yield make
    if made:
        redis_client.acl_deluser(*made)


def worker_env(url: str, queue: str, **settings: object) -> dict[str, str]:
    return base_env(url, queue, log_level="WARNING", **settings)


def one_line(text: str) -> str:
    """The only line of ``text`` (a CLI's stderr), failing the test if there are more."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def user_of(url: str) -> str:
    return url.split("//", 1)[1].split(":", 1)[0]


# -- the documented rights ---------------------------------------------------------------


def test_the_deploying_guide_has_the_exact_acl_line_of_every_role() -> None:
    guide = (ROOT / "docs" / "deploying.md").read_text()
    for role in ROLES:
        line = f"ACL SETUSER aioqueue-{role} reset on >{role}-password "
        assert line + acl_rules(role, ["default"]) + "\n" in guide, role


def test_every_command_of_every_role_has_a_harmless_probe() -> None:
    for role in ROLES:
        for command in role_commands(role):
            probe = probe_command(command, "k", "c")
            assert probe[0] == command.partition("|")[0].upper()
    assert "xadd" in script_commands("enqueue")
    assert {"hkeys", "spublish"} <= script_commands("settle")  # notify() in the prelude
    assert "spublish" not in script_commands("watch")  # only its comments mention notify()


# redis-py methods the broker calls, and the ACL command each sends.
_METHODS = {
    "delete": "del",
    "evalsha": "evalsha",
    # EVALSHA (a pipeline of scripts, RedisConnection._eval_many) and TIME (_time_in) go
    # through it: redis-py's cluster pipeline refuses evalsha() and time() by name.
    "execute_command": "evalsha",
    "exists": "exists",
    "hget": "hget",
    "hgetall": "hgetall",
    "hmget": "hmget",
    "hset": "hset",
    "info": "info",
    "pexpire": "pexpire",
    "pubsub": "ssubscribe",
    "scan_iter": "scan",
    "script_load": "script|load",
    "set": "set",
    "get": "get",
    "smembers": "smembers",
    "time": "time",
    "unlink": "unlink",
    "wait": "wait",
    "xack": "xack",
    "xadd": "xadd",
    "xautoclaim": "xautoclaim",
    "xdel": "xdel",
    "xinfo_consumers": "xinfo|consumers",
    "xinfo_groups": "xinfo|groups",
    "xinfo_stream": "xinfo|stream",
    "xlen": "xlen",
    "xpending": "xpending",
    "xpending_range": "xpending",
    "xrange": "xrange",
    "xread": "xread",
    "xreadgroup": "xreadgroup",
    "xrevrange": "xrevrange",
    "zadd": "zadd",
    "zcard": "zcard",
    "zmscore": "zmscore",
    "zrange": "zrange",
    "zrangebyscore": "zrangebyscore",
    "zrem": "zrem",
    "zremrangebyscore": "zremrangebyscore",
    "zrevrange": "zrevrange",
}
_NOT_COMMANDS = {"aclose", "execute", "pipeline", "register_script"}


def test_every_command_the_broker_sends_belongs_to_a_role() -> None:
    # A new redis-py call in the broker must be added to a role in connection.py (and to
    # _METHODS here), or users with the documented rights would be refused it.
    granted = {command for role in ROLES for command in role_commands(role)}
    call = re.compile(r"(?:self\.client|self\.reader|self\._client|client|pipe)\.([a-z_]+)\(")
    for path in sorted((ROOT / "aioqueue" / "brokers" / "redis").glob("*.py")):
        source = path.read_text()
        for method in set(call.findall(source)) - _NOT_COMMANDS:
            assert method in _METHODS, f"{path.name}: unknown redis-py call .{method}()"
            assert _METHODS[method] in granted, f"{path.name}: {method} is in no role"
        if "pipeline(transaction=True)" in source:
            assert {"multi", "exec"} <= set(role_commands("worker")), path.name


def test_a_monitor_reads_keys_only_and_uses_no_channel() -> None:
    rules = acl_rules("monitor", ["emails"]).split()
    assert rules[0] == "%R~aioqueue:{emails}:*"
    assert not [rule for rule in rules if rule.startswith("&")]
    assert not {"evalsha", "multi", "spublish", "ssubscribe"} & set(role_commands("monitor"))


# -- each role with exactly its rights ---------------------------------------------------


@pytest.mark.timeout(120)
async def test_producer_worker_monitor_and_operator_each_with_exactly_their_rights(
    make_user: MakeUser, redis_client: redis.Redis, queue_name: str
) -> None:
    urls = {role: make_user(role, queue_name) for role in ROLES}
    worker = spawn_worker("basic_app:worker", worker_env(urls["worker"], queue_name))
    try:
        workers = Keys(queue_name).workers
        await eventually(lambda: redis_client.zcard(workers) > 0 or worker.poll() is not None, 20)
        assert worker.poll() is None, output_of(worker)

        # The producer: enqueue and wait (SUBSCRIBE) from the CLI, then abort from Python.
        done = run_cli(
            "enqueue", "basic_app:queue", "sleep_then_return", "--args", "[0, 7]", "--wait", "20",
            url=urls["producer"], queue=queue_name,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        job_id, result = done.stdout.split()
        assert result == "7"
        async with Queue(urls["producer"], name=queue_name) as producer:

            @producer.task(retries=0)
            async def sleep_then_return(ctx: Context, seconds: float, value: int) -> int:
                raise AssertionError("runs in the worker")

            @producer.task()
            async def unknown_to_the_worker(ctx: Context) -> None:
                return None

            slow = await sleep_then_return.enqueue(60, 1)
            job_key = Keys(queue_name).job(slow.id)
            await eventually(lambda: redis_client.hget(job_key, "status") == b"running")
            assert await slow.abort() is JobStatus.RUNNING
            with pytest.raises(JobAborted):
                await slow.result(timeout=20)
            dead = await unknown_to_the_worker.enqueue()
            with pytest.raises(JobFailed, match="unknown task"):
                await dead.result(timeout=20)

        # The monitor reads everything...
        for args in (
            ("info", "basic_app:queue"),
            ("check", "basic_app:queue"),
            ("job", "basic_app:queue", job_id),
            ("dlq", "list", "basic_app:queue"),
            ("dlq", "show", "basic_app:queue", dead.id),
        ):
            shown = run_cli(*args, url=urls["monitor"], queue=queue_name)
            assert shown.returncode == 0, (args, shown.stderr)
            assert shown.stdout.strip(), args
        shown = run_cli("job", "basic_app:queue", job_id, url=urls["monitor"], queue=queue_name)
        assert "complete" in shown.stdout
        # ... and may write nothing: one line says what it lacks.
        refused = run_cli(
            "dlq", "requeue", "basic_app:queue", url=urls["monitor"], queue=queue_name
        )
        assert refused.returncode == 2
        assert "may not run EVALSHA and MULTI" in one_line(refused.stderr)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = await wait_exit(worker)
    output = output_of(worker)
    assert code == 0, output
    for sign in ("Traceback", "NOPERM", "may not"):
        assert sign not in output, output

    # The operator requeues and purges.
    for args, expected in (
        (("dlq", "requeue", "basic_app:queue", dead.id), "requeued 1 job"),
        (("dlq", "purge", "-y", "basic_app:queue"), "purged 0 jobs"),
        (("purge", "-y", "basic_app:queue"), "purged queue"),
    ):
        acted = run_cli(*args, url=urls["operator"], queue=queue_name)
        assert acted.returncode == 0, (args, acted.stderr)
        assert expected in acted.stdout, (args, acted.stdout)
    assert not redis_client.keys(f"aioqueue:{{{queue_name}}}:*")


async def test_every_right_of_every_role_is_checked_and_named(
    make_user: MakeUser, redis_client: redis.Redis, queue_name: str
) -> None:
    # One user per role, given all its rules but one in turn: the check names that one.
    for role in ROLES:
        rules = acl_rules(role, [queue_name])
        url = make_user(role, queue_name)
        name = user_of(url)
        broker = RedisBroker(url, queue_name, result_ttl=60)
        await broker.check_access(role)
        await broker.close()
        for rule in rules.split():
            kept = [token for token in rules.split() if token != rule]
            redis_client.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *kept)
            broker = RedisBroker(url, queue_name, result_ttl=60)
            try:
                with pytest.raises(PermissionDenied) as refused:
                    await broker.check_access(role)
            finally:
                await broker.close()
            assert refused.value.missing == [rule.removeprefix("%R")], (role, rule)
            assert f"ACL SETUSER {name} {rule.removeprefix('%R')}" in str(refused.value)


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("+xreadgroup", "may not run XREADGROUP, which a worker needs"),
        ("+info", "may not run INFO"),
        ("&aioqueue:{Q}:*", "may not use the channels of queue"),
        ("~aioqueue:{Q}:*", "may not use the keys of queue"),
    ],
)
def test_a_worker_missing_one_right_exits_at_start_with_one_line_naming_it(
    make_user: MakeUser, queue_name: str, missing: str, named: str
) -> None:
    missing = missing.replace("Q", queue_name)
    url = make_user("worker", queue_name, without=missing)
    started = run_cli("run", "basic_app:worker", url=url, queue=queue_name)
    assert started.returncode == 2
    line = one_line(started.stderr)
    assert line.startswith("error: ")
    assert named in line
    assert f"ACL SETUSER {user_of(url)} {missing}" in line
    assert "consuming" not in started.stderr


def test_info_and_check_with_a_key_pattern_of_another_queue_say_so_in_one_line(
    make_user: MakeUser, queue_name: str
) -> None:
    url = make_user("monitor", "some-other-queue")
    for command in ("info", "check"):
        shown = run_cli(command, "basic_app:queue", url=url, queue=queue_name)
        assert shown.returncode == 2
        line = one_line(shown.stderr)
        assert f"may not use the keys of queue {queue_name!r} while connecting" in line
        assert f"~aioqueue:{{{queue_name}}}:*" in line


@pytest.mark.parametrize(
    "command",
    [
        "time",
        "exists",
        "info",
        "xrange",
        "zrange",
        "xlen",
        "zcard",
        "xpending",
        "xinfo|groups",
    ],
)
async def test_queue_stats_without_one_right_of_a_monitor_name_it(
    make_user: MakeUser, queue: Queue, queue_name: str, command: str
) -> None:
    @queue.task()
    async def noop(ctx: Context) -> None:
        return None

    await noop.enqueue()  # a stream and a group-less queue to read
    url = make_user("monitor", queue_name, without=f"+{command}")
    monitor = Queue(url, name=queue_name)
    try:
        with pytest.raises(PermissionDenied) as refused:
            await monitor.stats()
    finally:
        await monitor.close()
    assert refused.value.missing == [f"+{command}"]


async def test_a_producer_without_channel_rights_gets_permission_denied_from_result(
    make_user: MakeUser, queue_name: str
) -> None:
    url = make_user("producer", queue_name, without=f"&aioqueue:{{{queue_name}}}:*")
    async with Queue(url, name=queue_name) as producer:

        @producer.task()
        async def noop(ctx: Context) -> None:
            return None

        job = await noop.enqueue()
        with pytest.raises(PermissionDenied, match="may not use the channels of queue") as refused:
            await asyncio.wait_for(job.result(timeout=30), 10)
    assert refused.value.missing == [f"&aioqueue:{{{queue_name}}}:*"]


async def test_a_producer_that_may_not_add_to_the_stream_writes_no_half_job(
    make_user: MakeUser, redis_client: redis.Redis, queue_name: str
) -> None:
    url = make_user("producer", queue_name, without="+xadd")
    async with Queue(url, name=queue_name) as producer:

        @producer.task()
        async def noop(ctx: Context) -> None:
            return None

        with pytest.raises(PermissionDenied, match="may not run XADD, which the enqueue script"):
            await producer.options(job_id="half").enqueue("noop")
    # Refused before the script ran: no job record without its stream entry.
    assert not redis_client.exists(Keys(queue_name).job("half"))


@pytest.mark.timeout(40)
async def test_a_worker_whose_rights_are_revoked_while_running_exits_with_one_line(
    make_user: MakeUser, redis_client: redis.Redis, queue_name: str
) -> None:
    url = make_user("worker", queue_name)
    worker = spawn_worker("basic_app:worker", worker_env(url, queue_name, block=0.2))
    try:
        workers = Keys(queue_name).workers
        await eventually(lambda: redis_client.zcard(workers) > 0 or worker.poll() is not None, 20)
        redis_client.execute_command("ACL", "SETUSER", user_of(url), "-xreadgroup")
        code = await wait_exit(worker, 20)
    finally:
        worker.kill()
    output = output_of(worker)
    assert code == 2, output
    assert "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: "), output
    assert "may not run XREADGROUP" in last, output


# -- credentials -------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_worker_with_a_wrong_password_exits_at_start_instead_of_retrying(
    make_user: MakeUser, queue_name: str
) -> None:
    url = make_user("worker", queue_name, password="wrong")
    started = run_cli("run", "basic_app:worker", url=url, queue=queue_name)
    assert started.returncode == 2
    line = one_line(started.stderr)
    assert "Redis refused the credentials while connecting" in line
    assert "wrong" not in line  # the password is never shown


async def test_wrong_credentials_are_authentication_failed(
    make_user: MakeUser, queue_name: str
) -> None:
    url = make_user("producer", queue_name, password="wrong")
    refused = await connecting(url, AuthenticationFailed)
    assert isinstance(refused, AccessDenied)
    assert not isinstance(refused, RedisUnavailable)


async def connecting(url: str, error: type[Exception] | tuple[type[Exception], ...]) -> Exception:
    """The error connecting to ``url`` raises, which must be an ``error``."""
    queue = Queue(url)
    try:
        with pytest.raises(error) as raised:
            await queue.connected_broker()
    finally:
        await queue.close()
    return raised.value


@pytest.mark.timeout(40)
async def test_a_worker_started_before_redis_retries_until_it_answers(
    tmp_path: Path, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path)  # its port is chosen; nothing listens there yet
    queue = Queue(server.url, name=queue_name)

    @queue.task()
    async def double(ctx: Context, n: int) -> int:
        return 2 * n

    caplog.set_level(logging.WARNING, "aioqueue.worker")
    worker = queue.worker()
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await eventually(lambda: "connecting to Redis" in caplog.text or task.done())
        assert not task.done()
        assert "retrying with backoff" in caplog.text
        server.start()
        job = await double.enqueue(21)
        assert await job.result(timeout=20) == 42
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)
        await queue.close()
        server.kill()


# -- the Redis URL -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("rediss:?ssl_ca_cert=/etc/ca.pem", "unknown option ssl_ca_cert= in the Redis URL (did "
         "you mean ssl_ca_certs=?)"),
        ("redis:?ssl_ca_cert=/etc/ca.pem", "(did you mean ssl_ca_certs=, with a rediss:// URL?)"),
        ("redis:?ssl_ca_certs=/etc/ca.pem", "ssl_ca_certs= is a TLS option: it needs a rediss://"),
        ("rediss:?ssl_ca_certs=/no/such/ca.pem", "the CA file ssl_ca_certs=/no/such/ca.pem in "
         "the Redis URL does not exist"),
        ("rediss:?ssl_ca_certs=", "the option ssl_ca_certs= in the Redis URL is empty"),
        ("rediss:?ssl_check_hostname=off", "ssl_check_hostname=off in the Redis URL must be true "
         "or false"),
        ("rediss:?ssl_cert_reqs=require", "must be none, optional or required"),
        ("redis:?socket_timeout=1", "socket_timeout= may not be given in the Redis URL"),
        ("redis:?decode_responses=true", "decode_responses= may not be given"),
        ("redis:?db=1&db=2", "the option db= is given 2 times"),
    ],
)  # fmt: skip
async def test_a_bad_url_option_is_one_configuration_error_naming_it(
    query: str, message: str
) -> None:
    scheme, _, options = query.partition(":")
    assert message in await configuration_error(f"{scheme}://127.0.0.1:1/0{options}")


async def configuration_error(url: str) -> str:
    """The ConfigurationError connecting to ``url`` raises (before connecting)."""
    return str(await connecting(url, ConfigurationError))


async def test_tls_files_that_do_not_load_are_named(tmp_path: Path, certs: Certificates) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = {
        f"ssl_ca_certs={junk}": "the CA certificates in the Redis URL cannot be loaded",
        f"ssl_certfile={junk}": f"the client certificate ssl_certfile={junk} (with its key) "
        "cannot be loaded",
        f"ssl_certfile={certs.crt('client')}&ssl_keyfile={certs.key('stranger')}": "cannot be "
        "loaded",
        f"ssl_keyfile={certs.key('client')}": "ssl_keyfile= in the Redis URL needs ssl_certfile=",
    }
    for options, message in cases.items():
        assert message in await configuration_error(f"rediss://localhost:1/0?{options}"), options


def test_the_cli_reports_a_misspelt_option_in_one_line(queue_name: str) -> None:
    for command in (("info", "basic_app:queue"), ("run", "basic_app:worker")):
        url = "rediss://localhost:1/0?ssl_ca_cert=/ca.pem"
        shown = run_cli(*command, url=url, queue=queue_name)
        assert shown.returncode == 2
        assert "did you mean ssl_ca_certs=?" in one_line(shown.stderr)


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, certs: Certificates) -> Iterator[TLSRedis]:
    """A redis-server that speaks only TLS and requires a client certificate."""
    server = TLSRedis(tmp_path_factory.mktemp("tls-redis"), certs, auth_clients="yes")
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def tls_queue(tls_redis: TLSRedis, queue_name: str) -> AsyncIterator[Queue]:
    queue = Queue(tls_redis.url(), name=queue_name)
    yield queue
    await queue.close()


@pytest.mark.timeout(60)
async def test_rediss_round_trip_with_the_suite_ca_and_a_client_certificate(
    tls_queue: Queue, tls_redis: TLSRedis
) -> None:
    @tls_queue.task()
    async def double(ctx: Context, n: int) -> int:
        return 2 * n

    async with running(tls_queue.worker()):
        assert await (await double.enqueue(21)).result(timeout=10) == 42
        # An outage after a successful start is retried, over TLS as over TCP.
        tls_redis.restart()
        assert await (await double.enqueue(4)).result(timeout=30) == 8


@pytest.mark.timeout(30)
def test_a_worker_that_does_not_trust_the_server_certificate_exits_with_one_line(
    tls_redis: TLSRedis, certs: Certificates, queue_name: str
) -> None:
    url = tls_redis.url(ssl_ca_certs=certs.crt("other_ca"))
    started = run_cli("run", "basic_app:worker", url=url, queue=queue_name)
    assert started.returncode == 2
    line = one_line(started.stderr)
    assert "TLS with Redis failed while connecting: the server's certificate is not trusted" in line
    assert "ssl_ca_certs=" in line


async def test_the_server_certificate_must_name_the_host(tls_redis: TLSRedis) -> None:
    refused = await connecting(tls_redis.url("127.0.0.1"), TLSError)
    assert "does not name this host" in str(refused)
    async with Queue(tls_redis.url("127.0.0.1", ssl_check_hostname="false")) as queue:
        assert (await queue.counts()).ready == 0


async def test_a_client_certificate_from_a_ca_the_server_does_not_trust_is_refused(
    tls_redis: TLSRedis,
) -> None:
    refused = await connecting(tls_redis.url(client="stranger"), TLSError)
    assert "does not trust the CA that signed this client's" in str(refused)


async def test_no_client_certificate_for_a_server_that_requires_one(tls_redis: TLSRedis) -> None:
    # With TLS 1.3 the server checks the client's certificate after the handshake: its alert
    # (final) can lose the race with the reset of the connection (an outage, retried), so
    # either error may come, and both say what to look at.
    refused = await connecting(tls_redis.url(client=None), (TLSError, RedisUnavailable))
    assert "certificate" in str(refused)


async def test_rediss_to_a_port_without_tls_is_retried_with_a_hint(
    redis_server: RedisServer,
) -> None:
    # Redis reads the TLS hello as the start of a command and waits for the rest: the
    # handshake times out, which may as well be an outage.
    url = f"rediss://127.0.0.1:{redis_server.port}/0?socket_connect_timeout=0.3"
    refused = await connecting(url, RedisUnavailable)
    assert "a server that does not speak TLS" in str(refused)


async def test_redis_to_a_tls_port_is_retried_with_a_hint(tls_redis: TLSRedis) -> None:
    refused = await connecting(f"redis://localhost:{tls_redis.port}/0", RedisUnavailable)
    assert "a server that speaks TLS" in str(refused)
