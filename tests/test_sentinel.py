"""Redis Sentinel: producers and workers follow a failover by themselves, and with
``wait_replicas`` no acknowledged job or outcome is lost to it (docs/deploying.md)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import free_port
from deployments import SentinelGroup
from failover import run_through_failover

from aioqueue import ConfigurationError, Queue, RedisUnavailable
from aioqueue.settings import Settings


def test_a_sentinel_url_names_sentinels_master_and_database() -> None:
    settings = Settings(redis_url="redis+sentinel://a:26379,b/mymaster/2?sentinel_password=x")
    assert settings.redis_url.startswith("redis+sentinel://")
    for bad, why in [
        ("redis+sentinel://a:26379", "names the master"),
        ("redis+sentinel://a:99999/m", "port"),
        ("redis+sentinel://a,,b/m", "empty host"),
        ("redis+sentinel://a/m/x", "database index"),
        ("redis+cluster://a:7000/3", "database 0 only"),
    ]:
        with pytest.raises(ConfigurationError, match=why):
            Settings(redis_url=bad)


async def test_an_unknown_option_of_a_sentinel_url_is_refused_before_connecting() -> None:
    queue = Queue("redis+cluster://127.0.0.1:1?sentinel_password=x", name="q")
    with pytest.raises(ConfigurationError, match="for redis\\+sentinel:// URLs"):
        await queue.connected_broker()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_producer_and_worker_follow_a_sentinel_failover(
    sentinel_group: SentinelGroup, wait_replicas: int
) -> None:
    async def fail_over() -> None:
        old = await asyncio.to_thread(sentinel_group.kill_primary)
        await asyncio.to_thread(sentinel_group.wait_failover, old)
        # The old primary comes back as a replica: with wait_replicas=1 enqueues are
        # refused (NotReplicated) until it does.
        await asyncio.to_thread(sentinel_group.restart, old)

    outcome = await run_through_failover(
        sentinel_group.url, "sentinel", fail_over, wait_replicas=wait_replicas
    )
    print(
        f"sentinel failover, wait_replicas={wait_replicas}: {outcome.acknowledged} acknowledged, "
        f"{len(outcome.lost)} lost, {outcome.ran_twice} ran twice, {outcome.refused} refused"
    )
    assert outcome.acknowledged == 300
    assert all(outcome.runs[f"job-{n}"] >= 1 for n in range(300) if f"job-{n}" not in outcome.lost)
    if wait_replicas:
        assert outcome.lost == []


@pytest.mark.timeout(30)
async def test_a_master_name_no_sentinel_watches_is_a_configuration_error(
    sentinel_group: SentinelGroup,
) -> None:
    url = sentinel_group.url.replace("/mymaster/", "/nosuchmaster/")
    queue = Queue(url, name="q")
    with pytest.raises(ConfigurationError, match=r"no sentinel .* watches a master named"):
        await asyncio.wait_for(queue.counts(), 10)
    await queue.close()


@pytest.mark.timeout(30)
async def test_a_sentinel_url_naming_a_data_server_is_a_configuration_error(
    sentinel_group: SentinelGroup,
) -> None:
    url = f"redis+sentinel://127.0.0.1:{sentinel_group.primary_port()}/mymaster/0"
    queue = Queue(url, name="q")
    with pytest.raises(ConfigurationError, match="is no sentinel"):
        await asyncio.wait_for(queue.counts(), 10)
    await queue.close()


@pytest.mark.timeout(30)
async def test_sentinels_that_do_not_answer_are_an_outage_said_at_once() -> None:
    ports = [free_port(), free_port()]
    url = f"redis+sentinel://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/mymaster/0"
    queue = Queue(url, name="q")
    with pytest.raises(RedisUnavailable, match=r"no sentinel .* answered"):
        await asyncio.wait_for(queue.counts(), 10)
    await queue.close()
