"""The Sentinel and Cluster deployments of tests/deployments.py work, with plain redis-py.

These prove the fixtures, not aioqueue: a Sentinel client follows a real failover, and a
Cluster client keeps reading and writing through a manual failover, a killed master and a slot
migrated key by key.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import redis
from deployments import ClusterDeployment, SentinelGroup, command, free_cluster_ports
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel


def test_free_cluster_ports_leave_the_bus_port_free() -> None:
    ports = free_cluster_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        assert port + 10000 < 32768  # below the ephemeral range
        for taken in (port, port + 10000):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", taken))


@pytest.mark.timeout(60)
async def test_sentinel_client_follows_a_failover(sentinel_group: SentinelGroup) -> None:
    host_ports = ",".join(f"{h}:{p}" for h, p in sentinel_group.sentinel_addresses)
    assert sentinel_group.url == f"redis+sentinel://{host_ports}/mymaster/0"
    sentinel = Sentinel(sentinel_group.sentinel_addresses, socket_timeout=1)  # type: ignore[no-untyped-call]
    primary = sentinel.master_for("mymaster", socket_timeout=1, decode_responses=True)
    try:
        await primary.set("before", "1")
        assert await primary.wait(1, 2000) == 1  # on the replica too

        old = sentinel_group.kill_primary()
        new = await asyncio.to_thread(sentinel_group.wait_failover, old)
        assert new != old
        assert await sentinel.discover_master("mymaster") == ("127.0.0.1", new)

        # The client re-asks the sentinels once its connection to the dead primary fails.
        await primary.set("after", "2")
        assert await primary.get("before") == "1"

        # The old primary restarts as a master; the sentinels make it a replica of the new one.
        await asyncio.to_thread(sentinel_group.restart, old)
        assert command(old, "ROLE")[:2] == ["slave", "127.0.0.1"]  # type: ignore[index]
        assert command(old, "GET", "after") == "2"
        assert sentinel_group.primary_port() == new
    finally:
        await primary.aclose()
        for client in sentinel.sentinels:
            await client.aclose()


def _keys_on_every_master(cluster: ClusterDeployment) -> list[str]:
    """Keys spread over the slots, at least a few owned by each master."""
    keys = [f"key-{i}" for i in range(60)]
    owners = {cluster.master_of_slot(cluster.slot_of(key)) for key in keys}
    assert owners == set(cluster.masters())
    return keys


@pytest.mark.timeout(60)
async def test_cluster_client_writes_through_a_manual_failover(
    redis_cluster: ClusterDeployment,
) -> None:
    assert redis_cluster.url == "redis+cluster://" + ",".join(
        f"127.0.0.1:{port}" for port in redis_cluster.masters()
    )
    keys = _keys_on_every_master(redis_cluster)
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.masters()[0])
    try:
        for key in keys:
            await client.set(key, "v1")
        old = redis_cluster.master_of_slot(redis_cluster.slot_of(keys[0]))
        new = await asyncio.to_thread(redis_cluster.failover, old)
        assert redis_cluster.master_of_slot(redis_cluster.slot_of(keys[0])) == new
        assert redis_cluster.replica_of(new) == old
        for key in keys:
            assert await client.get(key) == b"v1"  # a manual failover loses nothing

        redis_cluster.reset_stats()
        for key in keys:
            await client.set(key, "v2")
        counts = redis_cluster.command_counts()
        assert set(counts) == set(redis_cluster.masters())
        assert sum(counts.values()) == len(keys)
        assert all(counts.values())
        assert [await client.get(key) for key in keys] == [b"v2"] * len(keys)
    finally:
        await client.aclose()


@pytest.mark.timeout(60)
async def test_cluster_slot_migrated_key_by_key(redis_cluster: ClusterDeployment) -> None:
    keys = [f"{{migrating}}:{i}" for i in range(40)]
    slot = redis_cluster.slot_of(keys[0])
    source = redis_cluster.master_of_slot(slot)
    target = next(port for port in redis_cluster.masters() if port != source)
    client = RedisCluster(host="127.0.0.1", port=source, decode_responses=True)
    try:
        for key in keys:
            await client.set(key, key)

        redis_cluster.begin_migration(slot, target)
        assert redis_cluster.move_keys(slot, batch=15) == 15
        # Half moved: the client follows ASK redirections for the keys already on the target,
        # and a key new to the slot is created on the target.
        assert [await client.get(key) for key in keys] == keys
        await client.set("{migrating}:new", "new")
        assert command(target, "CLUSTER", "COUNTKEYSINSLOT", slot) == 16

        await asyncio.to_thread(redis_cluster.finish_migration, slot)
        assert redis_cluster.master_of_slot(slot) == target
        assert command(target, "CLUSTER", "COUNTKEYSINSLOT", slot) == 41
        assert command(source, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert [await client.get(key) for key in keys] == keys
        assert await client.get("{migrating}:new") == "new"

        # And back in one call.
        await asyncio.to_thread(redis_cluster.migrate_slot, slot, source)
        assert redis_cluster.master_of_slot(slot) == source
        assert [await client.get(key) for key in keys] == keys
    finally:
        await client.aclose()


@pytest.mark.timeout(60)
async def test_cluster_killed_master_is_replaced_and_rejoins(
    fresh_cluster: ClusterDeployment,
) -> None:
    keys = _keys_on_every_master(fresh_cluster)
    client = RedisCluster(host="127.0.0.1", port=fresh_cluster.masters()[0])
    try:
        for key in keys:
            await client.set(key, "v1")
        old = fresh_cluster.master_of_slot(fresh_cluster.slot_of(keys[0]))
        replica = fresh_cluster.replica_of(old)
        assert command(old, "WAIT", 1, 2000) == 1

        fresh_cluster.kill(old)
        new = await asyncio.to_thread(fresh_cluster.wait_promoted, old)
        assert new == replica
        assert old not in fresh_cluster.masters()
        for key in keys:  # the client finds the new master and the replicated data
            assert await client.get(key) == b"v1"
            await client.set(key, "v2")

        await asyncio.to_thread(fresh_cluster.restart, old)
        assert fresh_cluster.replica_of(new) == old
        assert command(old, "ROLE")[0] == "slave"  # type: ignore[index]
        with redis.Redis(port=old, decode_responses=True) as direct:
            direct.execute_command("READONLY")  # reads on a replica, no MOVED
            assert direct.get(keys[0]) == "v2"
    finally:
        await client.aclose()
