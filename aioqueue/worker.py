"""The worker's lifecycle: fetch as many jobs as there are free slots, run them, settle them
in batches, keep their leases, promote due jobs, and shut down without losing any.

What happens to one job lives in :mod:`aioqueue.execution`; how a state change is stored
lives in the broker. This module is about scheduling and concurrency only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc

from aioqueue.brokers.base import (
    Again,
    Broker,
    Delivery,
    Done,
    FetchIncomplete,
    Finished,
    Recorded,
    ServerFacts,
    Settlement,
)
from aioqueue.brokers.partitioned import PartitionedBroker
from aioqueue.cron import CronJob, validate_unique_names
from aioqueue.errors import (
    AccessDenied,
    AioqueueError,
    ConfigurationError,
    RedisUnavailable,
    UnsupportedRedis,
)
from aioqueue.execution import Running, execute
from aioqueue.limits import share_limits
from aioqueue.metrics import PrometheusMetrics, RateWindow
from aioqueue.middleware import Middleware
from aioqueue.scheduler import CronScheduler
from aioqueue.serialization import Signer
from aioqueue.settings import Settings, resolve_settings

if TYPE_CHECKING:
    from aioqueue.queue import Queue

__all__ = ["Hook", "Worker"]

logger = logging.getLogger(__name__)
job_logger = logging.getLogger("aioqueue.jobs")

T = TypeVar("T")

Hook = Callable[[dict[str, Any]], Awaitable[None]]
"""A startup or shutdown hook: receives the worker's shared ``state`` dict."""

# Reconnect backoff after Redis trouble: full jitter between 0 and this ceiling, doubling.
RECONNECT_BASE = 0.2
RECONNECT_CAP = 5.0
# Every this many heartbeats, consumers of workers that are gone are removed from the group.
CONSUMER_SWEEP_EVERY = 20
# How long shutdown waits for cancelled jobs to end, and for computed outcomes to be written.
SHUTDOWN_WAIT = 10.0


