"""One logical queue over several partitions (docs/deploying.md#partitioned-queues).

:class:`PartitionedBroker` puts N brokers, one per partition, behind the broker protocol:
what names a job goes to the partition the job's id hashes to (see
:mod:`aioqueue.partitions`), what concerns the whole queue asks every partition and adds up
the answers. Workers do not consume through it: they serve each partition as a source of
their own (``Queue.sources``), with the per-source settling, renewing and promoting a worker
of several queues already has; ``fetch`` here serves ``aioqueue.testing.drain``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TypeVar

from aioqueue.brokers.base import (
    ArrivalSample,
    Broker,
    CronClaim,
    CronRun,
    Delivery,
    FetchIncomplete,
    JobRecord,
    Keyed,
    Limits,
    NewJob,
    QueueCounts,
    Recorded,
    ServerFacts,
    Settlement,
    StoredEvent,
)
from aioqueue.errors import (
    ConfigurationError,
    EnqueueIncomplete,
    NotReplicated,
    QueueFull,
    RedisUnavailable,
)
from aioqueue.partitions import partition_of

__all__ = ["PartitionedBroker"]

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")


def _share(max_size: int, partitions: int, index: int) -> int:
    """Partition ``index``'s part of a queue's ``max_size``: the parts add up to it exactly
    (0 for a partition left without any when ``max_size`` < N)."""
    whole, extra = divmod(max_size, partitions)
    return whole + (index < extra)


class PartitionedBroker:
    """The brokers of a queue's partitions, as one broker (``Queue`` checks, once
    connected, that the queue was made with as many partitions)."""

    def __init__(self, name: str, parts: Sequence[Broker]) -> None:
        self.name = name
        self.parts = list(parts)
        self._turn = 0

    def _of(self, job_id: str) -> Broker:
        return self.parts[partition_of(job_id, len(self.parts))]

    def _split(self, items: Sequence[T], job_id: Callable[[T], str]) -> dict[int, list[int]]:
        """Positions of ``items`` by partition."""
        where: dict[int, list[int]] = {}
        for position, item in enumerate(items):
            where.setdefault(partition_of(job_id(item), len(self.parts)), []).append(position)
        return where

    async def _grouped(
        self,
        items: Sequence[T],
        job_id: Callable[[T], str],
        call: Callable[[Broker, list[T]], Awaitable[R]],
    ) -> list[tuple[list[int], R]]:
        """``call`` on each partition with its items (by their job ids): the items'
        positions and the answer, per partition."""
        return [
            (positions, await call(self.parts[index], [items[p] for p in positions]))
            for index, positions in self._split(items, job_id).items()
        ]

    async def _in_order(
        self,
        items: Sequence[T],
        job_id: Callable[[T], str],
        call: Callable[[Broker, list[T]], Awaitable[Sequence[A]]],
    ) -> list[A]:
        """``call`` on each partition with its items; one answer per item, in their order."""
        answers: dict[int, A] = {}
        for positions, got in await self._grouped(items, job_id, call):
            answers.update(zip(positions, got, strict=True))
        return [answers[position] for position in range(len(items))]

    async def _each(self, call: Callable[[Broker], Awaitable[T]]) -> list[T]:
        return list(await asyncio.gather(*(call(part) for part in self.parts)))

    # -- connections -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect every partition."""
        await self._each(lambda part: part.connect())

    async def close(self) -> None:
        """Close every partition's connections."""
        await self._each(lambda part: part.close())

    async def now_ms(self) -> int:
        """The clock of the first partition's server."""
        return await self.parts[0].now_ms()

    async def server_facts(self) -> ServerFacts:
        """The weakest of the partitions' servers: evicting if any evicts, persistent only
        if all are."""
        facts = await self._each(lambda part: part.server_facts())
        evicting = next((f.evicting_policy for f in facts if f.evicting_policy), None)
        return ServerFacts(evicting, all(f.persistent for f in facts))

    async def check_access(self, role: str) -> None:
        """Check ``role``'s rights on every partition."""
        await self._each(lambda part: part.check_access(role))

    # -- producing ---------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob], max_size: int) -> list[bool]:
        """Write each job to its partition; ``max_size`` is shared out evenly (the shares
        add up to it). A batch is all or nothing per partition: when one refuses its share
        after others wrote theirs, :class:`EnqueueIncomplete` says which jobs are stored."""
        if any(job.flow is not None for job in jobs):
            raise ConfigurationError(
                f"queue {self.name!r} is partitioned: workflows (chains, groups, depends_on) "
                "need a queue of one partition"
            )
        created: list[bool] = [True] * len(jobs)
        written: list[str] = []
        unconfirmed: NotReplicated | None = None
        for index, positions in sorted(self._split(jobs, lambda job: job.job_id).items()):
            batch = [jobs[p] for p in positions]
            share = _share(max_size, len(self.parts), index)
            try:
                if max_size and not share:
                    raise QueueFull(self.name, max_size, len(jobs))
                try:
                    answers = await self.parts[index].enqueue(batch, share)
                except QueueFull as exc:
                    # Said of the whole queue, not of one partition's share.
                    raise QueueFull(self.name, max_size, len(jobs)) from exc
            except NotReplicated as exc:
                # Stored, not yet confirmed: the other partitions' jobs are written too,
                # and the caller hears of it at the end.
                unconfirmed = unconfirmed or exc
                written += [job.job_id for job in batch]
                continue
            except (QueueFull, RedisUnavailable) as exc:
                if not written:
                    raise
                stored = set(written) | set(getattr(exc, "written", ()))
                rest = [job.job_id for job in jobs if job.job_id not in stored]
                raise EnqueueIncomplete(str(exc), sorted(stored), rest) from exc
            for position, answer in zip(positions, answers, strict=True):
                created[position] = answer
            written += [job.job_id for job in batch]
        if unconfirmed is not None:
            raise unconfirmed
        return created

    async def enqueue_keyed(self, job: NewJob, keyed: Keyed, max_size: int) -> str:
        """Refused: a debounce or throttle key would have to live in one partition."""
        raise ConfigurationError(
            f"queue {self.name!r} is partitioned: debounce and throttle need a queue of one "
            "partition"
        )

    # -- consuming ---------------------------------------------------------------------------

    def configure(
        self, limits: Mapping[str, Limits], lease_ms: int, on_deferred: Callable[[], None]
    ) -> None:
        """Hand every partition the limits (each enforces them on its own jobs)."""
        for part in self.parts:
            part.configure(limits, lease_ms, on_deferred)

    async def ensure_group(self) -> None:
        """Create every partition's stream and group."""
        await self._each(lambda part: part.ensure_group())

    async def fetch(
        self, consumer: str, count: int, block: float, max_deliveries: int
    ) -> list[Delivery]:
        """Fetch from the partitions, each call starting at the next one (fair)."""
        start = self._turn % len(self.parts)
        self._turn += 1
        order = self.parts[start:] + self.parts[:start]
        fetched = await order[0].fetch_many(order, consumer, count, None, block, max_deliveries)
        return [delivery for _, delivery in fetched]

    async def fetch_many(
        self,
        queues: Sequence[PartitionedBroker],
        consumer: str,
        count: int,
        shares: Sequence[int] | None,
        block: float,
        max_deliveries: int,
    ) -> list[tuple[int, Delivery]]:
        """``fetch_many`` over the partitions of ``queues``, each queue's share (if any)
        shared out among its partitions; the index returned is the queue's."""
        parts: list[Broker] = []
        owner: list[int] = []
        part_shares: list[int] = []
        for index, queue in enumerate(queues):
            for number, part in enumerate(queue.parts):
                parts.append(part)
                owner.append(index)
                if shares is not None:
                    whole, extra = divmod(shares[index], len(queue.parts))
                    part_shares.append(whole + (number < extra))
        try:
            fetched = await parts[0].fetch_many(
                parts,
                consumer,
                count,
                None if shares is None else part_shares,
                block,
                max_deliveries,
            )
        except FetchIncomplete as exc:
            raise FetchIncomplete(
                str(exc),
                [(owner[index], delivery) for index, delivery in exc.fetched],
                sorted({owner[index] for index in exc.failed}),
            ) from exc
        return [(owner[index], delivery) for index, delivery in fetched]

    async def reclaim(
        self, consumer: str, count: int, min_idle: float, max_deliveries: int
    ) -> list[Delivery]:
        """Take over expired leases of every partition, ``count`` at most."""
        found: list[Delivery] = []
        for part in self.parts:
            if len(found) < count:
                found += await part.reclaim(consumer, count - len(found), min_idle, max_deliveries)
        return found

    async def adopt(
        self, consumer: str, known: Collection[str], count: int, max_deliveries: int
    ) -> list[Delivery]:
        """Begin entries this consumer holds but does not know, in every partition."""
        found: list[Delivery] = []
        for part in self.parts:
            if len(found) < count:
                found += await part.adopt(consumer, known, count - len(found), max_deliveries)
        return found

    async def settle(self, consumer: str, settlements: Sequence[Settlement]) -> list[Recorded]:
        """Record outcomes, each in its job's partition; answers in the order given."""
        return await self._in_order(
            settlements,
            lambda item: item.delivery.job_id,
            lambda part, batch: part.settle(consumer, batch),
        )

    async def renew(
        self, consumer: str, deliveries: Sequence[Delivery]
    ) -> tuple[list[str], list[str]]:
        """Renew leases, each in its job's partition."""
        groups = await self._grouped(
            deliveries, lambda d: d.job_id, lambda part, batch: part.renew(consumer, batch)
        )
        lost = [entry for _, (gone, _) in groups for entry in gone]
        aborted = [entry for _, (_, stopped) in groups for entry in stopped]
        return lost, aborted

    async def progress(
        self, consumer: str, delivery: Delivery, fraction: float, message: str, seq: int
    ) -> bool:
        """Record a job's progress in its partition."""
        return await self._of(delivery.job_id).progress(consumer, delivery, fraction, message, seq)

    async def listen_aborts(
        self, on_abort: Callable[[str], None], on_ready: Callable[[], None]
    ) -> None:
        """Listen on every partition's abort channel; ``on_ready`` once all listen."""
        waiting = len(self.parts)

        def ready() -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                on_ready()

        await self._each(lambda part: part.listen_aborts(on_abort, ready))

    async def release(self, consumer: str, keep: Collection[str] = ()) -> int:
        """Give back what this consumer holds in every partition."""
        return sum(await self._each(lambda part: part.release(consumer, keep)))

    async def heartbeat(
        self, worker_id: str, info: dict[str, str | int | float], ttl: float
    ) -> None:
        """Record the worker alive in every partition."""
        await self._each(lambda part: part.heartbeat(worker_id, info, ttl))

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a stopping worker's heartbeat from every partition."""
        await self._each(lambda part: part.forget_worker(worker_id))

    async def forget_dead_consumers(self, min_idle: float) -> int:
        """Remove dead consumers from every partition's group."""
        return sum(await self._each(lambda part: part.forget_dead_consumers(min_idle)))

    async def promote_due(self, limit: int, *, early: bool = False) -> float | None:
        """Promote due jobs in every partition; seconds until the next is due."""
        nexts = await self._each(lambda part: part.promote_due(limit, early=early))
        return min((n for n in nexts if n is not None), default=None)

    async def claim_tick(
        self, name: str, fire_ms: int, job: NewJob, unique: bool, lease_ms: int
    ) -> CronClaim:
        """Claim a cron tick in the first partition (the one that runs the queue's cron),
        after checking that the tick's job id hashes there."""
        if partition_of(job.job_id, len(self.parts)) != 0:
            raise ConfigurationError(f"cron job id {job.job_id!r} is not of the first partition")
        return await self.parts[0].claim_tick(name, fire_ms, job, unique, lease_ms)

    # -- inspecting and administering ------------------------------------------------------

    async def claim_partitions(self, queue: str, wanted: int) -> int:
        """See ``AdminBroker.claim_partitions`` (asked of the first partition's server)."""
        return await self.parts[0].claim_partitions(queue, wanted)

    async def record(self, job_id: str) -> JobRecord | None:
        """The job's record, from its partition."""
        return await self._of(job_id).record(job_id)

    async def wait_final(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """Wait for the job to end, in its partition."""
        return await self._of(job_id).wait_final(job_id, timeout)

    async def abort(self, job_id: str) -> str:
        """Abort the job in its partition."""
        return await self._of(job_id).abort(job_id)

    async def abort_many(self, job_ids: Sequence[str]) -> list[str]:
        """Abort jobs, each in its partition; answers in the order given."""
        return await self._in_order(job_ids, str, lambda part, ids: part.abort_many(ids))

    async def statuses(self, job_ids: Sequence[str]) -> list[str | None]:
        """Statuses of jobs, each from its partition; in the order given."""
        return await self._in_order(job_ids, str, lambda part, ids: part.statuses(ids))

    async def dependants(self, job_id: str) -> list[str]:
        """Jobs waiting on ``job_id`` (none: partitioned queues run no workflows)."""
        return await self._of(job_id).dependants(job_id)

    async def events_tail(self) -> str:
        """A cursor past every partition's newest event: theirs, joined by spaces."""
        return " ".join(await self._each(lambda part: part.events_tail()))

    async def events(self, after: str, count: int, block: float | None) -> list[StoredEvent]:
        """Events of every partition after ``after`` (from :meth:`events_tail` or a
        previous event's cursor), oldest first; each event's cursor resumes after it."""
        cursors = after.split(" ") if after else [""] * len(self.parts)
        if len(cursors) == 1:
            cursors *= len(self.parts)  # '0-0/*': from the oldest event of each
        if len(cursors) != len(self.parts):
            raise ConfigurationError(
                f"the event cursor {after!r} is not one of queue {self.name!r}'s "
                f"{len(self.parts)} partitions"
            )
        batches = await asyncio.gather(
            *(part.events(c, count, 0) for part, c in zip(self.parts, cursors, strict=True))
        )
        if block and not any(batches):
            batches = await self._first_events(cursors, count, block)
        merged = heapq.merge(
            *(
                [(event.at_ms, index, event) for event in batch]
                for index, batch in enumerate(batches)
            )
        )
        events: list[StoredEvent] = []
        for _, index, event in merged:
            if len(events) >= count:
                break
            cursors[index] = event.cursor
            events.append(
                StoredEvent(" ".join(cursors), event.at_ms, event.job_id, event.kind, event.details)
            )
        return events

    async def _first_events(
        self, cursors: Sequence[str], count: int, block: float
    ) -> list[list[StoredEvent]]:
        """Block on every partition's events until one has some (or ``block`` passes)."""
        reads = [
            asyncio.ensure_future(part.events(c, count, block))
            for part, c in zip(self.parts, cursors, strict=True)
        ]
        await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
        for read in reads:
            if not read.done():
                read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        return [read.result() if read.done() and not read.cancelled() else [] for read in reads]

    async def pause(self, paused: bool) -> bool:
        """Pause (or resume) every partition; True if the queue was already so."""
        return all(await self._each(lambda part: part.pause(paused)))

    async def paused_since(self) -> int | None:
        """When the queue was paused (None unless every partition is)."""
        since = await self._each(lambda part: part.paused_since())
        return None if any(s is None for s in since) else min(s for s in since if s is not None)

    async def counts(self) -> QueueCounts:
        """Ready, running, delayed and dead jobs, summed over the partitions."""
        counts = await self._each(lambda part: part.counts())
        return QueueCounts(
            sum(c.ready for c in counts),
            sum(c.pending for c in counts),
            sum(c.delayed for c in counts),
            sum(c.dead for c in counts),
        )

    async def waiting(self, limit: int) -> list[JobRecord]:
        """Jobs waiting to run, oldest enqueued first, across the partitions."""
        found = [r for rs in await self._each(lambda part: part.waiting(limit)) for r in rs]
        found.sort(key=lambda record: record.enqueued_ms or 0)
        return found[:limit]

    async def lag_ms(self) -> int | None:
        """The oldest ready job's wait, across the partitions."""
        lags = [lag for lag in await self._each(lambda part: part.lag_ms()) if lag is not None]
        return max(lags, default=None)

    async def workers(self) -> list[dict[str, str]]:
        """Live workers (each once, though every partition records it)."""
        seen: dict[str, dict[str, str]] = {}
        for found in await self._each(lambda part: part.workers()):
            for worker in found:
                seen.setdefault(worker.get("id", ""), worker)
        return list(seen.values())

    async def arrivals(self) -> list[ArrivalSample]:
        """Arrival samples of the whole queue: at each sample time of the first
        partition, the sum of every partition's count (interpolated between its own
        samples)."""
        series = await self._each(lambda part: part.arrivals())
        if any(not samples for samples in series):
            return []
        return [
            ArrivalSample(sample.at_ms, sum(_at(samples, sample.at_ms) for samples in series))
            for sample in series[0]
            if all(samples[0].at_ms <= sample.at_ms <= samples[-1].at_ms for samples in series)
        ]

    async def purge_queue(self) -> int:
        """Delete every partition's jobs; how many keys went."""
        return sum(await self._each(lambda part: part.purge_queue()))

    async def cron_runs(self, names: Sequence[str]) -> dict[str, CronRun]:
        """Last runs of cron jobs (claimed in the first partition)."""
        return await self.parts[0].cron_runs(names)

    async def dead(self, offset: int, limit: int) -> list[JobRecord]:
        """Dead jobs, most recent first, across the partitions."""
        found = [
            r for rs in await self._each(lambda part: part.dead(0, offset + limit)) for r in rs
        ]
        found.sort(key=lambda record: record.finished_ms or 0, reverse=True)
        return found[offset : offset + limit]

    async def dead_ids(self) -> list[str]:
        """Ids of every dead job, across the partitions."""
        return [i for ids in await self._each(lambda part: part.dead_ids()) for i in ids]

    async def requeue_dead(self, job_ids: Sequence[str]) -> int:
        """Requeue dead jobs, each in its partition."""
        groups = await self._grouped(job_ids, str, lambda part, ids: part.requeue_dead(ids))
        return sum(done for _, done in groups)

    async def purge_dead(self, job_ids: Sequence[str]) -> int:
        """Delete dead jobs, each in its partition."""
        groups = await self._grouped(job_ids, str, lambda part, ids: part.purge_dead(ids))
        return sum(done for _, done in groups)


def _at(samples: Sequence[ArrivalSample], at_ms: int) -> int:
    """A partition's arrival count at ``at_ms``, interpolated between its samples."""
    for before, after in itertools.pairwise(samples):
        if before.at_ms <= at_ms <= after.at_ms:
            span = after.at_ms - before.at_ms
            if span <= 0:
                return after.added
            return before.added + (after.added - before.added) * (at_ms - before.at_ms) // span
    return samples[-1].added
