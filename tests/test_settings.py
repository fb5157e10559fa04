"""Settings: defaults, code values, environment overrides, command-line overrides, typos."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api
from rich.pretty import pretty_repr

from aioqueue import ConfigurationError, Queue, Settings
from aioqueue.settings import mask_credentials, mask_url, resolve_settings


def test_defaults_apply_when_nothing_is_given() -> None:
    settings = resolve_settings(environ={})
    assert settings == Settings()
    assert settings.concurrency == 100
    assert settings.lease == 30.0


def test_environment_overrides_code_and_flags_override_both() -> None:
    code = {"redis_url": "redis://code:6379/0", "concurrency": 5}
    env = {"AIOQUEUE_REDIS_URL": "redis://env:6379/1", "AIOQUEUE_CONCURRENCY": "7"}
    assert resolve_settings(code, environ={}).concurrency == 5
    from_env = resolve_settings(code, environ=env)
    assert from_env.redis_url == "redis://env:6379/1"
    assert from_env.concurrency == 7
    assert resolve_settings(code, environ=env, overrides={"concurrency": 9}).concurrency == 9


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("AIOQUEUE_LEASE", "2.5", "lease", 2.5),
        ("AIOQUEUE_BURST", "true", "burst", True),
        ("AIOQUEUE_MAX_SIZE", "1000", "max_size", 1000),
        ("AIOQUEUE_QUEUE", "emails", "queue", "emails"),
    ],
)
def test_environment_values_are_converted_to_the_field_type(
    variable: str, value: str, field: str, expected: object
) -> None:
    assert getattr(resolve_settings(environ={variable: value}), field) == expected


def test_misspelt_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="AIOQUEUE_CONCURENCY"):
        resolve_settings(environ={"AIOQUEUE_CONCURENCY": "5"})


def test_misspelt_keyword_is_an_error(queue: Queue) -> None:
    with pytest.raises(ConfigurationError, match="concurency"):
        queue.worker(concurency=5)


@pytest.mark.parametrize(
    "env", [{"AIOQUEUE_CONCURRENCY": "0"}, {"AIOQUEUE_LEASE": "-1"}, {"AIOQUEUE_CONCURRENCY": "x"}]
)
def test_invalid_values_are_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError):
        resolve_settings(environ=env)


def test_queue_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOQUEUE_REDIS_URL", "redis://elsewhere:6380/2")
    monkeypatch.setenv("AIOQUEUE_CONCURRENCY", "12")
    queue = Queue("redis://localhost:6379/0", name="q")
    assert queue.settings.redis_url == "redis://elsewhere:6380/2"
    assert queue.worker(concurrency=50).settings.concurrency == 12


# -- credentials are never shown ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://app:s3cret@redis.internal:6379/0", "redis://app:***@redis.internal:6379/0"),
        ("rediss://:s3cret@host:6380/1", "rediss://:***@host:6380/1"),
        ("redis://s3cret@host/0", "redis://***@host/0"),
        ("redis://app:s3/cr@et@host:6379/0", "redis://app:***@host:6379/0"),
        ("unix:///run/redis.sock?db=2&password=s3cret", "unix:///run/redis.sock?db=2&password=***"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("memory://tests", "memory://tests"),
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert mask_url(masked) == masked
    assert (
        mask_credentials(f"the server at {url} runs 6.2.0") == f"the server at {masked} runs 6.2.0"
    )


def test_repr_of_settings_masks_the_password_and_the_signing_key() -> None:
    settings = Settings(redis_url="rediss://app:s3cret@host:6380/0", signing_key="k3y,old-k3y")
    for text in (repr(settings), str(settings), f"{settings}", pretty_repr(settings)):
        assert "s3cret" not in text
        assert "k3y" not in text
        assert "rediss://app:***@host:6380/0" in text
        assert "signing_key='***'" in text
    assert "signing_key=''" in repr(Settings())
    assert settings.redis_url == "rediss://app:s3cret@host:6380/0"  # the value itself is intact


# -- redis_url is checked before any connection -------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://app:s3cret@localhost:6379/0", "must start with redis://, rediss://"),
        ("localhost:6379", "must start with redis://"),
        ("redis://app:s3cret@localhost:6379/99999999999", "database index"),
        ("redis://localhost:6379/-1", "database index"),
        ("redis://localhost:6379/zero", "database index"),
        ("redis://localhost:6379/1/2", "database index"),
        ("redis://localhost:6379?db=x", "database index"),
        ("redis://app:s3cret@localhost:65536/0", "port"),
        ("redis://app:s3/cret@localhost:6379/0", "percent-encode"),
        ("unix://", "socket's path"),
    ],
)
def test_a_redis_url_that_cannot_work_is_a_configuration_error(url: str, fragment: str) -> None:
    for make in (
        lambda: Queue(url),
        lambda: resolve_settings(environ={"AIOQUEUE_REDIS_URL": url}),
        lambda: Settings(redis_url=url),
    ):
        with pytest.raises(ConfigurationError, match="redis_url") as caught:
            make()
        assert fragment in str(caught.value)
        assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://localhost:6379/",
        "redis://app:s3cret@localhost:6379/15",
        "rediss://:s3cret@[::1]:6380/0?ssl_cert_reqs=required",
        "redis://localhost?db=3",
        "unix:///run/redis/redis.sock?db=0",
        "memory://",
        "memory://tests",
    ],
)
def test_redis_urls_that_can_work_are_accepted(url: str) -> None:
    assert Queue(url).settings.redis_url == url


def test_an_invalid_value_says_where_it_came_from() -> None:
    with pytest.raises(ConfigurationError, match=r"AIOQUEUE_LOG_LEVEL='LOUD'.*DEBUG, INFO"):
        resolve_settings(environ={"AIOQUEUE_LOG_LEVEL": "LOUD"})
    with pytest.raises(ConfigurationError, match=r"--log-level 'LOUD'"):
        resolve_settings(environ={}, overrides={"log_level": "LOUD"})
    with pytest.raises(ConfigurationError, match=r"max_size=-1"):
        Queue("redis://localhost:6379/0", max_size=-1)


# -- unknown Queue() keywords --------------------------------------------------------------


def test_an_unknown_queue_keyword_is_a_configuration_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Queue("redis://localhost:6379/0", max_sise=5)
    message = str(caught.value)
    assert "'max_sise'" in message
    assert "did you mean 'max_size'?" in message
    for known in ("url", "name", "max_size", "max_payload_bytes", "result_ttl", "broker"):
        assert known in message
    with pytest.raises(ConfigurationError, match=r"AIOQUEUE_CONCURRENCY.*queue\.worker\(\)"):
        Queue("redis://localhost:6379/0", concurrency=5)


@pytest.mark.slow
def test_mypy_still_rejects_an_unknown_queue_keyword(tmp_path: Path) -> None:
    program = tmp_path / "program.py"
    program.write_text(
        "from aioqueue import Queue\n"
        "Queue('redis://localhost:6379/0', max_size=5, name='q')\n"
        "Queue('redis://localhost:6379/0', max_sise=5)\n"
        "Queue('redis://localhost:6379/0', max_size='5')\n"
    )
    stdout, _, status = api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(program)]
    )
    errors = [line for line in stdout.splitlines() if ": error: " in line]
    assert status == 1
    assert len(errors) == 2, stdout
    assert errors[0].startswith(f"{program}:3:")
    assert '"max_sise"' in errors[0]
    assert errors[1].startswith(f"{program}:4:")