class Worker:
    """Consumes one queue, or several of one Redis (``queue.worker(also=[...])``):
    ``await worker.run()`` until :meth:`stop` or SIGTERM/SIGINT.

    Made by :meth:`Queue.worker`. Every background coroutine (settler, lease renewer,
    reclaimer, promoter, heartbeat) runs in one task group and stops with it. With several
    queues, ``queues[0]`` is the first in strict order (no job of a later queue starts while
    an earlier one has jobs ready), or ``weights`` share the fetched jobs between them
    (docs/flow-control.md#one-worker-several-queues).
    """

    def __init__(
        self,
        queue: Queue,
        *,
        code: dict[str, Any],
        on_startup: Sequence[Hook] = (),
        on_shutdown: Sequence[Hook] = (),
        cron_jobs: Sequence[CronJob] = (),
        middleware: Sequence[Middleware] = (),
        also: Sequence[Queue] = (),
        weights: Sequence[int] | None = None,
    ) -> None:
        self.queue = queue
        if not isinstance(also, (list, tuple)) or not all(hasattr(q, "tasks") for q in also):
            raise ConfigurationError(f"also takes a list of queues, not {also!r}")
        logical = [queue, *also]
        self.weights = _check_queues(logical, weights)
        sources = [q.sources() for q in logical]
        self.queues = [source for each in sources for source in each]
        """What this worker consumes, in order: its queues, a partitioned queue as one
        source per partition (docs/deploying.md#partitioned-queues)."""
        self._logical = logical
        # The index in _logical of each source's queue, and each queue's sources.
        self._group = [i for i, each in enumerate(sources) for _ in each]
        self._members = [
            [source for source, g in enumerate(self._group) if g == group]
            for group in range(len(logical))
        ]
        # Each source's weight: its queue's, shared by the queue's partitions.
        self._source_weights = (
            None
            if self.weights is None
            else [self.weights[g] / len(self._members[g]) for g in self._group]
        )
        # Fetches start at a partition that takes turns, so that each gets served first.
        self._turn = 0
        # Weighted order: each source's credit of jobs to fetch, carried between fetches.
        self._credits = [0.0] * len(self.queues)
        self._code = code
        self.settings: Settings = resolve_settings(code)
        # The worker's own key(s): queue.worker(signing_key=...) may differ from the queue's.
        self.signer = Signer(self.settings.signing_key)
        self.on_startup = list(on_startup)
        self.on_shutdown = list(on_shutdown)
        self.middleware = list(middleware)
        validate_unique_names(cron_jobs)
        self.cron_jobs = list(cron_jobs)
        self.scheduler = CronScheduler(self.queues[0], self.cron_jobs, signer=self.signer)
        # Cron jobs registered on the other queues run on their queue (in its first
        # partition: the other partitions' sources have none).
        self._schedulers = [self.scheduler] + [
            CronScheduler(q, list(q.cron_jobs), signer=self.signer) for q in self.queues[1:]
        ]
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.state: dict[str, Any] = {}
        self.started_at: float | None = None
        # The brokers the running worker serves with, one per queue (progress reports go
        # through them).
        self._serving: list[Broker] = []
        # Outcomes and run time per queue, for each queue's heartbeat (aioqueue info): the
        # partitions of a queue share one.
        tallies = [_Tally() for _ in logical]
        self._tallies = [tallies[g] for g in self._group]
        self.metrics: PrometheusMetrics | None = None
        # Keyed by (queue index, stream entry), not job id: a delivery is (consumer, entry),
        # and an old entry's lost lease must never cancel a newer run of the same job.
        self._in_flight: dict[tuple[int, str], Running] = {}
        self._executing = 0
        # Set when a read that hands entries over failed: its reply may have been lost
        # after Redis handed entries to this consumer, which the fetch loop then adopts.
        self._must_adopt: set[int] = set()
        # Loop time before which adoption is not tried again after a source failed it.
        self._adopt_after = 0.0
        # Loop time before which this worker takes nothing over (see _note_silence).
        self._takeover_after = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Where plain def tasks run; made when the worker starts, shut down when it stops.
        self._threads: ThreadPoolExecutor | None = None
        self._reset()

    def _reset(self) -> None:
        """Fresh synchronisation primitives for one run (they bind to the running loop)."""
        # Finished jobs waiting to be settled, one queue per source: each source settles on
        # its own, so a source whose Redis is away (a failing master) holds up no other.
        self._outboxes: list[asyncio.Queue[tuple[Running, Settlement]]] = [
            asyncio.Queue() for _ in self.queues
        ]
        self._slot_free = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._promote_wakes = [asyncio.Event() for _ in self.queues]
        self._signals = 0

    def __repr__(self) -> str:
        names = ", ".join(repr(q.name) for q in self._logical)
        return f"Worker(queue={names}, id={self.id!r})"

    def configure(self, **overrides: Any) -> None:
        """Apply overrides that beat both code and environment (command-line flags)."""
        self.settings = resolve_settings(self._code, overrides=overrides)
        self.signer = Signer(self.settings.signing_key)
        for scheduler in self._schedulers:
            scheduler.signer = self.signer

    @property
    def completed(self) -> int:
        """Jobs this worker completed (every queue)."""
        return sum(tally.completed for tally in set(self._tallies))

    @property
    def failed(self) -> int:
        """Attempts that failed on this worker (every queue)."""
        return sum(tally.failed for tally in set(self._tallies))

    @property
    def in_flight(self) -> int:
        """Jobs running (or waiting to be settled) on this worker now."""
        return len(self._in_flight)

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new jobs; in-flight ones get ``shutdown_grace`` seconds.

        Safe to call from any thread. Calling it twice skips the rest of the grace period.
        """
        loop = self._loop
        if loop is None:
            return
        if threading.current_thread() is threading.main_thread() and _running_loop() is loop:
            self._request_stop()
        else:
            loop.call_soon_threadsafe(self._request_stop)

    def _request_stop(self) -> None:
        if self._stopping.is_set():
            self._force.set()
        self._stopping.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            logger.info(
                "%s received: finishing %d in-flight jobs (up to %gs); send again to stop now",
                name,
                len(self._in_flight),
                self.settings.shutdown_grace,
            )
        else:
            logger.warning(
                "%s received again: cancelling in-flight jobs and handing them back", name
            )
        self._request_stop()

    @contextlib.asynccontextmanager
    async def embedded(self) -> AsyncIterator[Worker]:
        """Run the worker inside the current event loop for the duration of the block.

        For small deployments that run jobs in the web app's own process, started and
        stopped from the ASGI lifespan::

            @asynccontextmanager
            async def lifespan(app):
                async with queue, worker.embedded():
                    yield

        Returns once the worker is consuming; on exit it stops like on SIGTERM (in-flight jobs
        get ``shutdown_grace`` seconds). Signals stay with the web server.
        """
        consuming = asyncio.Event()
        task = asyncio.create_task(self._consume(False, consuming), name=f"aioqueue-{self.id}")
        ready = asyncio.create_task(consuming.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()
        try:
            yield self
        finally:
            self.stop()
            await task

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run until stopped. Installs SIGTERM/SIGINT handlers when on the main thread."""
        await self._consume(handle_signals, None)

    async def _consume(self, handle_signals: bool, consuming: asyncio.Event | None) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._reset()
        brokers = [queue.new_broker(self.settings) for queue in self.queues]
        for queue, broker, wake in zip(self.queues, brokers, self._promote_wakes, strict=True):
            # A job a limit defers lands in the delayed set: promote it when it is due. The
            # partitions of a queue share its limits out evenly (job ids spread a task's
            # jobs evenly over them).
            parts = queue.settings.partitions
            limits = {
                name: share_limits(name, t.limits.limits, parts)
                for name, t in queue.tasks.items()
                if t.limits
            }
            broker.configure(limits, int(self.settings.lease * 1000), wake.set)
        try:
            for broker in brokers:
                # Only outages are retried: a bad URL, refused credentials or rights and a
                # certificate that does not verify raise at once (they do not pass by
                # themselves).
                await self._retrying("connecting to Redis", broker.connect)
                # Rights are per queue (its keys); the server is one for all of them.
                await self._check_server(broker, server=broker is brokers[0])
            # Before anything is written: a refused number of partitions leaves no streams.
            for group, queue in enumerate(self._logical):
                first = brokers[self._members[group][0]]
                await self._retrying(
                    "checking the queue's partitions",
                    functools.partial(queue.check_partitions, first),
                )
            for broker in brokers:
                await self._retrying("creating the consumer group", broker.ensure_group)
            await self._serve(brokers, loop, handle_signals, consuming)
        except Exception as exc:
            # One aioqueue error that stopped the task group (rights revoked while running)
            # is raised as itself, so that `aioqueue run` prints it in one line.
            error = _only_aioqueue_error(exc)
            if error is None:
                raise
            raise error from None
        finally:
            for broker in brokers:
                await broker.close()

    async def _serve(
        self,
        brokers: list[Broker],
        loop: asyncio.AbstractEventLoop,
        handle_signals: bool,
        consuming: asyncio.Event | None,
    ) -> None:
        if self.settings.metrics_port and self.metrics is None:
            self.metrics = PrometheusMetrics(self.queue.name)
            self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
            logger.info(
                "serving Prometheus metrics on %s:%d",
                self.settings.metrics_host,
                self.settings.metrics_port,
            )
        for hook in self.on_startup:
            await hook(self.state)
        installed = handle_signals and threading.current_thread() is threading.main_thread()
        if installed:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
        self.started_at = time.time()
        self._serving = brokers
        # The gauges show the first queue, all its partitions.
        first = [brokers[source] for source in self._members[0]]
        broker = first[0] if len(first) == 1 else PartitionedBroker(self.queue.name, first)
        self._threads = ThreadPoolExecutor(
            self.settings.sync_threads, thread_name_prefix=f"aioqueue-{self.id}"
        )
        order = ""
        if len(self._logical) > 1:
            order = " (strict order)" if self.weights is None else f" (weights {self.weights})"
        logger.info(
            "worker %s consuming queue %s%s (concurrency %d, lease %gs)",
            self.id,
            ", ".join(
                repr(q.name) + (f" ({len(each)} partitions)" if len(each) > 1 else "")
                for q, each in zip(self._logical, self._members, strict=True)
            ),
            order,
            self.settings.concurrency,
            self.settings.lease,
        )
        lease_ms = int(self.settings.lease * 1000)
        try:
            async with anyio.create_task_group() as tg:
                for source, each in enumerate(brokers):
                    await tg.start(self._abort_loop, each, source)
                    tg.start_soon(self._promote_loop, each, source)
                    tg.start_soon(self._heartbeat_loop, each, source)
                    tg.start_soon(self._schedulers[source].run, each, lease_ms)
                for source, each in enumerate(brokers):
                    tg.start_soon(self._settle_loop, each, source)
                tg.start_soon(self._renew_loop)
                if self.metrics is not None:
                    tg.start_soon(self._gauge_loop, broker, self.metrics)
                if consuming is not None:
                    consuming.set()
                await self._fetch_until_stopped()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            self._stop_threads()
            if installed:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
            for each in brokers:
                with contextlib.suppress(RedisUnavailable, TimeoutError):
                    await self._bounded(each.forget_worker(self.id))
            for hook in self.on_shutdown:
                await hook(self.state)
            logger.info(
                "worker %s stopped: %d complete, %d failed", self.id, self.completed, self.failed
            )

    def _stop_threads(self) -> None:
        """Shut the thread pool down without waiting: threads of plain def tasks the worker
        gave up on (a timeout, an abort) cannot be stopped, and the process exits when they
        return."""
        if self._threads is None:
            return
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._threads = None
        if self._executing:
            logger.warning(
                "%d jobs have not returned; threads of plain def tasks among them cannot be "
                "stopped, and the process exits only once they return",
                self._executing,
            )

    async def _check_server(self, broker: Broker, *, server: bool = True) -> None:
        """Refuse an evicting Redis (it deletes jobs at random) unless allowed; warn when
        nothing is persisted. Before that, check every ACL right a worker needs (Redis
        brokers): a missing one is one PermissionDenied now, before "consuming" is logged,
        not a job stopped half-way later."""
        await self._retrying(
            "checking the worker's rights", functools.partial(broker.check_access, "worker")
        )
        if not server:
            return
        facts: ServerFacts = await self._retrying(
            "reading the Redis configuration", broker.server_facts
        )
        problem = facts.eviction_problem()
        if problem and not self.settings.allow_eviction:
            raise ConfigurationError(problem)
        if problem:
            logger.warning("%s; starting anyway (allow_eviction)", problem)
        if facts.persistent is False:
            logger.warning(
                "Redis persistence (appendonly) is off: a restart of Redis loses every "
                "queued job unless its RDB snapshots are recent enough for you"
            )

    async def _retrying(
        self, what: str, step: Callable[[], Awaitable[Any]], *, broken_too: bool = False
    ) -> Any:
        """Run ``step`` until Redis answers, logging once per outage and backing off.

        With ``broken_too``, an error that is no outage (a queue key some other writer broke)
        is logged and retried the same way instead of ending the worker.
        """
        failures = 0
        while True:
            try:
                return await step()
            except (UnsupportedRedis, AccessDenied):
                raise
            except RedisUnavailable as exc:
                failures += 1
                if failures == 1:
                    logger.warning("%s: %s; retrying with backoff", what, exc)
                await asyncio.sleep(reconnect_delay(failures))
            except Exception:
                if not broken_too:
                    raise
                failures += 1
                if failures == 1:
                    logger.exception("%s failed; retrying with backoff", what)
                await asyncio.sleep(reconnect_delay(failures))

    # -- fetching --------------------------------------------------------------------------

    async def _fetch_until_stopped(self) -> None:
        fetcher = asyncio.create_task(self._fetch_loop(), name="aioqueue-fetch")
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({fetcher, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (fetcher, stopping):
                task.cancel()
            for task in (fetcher, stopping):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _fetch_loop(self) -> None:
        """Start jobs while there are free slots: new entries (fetch.lua, then a blocking
        XREADGROUP), every lease/2 the entries of dead workers whose lease expired
        (XAUTOCLAIM), and after a failed read the entries this consumer holds but does not
        know; with several queues, each of these for every queue.

        One loop does all three, one call at a time, so they can never hand out the same
        free slots twice; a read blocks at most until the next takeover sweep is due.
        """
        settings = self.settings
        block = min(settings.block, 0.1) if settings.burst else settings.block
        sweep_every = settings.lease / 2
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        failures = 0
        # Checked on every turn, not only left to cancellation: a cancellation that a
        # client library swallows while reading (seen with redis-py when it lands on a
        # read being torn down) must not keep the loop fetching after a stop.
        while not self._stopping.is_set():
            free = self._free_slots()
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            # Fetching a quarter of the slots at a time staggers the jobs: while one group
            # waits on I/O the next is being fetched, instead of every job starting (and
            # finishing) in one lock-step batch.
            count = min(free, max(settings.concurrency // 4, 1))
            try:
                deliveries = []
                if self._must_adopt and loop.time() >= self._adopt_after:
                    # A read or begin whose reply was lost left entries in this consumer's
                    # pending list; take them up now, not a lease later: as many as fit,
                    # coming back for more while a full batch was found. A source that
                    # cannot be reached is tried again later; the others go on.
                    deliveries = await self._adopt(free)
                if not deliveries and loop.time() >= max(next_sweep, self._takeover_after):
                    next_sweep = loop.time() + sweep_every
                    deliveries = await self._reclaim(free)
                    for source, delivery in deliveries:
                        if (source, delivery.entry_id) not in self._in_flight:
                            logger.info("took over job %s after its lease expired", delivery.job_id)
                elif not deliveries:
                    wait = min(block, max(next_sweep - loop.time(), 0.001))
                    sent = loop.time()
                    deliveries = await self._fetch(count, wait)
                    if loop.time() - sent > wait + settings.lease / 3:
                        self._note_silence()  # Redis stalled, or this process did
            except RedisUnavailable as exc:
                failures += 1
                self._must_adopt = set(range(len(self._serving)))
                self._note_silence()
                if failures == 1:
                    logger.warning("fetching jobs: %s; reconnecting with backoff", exc)
                await asyncio.sleep(reconnect_delay(failures))
                continue
            except AccessDenied:
                raise  # rights revoked: one clear error ends the worker
            except Exception:
                # A reply the broker could not handle (a record some other writer broke):
                # it must not end the worker, and the other jobs keep coming.
                failures += 1
                logger.exception("fetching jobs failed; going on after a pause")
                await asyncio.sleep(reconnect_delay(failures))
                continue
            for source, delivery in deliveries:
                self._start(source, delivery)
            if failures:
                logger.info("fetching jobs again after %d failed attempts", failures)
                failures = 0
            if deliveries:
                # Let the new jobs take their first step before the next read is sent: a job
                # then starts one round-trip's worth of client work earlier.
                await asyncio.sleep(0)
            elif settings.burst and not self._in_flight and await self._queues_empty():
                names = ", ".join(repr(q.name) for q in self.queues)
                logger.info("burst mode: queue %s empty, stopping", names)
                self._stopping.set()
                return

    async def _fetch(self, count: int, wait: float) -> list[tuple[int, Delivery]]:
        """New jobs from the queues, in their order or by their weights (one step)."""
        brokers, settings = self._serving, self.settings
        if len(brokers) == 1:
            fetched = await brokers[0].fetch(self.id, count, wait, settings.max_deliveries)
            return [(0, delivery) for delivery in fetched]
        shares = None if self._source_weights is None else self._shares(count)
        order = self._order()
        try:
            got = await brokers[order[0]].fetch_many(
                [brokers[i] for i in order],
                self.id,
                count,
                None if shares is None else [shares[i] for i in order],
                wait,
                settings.max_deliveries,
            )
        except FetchIncomplete as exc:
            # Some sources could not be reached (in a cluster, a failing master): the others
            # go on; a lost reply may have begun entries of the failed ones, adopted later.
            failed = {order[index] for index in exc.failed}
            if not failed <= self._must_adopt:
                names = ", ".join(sorted({self.queues[i].name for i in failed}))
                logger.warning("fetching jobs of %s: %s; the other queues go on", names, exc)
            self._must_adopt |= failed
            self._adopt_after = asyncio.get_running_loop().time() + 1.0
            got = exc.fetched
        fetched_many = [(order[index], delivery) for index, delivery in got]
        if shares is not None:
            taken = [0] * len(brokers)
            for source, _ in fetched_many:
                taken[source] += 1
            for source, share in enumerate(shares):
                self._credits[source] -= taken[source]
                if taken[source] < share:
                    # That queue ran out: it banks no credit for later.
                    self._credits[source] = min(self._credits[source], 0.0)
        return fetched_many

    def _order(self) -> list[int]:
        """The sources in the order of this fetch: the queues in their order, the
        partitions of each starting at the next one each time (none is always first)."""
        self._turn += 1
        order: list[int] = []
        for members in self._members:
            start = self._turn % len(members)
            order += members[start:] + members[:start]
        return order

    def _shares(self, count: int) -> list[int]:
        """Each source's share of the next ``count`` jobs by its weight, credit carried over
        between fetches so that small batches follow the weights too."""
        assert self._source_weights is not None
        total = sum(self._source_weights)
        shares = []
        for source, weight in enumerate(self._source_weights):
            self._credits[source] += count * weight / total
            shares.append(max(int(self._credits[source]), 0))
        return shares

    async def _adopt(self, free: int) -> list[tuple[int, Delivery]]:
        """Begin what the sources in ``_must_adopt`` hold for this consumer unknown to it.
        A source done with (it had fewer than asked) leaves the set; one that cannot be
        reached stays, and adoption waits a moment before it is tried again."""
        adopted: list[tuple[int, Delivery]] = []
        for source in sorted(self._must_adopt):
            known = {entry for s, entry in self._in_flight if s == source}
            left = free - len(adopted)
            if left <= 0:
                break
            try:
                got = await self._serving[source].adopt(
                    self.id, known, left, self.settings.max_deliveries
                )
            except RedisUnavailable as exc:
                logger.debug("adopting the jobs of queue %s: %s", self.queues[source].name, exc)
                self._adopt_after = asyncio.get_running_loop().time() + 1.0
                continue
            adopted += [(source, delivery) for delivery in got]
            if len(got) < left:
                self._must_adopt.discard(source)
        return adopted

    async def _reclaim(self, free: int) -> list[tuple[int, Delivery]]:
        """Take over expired leases in every source that can be reached (RedisUnavailable
        only when none can)."""
        taken: list[tuple[int, Delivery]] = []
        failed: RedisUnavailable | None = None
        answered = False
        for source, broker in enumerate(self._serving):
            left = free - len(taken)
            if left <= 0:
                break
            settings = self.settings
            try:
                got = await broker.reclaim(self.id, left, settings.lease, settings.max_deliveries)
            except RedisUnavailable as exc:
                failed = failed or exc
                continue
            answered = True
            taken += [(source, delivery) for delivery in got]
        if failed is not None and not answered:
            raise failed
        return taken

    def _note_silence(self) -> None:
        """This worker could not talk to Redis for a while (an outage, a stall, a stop):
        take nothing over for one lease.

        Such a silence usually silenced every worker, and every lease looks expired when it
        ends. Taking entries over at once would take them from live workers that have not
        had a chance to renew yet (they renew every lease/3); after one lease, whatever is
        still expired belongs to a worker that is really gone.
        """
        loop = asyncio.get_running_loop()
        self._takeover_after = max(self._takeover_after, loop.time() + self.settings.lease)

    async def _queues_empty(self) -> bool:
        """For burst mode: nothing ready, pending or delayed (False while Redis is away)."""
        for broker in self._serving:
            try:
                counts = await broker.counts()
            except RedisUnavailable as exc:
                logger.warning("burst mode: cannot count jobs (%s); going on", exc)
                return False
            if counts.ready or counts.pending or counts.delayed:
                return False
        return True

    def _free_slots(self) -> int:
        """Jobs this worker may start now.

        A slot frees when its job's code returns, not when its outcome has been written: the
        write happens in the next settle batch while the next job already runs. Outcomes
        waiting to be written are bounded by ``concurrency`` too, so a slow Redis stops the
        fetching instead of letting unsettled jobs pile up.
        """
        concurrency = self.settings.concurrency
        unsettled = len(self._in_flight) - self._executing
        if unsettled >= concurrency:
            return 0
        return concurrency - self._executing

    def _start(self, source: int, delivery: Delivery) -> None:
        if (source, delivery.entry_id) in self._in_flight:
            # Our own entry came back from a takeover sweep (it sat idle through an
            # outage): the copy already running keeps it.
            return
        running = Running(delivery, source=source)
        self._in_flight[source, delivery.entry_id] = running
        self._executing += 1
        self._idle.clear()
        running.task = asyncio.create_task(self._run(running))

    async def _run(self, running: Running) -> None:
        try:
            await self._execute(running)
        finally:
            running.when_thread_returns(self._slot_returned)

    def _slot_returned(self) -> None:
        self._executing -= 1
        self._slot_free.set()

    async def _execute(self, running: Running) -> None:
        try:
            settlement = await execute(
                running,
                # The queue itself, not one partition's view of it: what the job enqueues
                # through ctx.queue lands in the partitions of its own ids.
                self._logical[self._group[running.source]],
                self.state,
                self.middleware,
                self.signer,
                self._report,
                self._threads,
            )
        except asyncio.CancelledError:
            if running.cancel_reason is None:
                raise
            settlement = None
        except BaseException as exc:  # a task raising SystemExit must not kill the worker
            from aioqueue.execution import error_info

            settlement = Finished(running.delivery, "failed", error_info(exc), "crashed")
        if settlement is None:
            self._forget(running)
        else:
            self._outboxes[running.source].put_nowait((running, settlement))

    async def _report(self, delivery: Delivery, fraction: float, message: str, seq: int) -> bool:
        """Store a task's progress report (``ctx.progress``)."""
        source = next((r.source for r in self._in_flight.values() if r.delivery is delivery), 0)
        if source >= len(self._serving):
            return False
        broker = self._serving[source]
        return await broker.progress(self.id, delivery, fraction, message, seq)

    def _forget(self, running: Running) -> None:
        key = (running.source, running.delivery.entry_id)
        if self._in_flight.get(key) is running:
            del self._in_flight[key]
        self._slot_free.set()
        if not self._in_flight:
            self._idle.set()

    # -- background coroutines -------------------------------------------------------------

    async def _settle_loop(self, broker: Broker, source: int) -> None:
        """Settle one source's finished jobs in batches: everything that finished since the
        last round trip goes in the next one."""
        outbox = self._outboxes[source]
        while True:
            batch = [await outbox.get()]
            while not outbox.empty():
                batch.append(outbox.get_nowait())
            await self._settle(source, broker, batch)

    async def _settle(
        self, source: int, broker: Broker, batch: list[tuple[Running, Settlement]]
    ) -> None:
        settlements = [settlement for _, settlement in batch]
        recorded = await self._retrying(
            "settling finished jobs",
            functools.partial(broker.settle, self.id, settlements),
            broken_too=True,
        )
        for (running, settlement), answer in zip(batch, recorded, strict=True):
            if answer is Recorded.YES:
                self._log(running, settlement)
                if isinstance(settlement, Again):
                    self._promote_wakes[source].set()
            elif answer is Recorded.ABORTED:
                aborted = Finished(running.delivery, "aborted", b"", "aborted while running")
                self._log(running, aborted)
            else:
                logger.warning(
                    "job %s: outcome not recorded, its lease was lost to another worker "
                    "whose run counts instead",
                    running.delivery.job_id,
                    extra={"job_id": running.delivery.job_id},
                )
            self._forget(running)

    def _log(self, running: Running, settlement: Settlement) -> None:
        if isinstance(settlement, Done):
            level, kind, outcome = logging.INFO, "complete", "complete"
        elif isinstance(settlement, Again):
            level, kind = logging.WARNING, "retrying"
            outcome = f"retrying in {settlement.delay_ms / 1000:.2f}s ({settlement.reason})"
        else:
            level = logging.INFO if settlement.status == "aborted" else logging.ERROR
            kind = settlement.status
            outcome = (
                f"{settlement.status} ({settlement.reason})"
                if settlement.reason
                else settlement.status
            )
        elapsed = time.monotonic() - running.started
        self._tallies[running.source].add(kind == "complete", elapsed)
        if self.metrics is not None:
            # Only registered task names become label values: a job written into Redis
            # with a made-up name must not create a new time series.
            known = running.task_name in self.queue.tasks
            self.metrics.observe(running.task_name if known else "unregistered", kind, elapsed)
        if job_logger.isEnabledFor(level):
            job = running.delivery
            job_logger.log(
                level,
                "%s %s %s in %.1fms",
                running.task_name,
                job.job_id,
                outcome,
                elapsed * 1000,
                extra={"job_id": job.job_id, "task": running.task_name, "outcome": kind},
            )

    async def _renew_loop(self) -> None:
        """Renew the lease of every in-flight job every lease/3 seconds in one round trip
        per queue."""
        interval = self.settings.lease / 3
        loop = asyncio.get_running_loop()
        failures = 0

        async def renew(source: int, broker: Broker) -> None:
            nonlocal failures
            running = [r for r in self._in_flight.values() if r.source == source]
            if not running:
                return
            sent = loop.time()
            try:
                lost, aborted = await broker.renew(self.id, [r.delivery for r in running])
            except RedisUnavailable as exc:
                self._note_silence()
                failures += 1
                if failures == 1:
                    logger.warning("renewing leases: %s", exc)
                return
            failures = 0
            if loop.time() - sent > interval:
                self._note_silence()
            self._renewed(source, lost, aborted)

        while True:
            await asyncio.sleep(interval)
            # At once, not one after the other: a source whose Redis is slow to answer (a
            # failing master) must not make the others' leases lapse.
            await asyncio.gather(*(renew(s, b) for s, b in enumerate(self._serving)))

    def _renewed(self, source: int, lost: list[str], aborted: list[str]) -> None:
        """Act on a renewal's answer: cancel jobs aborted meanwhile and jobs whose lease
        another worker took."""
        for entry in aborted:
            job = self._in_flight.get((source, entry))
            if job is not None:
                self._on_abort(source, job.delivery.job_id)
        for entry in lost:
            job = self._in_flight.get((source, entry))
            # A job whose code already returned only waits for its settle, which may
            # have acked the entry just now: nothing to cancel, and if the lease really
            # was lost, the settle is refused and says so.
            if job is not None and job.task is not None and not job.task.done():
                logger.warning(
                    "lease of job %s was lost to another worker; cancelling it here",
                    job.delivery.job_id,
                )
                job.cancel("lost")

    async def _abort_loop(
        self,
        broker: Broker,
        source: int,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Cancel running jobs when someone aborts them; subscribed before the first fetch."""
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        on_abort = functools.partial(self._on_abort, source)
        await self._retrying(
            "listening for aborts", functools.partial(broker.listen_aborts, on_abort, ready)
        )

    def _on_abort(self, source: int, job_id: str) -> None:
        for running in list(self._in_flight.values()):
            if (
                running.source == source
                and running.delivery.job_id == job_id
                and running.cancel_reason is None
            ):
                logger.info("aborting job %s on request", job_id)
                running.cancel("abort")

    async def _promote_loop(self, broker: Broker, source: int) -> None:
        """Move due delayed jobs to the stream; sleep until the next one is due."""
        wake = self._promote_wakes[source]
        cap = self.settings.poll_interval
        failures = 0
        while True:
            wake.clear()
            try:
                next_due = await broker.promote_due(1000)
                failures = 0
            except RedisUnavailable as exc:
                failures += 1
                if failures == 1:
                    logger.warning("promoting delayed jobs: %s", exc)
                next_due = None
            except AccessDenied:
                raise
            except Exception:
                # A queue key some other writer broke (wrong type): log it, keep running.
                failures += 1
                if failures == 1:
                    logger.exception("promoting delayed jobs failed; going on")
                next_due = None
            pause = cap if next_due is None else min(next_due, cap)
            if pause > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), pause)

    async def _heartbeat_loop(self, broker: Broker, source: int) -> None:
        """Say this worker is alive, with what it did for this queue (its concurrency is
        shared by all its queues); now and then remove the consumers of workers that are
        gone (their heartbeat expired and they hold nothing)."""
        interval = min(self.settings.lease / 3, 5.0)
        beats = 0
        tally = self._tallies[source]
        group = self._group[source]
        while True:
            info: dict[str, str | int | float] = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "concurrency": self.settings.concurrency,
                "in_flight": sum(
                    1 for r in self._in_flight.values() if self._group[r.source] == group
                ),
                "started": self.started_at or 0.0,
                "beat": time.time(),
                "completed": tally.completed,
                "failed": tally.failed,
                "completed_1m": tally.completed_last_minute.total(),
                "failed_1m": tally.failed_last_minute.total(),
                "busy_1m": tally.busy_us_last_minute.total() / 1_000_000,
                "queue": self.queues[source].name,
            }
            try:
                await broker.heartbeat(self.id, info, ttl=interval * 2)
                beats += 1
                if beats % CONSUMER_SWEEP_EVERY == 0:
                    await broker.forget_dead_consumers(min_idle=self.settings.lease * 2)
            except RedisUnavailable as exc:
                logger.debug("heartbeat: %s", exc)
            await asyncio.sleep(interval)

    async def _gauge_loop(self, broker: Broker, metrics: PrometheusMetrics) -> None:
        """Refresh the queue depth and lag gauges every few seconds."""
        while True:
            try:
                metrics.set_queue(await broker.counts(), await broker.lag_ms(), self.in_flight)
            except RedisUnavailable as exc:
                logger.debug("metrics: %s", exc)
            await asyncio.sleep(5)

    # -- shutdown --------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Let in-flight jobs finish within the grace period, then cancel and hand back the
        rest so another worker starts them at once."""
        if self._in_flight:
            idle = asyncio.create_task(self._idle.wait())
            force = asyncio.create_task(self._force.wait())
            await asyncio.wait(
                {idle, force},
                timeout=self.settings.shutdown_grace,
                return_when=asyncio.FIRST_COMPLETED,
            )
            idle.cancel()
            force.cancel()
        unfinished = [
            r for r in self._in_flight.values() if r.task is not None and not r.task.done()
        ]
        for running in unfinished:
            running.cancel("shutdown")
        stuck: set[tuple[int, str]] = set()
        if unfinished:
            logger.warning("cancelled %d unfinished jobs at shutdown", len(unfinished))
            tasks = {r.task for r in unfinished if r.task is not None}
            force = asyncio.create_task(self._force.wait())
            deadline = asyncio.get_running_loop().time() + SHUTDOWN_WAIT
            while tasks and not force.done():
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                _, tasks = await asyncio.wait(
                    {*tasks, force}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                tasks.discard(force)
            force.cancel()
            # A job that swallows its cancellation is still running: it is not handed back
            # (that would start a second copy beside it); its lease expires instead.
            stuck = {(r.source, r.delivery.entry_id) for r in unfinished if r.task in tasks}
            if stuck:
                logger.error(
                    "%d jobs ignored cancellation at shutdown; they return when their lease "
                    "expires",
                    len(stuck),
                )
        # Results already computed are settled before anything is handed back.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_WAIT
        while set(self._in_flight) - stuck and loop.time() < deadline:
            self._slot_free.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._slot_free.wait(), deadline - loop.time())
        # An outcome that could not be written (Redis away) keeps its entry: handing it back
        # would run the job again although it finished here.
        keep = stuck | {key for key, r in self._in_flight.items() if r.task and r.task.done()}
        try:
            released = 0
            for source, broker in enumerate(self._serving):
                mine = {entry for s, entry in keep if s == source}
                released += await self._bounded(broker.release(self.id, mine))
        except (RedisUnavailable, TimeoutError) as exc:
            logger.warning(
                "could not hand jobs back (%s); they return when their lease expires",
                exc or "Redis did not answer in time",
            )
        else:
            if released:
                logger.info("handed %d jobs back to the queue", released)

    async def _bounded(self, step: Awaitable[T]) -> T:
        """A shutdown step that may not hold the exit: it gets SHUTDOWN_WAIT seconds, and a
        second signal ends it at once (TimeoutError either way). Redis that does not answer
        (a partition) would otherwise hold it for the client's retries times its timeout."""
        task = asyncio.ensure_future(step)
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait(
                {task, force}, timeout=SHUTDOWN_WAIT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            force.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise TimeoutError
        return task.result()


class _Tally:
    """What a worker did for one of its queues: outcomes, and run time, in the last minute."""

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.completed_last_minute = RateWindow(60)
        self.failed_last_minute = RateWindow(60)
        self.busy_us_last_minute = RateWindow(60)

    def add(self, completed: bool, seconds: float) -> None:
        if completed:
            self.completed += 1
            self.completed_last_minute.add()
        else:
            self.failed += 1
            self.failed_last_minute.add()
        self.busy_us_last_minute.add(round(seconds * 1_000_000))


def _check_queues(queues: Sequence[Queue], weights: Sequence[int] | None) -> list[int] | None:
    """Refuse a set of queues one worker cannot consume together; the weights as a list."""
    names = [queue.name for queue in queues]
    if len(set(names)) < len(names):
        raise ConfigurationError(f"a worker consumes each queue once, not {names}")
    urls = {queue.settings.redis_url for queue in queues}
    if len(urls) > 1:
        raise ConfigurationError(
            "the queues of one worker must live on the same Redis (one blocking read covers "
            "them all); run a worker per Redis instead"
        )
    if weights is None:
        return None
    weights = list(weights)
    if len(weights) != len(queues) or any(
        isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in weights
    ):
        raise ConfigurationError(
            f"weights: one whole number >= 1 per queue ({len(queues)}), not {weights!r}"
        )
    return weights


def _only_aioqueue_error(exc: BaseException) -> AioqueueError | None:
    """The single aioqueue error inside (nested) exception groups, or None."""
    leaves: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop()
        inner = getattr(current, "exceptions", None)
        if isinstance(inner, tuple):
            todo += inner
        else:
            leaves.append(current)
    if len(leaves) == 1 and leaves[0] is not exc and isinstance(leaves[0], AioqueueError):
        return leaves[0]
    return None


def reconnect_delay(failures: int) -> float:
    """Full-jitter backoff after ``failures`` consecutive Redis failures."""
    return random.uniform(0, min(RECONNECT_CAP, RECONNECT_BASE * 2**failures))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
