"""Partitioned queues (docs/deploying.md#partitioned-queues): one logical queue spread over
N hash tags, so that in a Redis Cluster its load lands on several masters.

Partition ``p`` of queue ``name`` keeps its keys under the hash tag
``{name#p}`` (``{name#p.k}`` when ``k`` is needed, see :func:`partition_tags`): ``#`` is no
character of a queue name, so no partition can share its keys with another queue. A queue
of one partition is the plain queue, ``{name}``. A job lives in partition
``crc32(job id) mod N``: anyone who knows the id knows where the job is, enqueueing the same
id twice lands in the same partition (so it is still written once), and random ids spread
evenly.
"""

from __future__ import annotations

import zlib
from functools import cache

from redis.crc import key_slot

__all__ = ["MAX_PARTITIONS", "SLOTS", "fitted", "partition_of", "partition_tags"]

MAX_PARTITIONS = 256
"""Most partitions one queue may have."""
SLOTS = 16_384
"""Hash slots of a Redis Cluster."""


@cache
def partition_tags(name: str, partitions: int) -> tuple[str, ...]:
    """The hash tags (queue key names) of the partitions of queue ``name``.

    Partition ``p`` gets the first of ``name#p``, ``name#p.1``, ``name#p.2``... whose slot
    lies in the ``p``-th of ``partitions`` equal ranges of the slot space. A cluster made by
    ``redis-cli --cluster create`` (or rebalanced) gives its masters equal slot ranges, so
    N partitions on N masters land one on each, and on M masters spread as evenly as N
    allows."""
    if partitions <= 1:
        return (name,)
    tags: list[str] = []
    for p in range(partitions):
        low, high = p * SLOTS // partitions, (p + 1) * SLOTS // partitions
        k = 0
        while True:
            tag = f"{name}#{p}" if k == 0 else f"{name}#{p}.{k}"
            if low <= key_slot(tag.encode()) < high:
                break
            k += 1
        tags.append(tag)
    return tuple(tags)


def partition_of(job_id: str, partitions: int) -> int:
    """The partition that holds job ``job_id`` in a queue of ``partitions`` partitions."""
    if partitions <= 1:
        return 0
    return zlib.crc32(job_id.encode()) % partitions


def fitted(job_id: str, partitions: int, partition: int = 0) -> str:
    """``job_id``, or ``job_id~k`` for the smallest ``k`` that puts it in ``partition``: the
    same answer in every process, so every worker names a cron tick the same, and the tick's
    job lives in the partition whose cron keys claim it."""
    if partition_of(job_id, partitions) == partition:
        return job_id
    k = 1
    while partition_of(f"{job_id}~{k}", partitions) != partition:
        k += 1
    return f"{job_id}~{k}"
