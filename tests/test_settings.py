"""Settings: defaults, code values, environment overrides, command-line overrides, typos."""

from __future__ import annotations

import pytest

from aioqueue import ConfigurationError, Queue, Settings
from aioqueue.settings import resolve_settings


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
