"""The in-process ``memory://`` implementation of the broker protocol, for unit tests and demos.

``Queue("memory://")`` (or ``AIOQUEUE_REDIS_URL=memory://name``) runs producers and workers
of one process against :class:`MemoryBroker` instead of Redis. Every method follows the Lua
script of the Redis broker it stands for (named in its docstring), with the same statuses,
counters, ownership rules and outcomes, and the contract tests in
``tests/test_broker_contract.py`` run against both brokers so they cannot drift apart.

Every method does its whole state change without awaiting, so each is one atomic step on
the event loop, as each script is in Redis. Blocking fetches and result waits sleep on
futures that the state changes wake; nothing polls. Jobs live only as long as the process;
see :mod:`aioqueue.brokers.memory_store` for the stores, their sharing per URL and their
binding to one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from aioqueue.brokers.base import (
    Again,
    ArrivalSample,
    CronClaim,
    CronRun,
    Delivery,
    Done,
    Finished,
    JobRecord,
    Keyed,
    Limits,
    NewJob,
    QueueCounts,
    Recorded,
    ServerFacts,
    Settlement,
    StoredEvent,
    counted,
)
from aioqueue.brokers.memory_store import (
    FINAL,
    FlowContext,
    Heartbeat,
    QueueState,
    ScoredSet,
    StoredJob,
    Waiters,
    lua_number,
    now_ms,
    parse_cursor,
    reset_stores,
    store_for,
    wait_any,
)
from aioqueue.errors import QueueFull, WorkflowConflict

__all__ = ["MemoryBroker", "reset_stores"]

END_OF_TIME_MS = 2**63
"""A due time no delayed job has: promoting ``early`` takes every one."""

CHUNK = 500
"""Jobs per script call where the Redis broker splits a call (its ``CHUNK``): each chunk is
one step with its own events entry here too."""

MEMO_SECONDS = 600.0
"""How long a script's answer is kept for a repeat (the memo keys' TTL)."""

DEBOUNCE_MARGIN_SECONDS = 60.0
"""How long a debounce key outlives its window (``keyed.lua``'s ``MARGIN_MS``)."""


def _dependants(jobs: Sequence[NewJob]) -> list[list[tuple[str, int]]]:
    """Each job's dependants in the batch (its ``FlowNode.next``) in the order enqueue.lua
    lists them in its ``next`` field: the ones its own spec names first, then the group
    nodes of the batch it is a member of (the Redis broker sends those in the groups'
    ``members`` runs), by the group's place in the batch, then by slot."""
    groups: dict[str, int] = {}
    for index, job in enumerate(jobs):
        if job.flow is not None and job.flow.kind == "group":
            groups.setdefault(job.job_id, index)
    ordered: list[list[tuple[str, int]]] = []
    for job in jobs:
        edges = job.flow.next if job.flow is not None else ()
        own = [(w, s) for w, s in edges if w not in groups]
        member = sorted(
            ((w, s) for w, s in edges if w in groups), key=lambda e: (groups[e[0]], e[1])
        )
        ordered.append(own + member)
    return ordered


class MemoryBroker:
    """A queue's storage in this process's memory, shared by every broker on the same URL.

    ``url`` is ``memory://`` or ``memory://name``; ``queue`` the queue name; ``result_ttl``
    how many seconds finished jobs are kept (dead letters are kept until purged);
    ``events_max_len`` how many entries of job events are kept (0: none are recorded).
    """

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        result_ttl: float = 86_400.0,
        events_max_len: int = 10_000,
    ) -> None:
        self.url = url
        self.queue = queue
        self.result_ttl = result_ttl
        self.events_max_len = events_max_len
        self._store = store_for(url)
        # A worker's tasks' limits, its lease, and what to call when a start was deferred.
        self._limits: dict[str, Limits] = {}
        self._lease_ms = 30_000
        self._on_deferred: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"MemoryBroker({self.url!r}, {self.queue!r})"

    async def _state(self) -> QueueState:
        # Yield to the loop once, as a network round trip would: a caller polling in a loop
        # (``while await job.status() ...``) must not starve the worker. The state change
        # that follows runs without awaiting, hence atomically.
        await asyncio.sleep(0)
        self._store.bind()
        state = self._store.queue(self.queue)
        state.sweep()
        return state

    # -- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Bind the store to the running event loop; idempotent."""
        await self._state()

    async def close(self) -> None:
        """Nothing to close: the store outlives its brokers (see :func:`reset_stores`)."""

    async def ensure_group(self) -> None:
        """Nothing to create: a queue's state exists from its first use."""
        await self._state()

    async def now_ms(self) -> int:
        """The broker's clock in ms: this process's wall clock, shared by every broker in it."""
        await self._state()
        return now_ms()

    async def server_facts(self) -> ServerFacts:
        """An in-process store neither evicts nor persists."""
        return ServerFacts(evicting_policy=None, persistent=None)

    async def check_access(self, role: str) -> None:
        """An in-process store has no users: every role may do everything."""

    # -- producing -------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob], max_size: int) -> list[bool]:
        """Write jobs (``enqueue.lua``): True per new id, and per id whose stored envelope is
        byte-for-byte the one given (the same enqueue, repeated); False per other id that
        exists (or repeats in the batch). A job runs at ``run_at_ms`` and no sooner than
        ``delay_ms`` from now. Raises QueueFull, writing nothing, if the new jobs that are
        ready or delayed (waiting jobs and group nodes aside: they count from their release)
        would take ready + pending + delayed past ``max_size``.

        Workflows (``NewJob.flow``): a job with dependencies is stored ``waiting``, wired to
        them; a dependency that has already ended hands over its outcome at once; a group
        with no members completes at once. The whole batch is one atomic step; like the
        Redis broker, a plain batch without ``max_size`` is written in chunks of
        :data:`CHUNK` jobs, each with its own events entry (a job id repeated in a later
        chunk is a repeat of the earlier one)."""
        state = await self._state()
        flow = any(job.flow is not None for job in jobs)
        size = len(jobs) if max_size > 0 or flow else CHUNK
        created: list[bool] = []
        for start in range(0, len(jobs), max(size, 1)):
            created += self._enqueue_chunk(state, jobs[start : start + size], max_size)
        return created

    def _enqueue_chunk(
        self, state: QueueState, jobs: Sequence[NewJob], max_size: int
    ) -> list[bool]:
        """One ``enqueue.lua`` call."""
        fresh: list[bool] = []
        created: list[bool] = []
        seen: set[str] = set()
        fresh_ids: set[str] = set()
        new = 0
        dependants = _dependants(jobs)
        for job in jobs:
            stored = None if job.job_id in seen else state.job(job.job_id)
            is_new = job.job_id not in seen and stored is None
            shape = job.flow.shape if job.flow is not None else ""
            conflict = stored is not None and stored.envelope != job.envelope
            if conflict and shape and stored is not None and stored.shape != shape:
                raise WorkflowConflict(job.job_id)
            fresh.append(is_new)
            created.append(is_new or (stored is not None and stored.envelope == job.envelope))
            seen.add(job.job_id)
            if is_new:
                fresh_ids.add(job.job_id)
                # max_size counts what is ready or delayed; a waiting job counts from its
                # release.
                if job.flow is None or (job.flow.kind != "group" and job.flow.pending == 0):
                    new += 1
        if max_size > 0 and new > 0 and state.size() + new > max_size:
            raise QueueFull(self.queue, max_size, counted(jobs))
        now = now_ms()
        ctx = FlowContext(now, self.result_ttl)
        # (dependency id, slot, dependant id) of edges to jobs that existed before this call.
        edges: list[tuple[str, int, str]] = []
        groups: list[str] = []
        # Ids of the jobs written, per status they start in: one event item names them all.
        written: dict[str, list[str]] = {"queued": [], "scheduled": [], "waiting": []}
        for index, (job, is_new, is_created) in enumerate(zip(jobs, fresh, created, strict=True)):
            node = job.flow
            if not is_new:
                if not is_created and node is not None:
                    # An existing job named as a dependency in this batch: wire it like one
                    # outside it (only dependants written by this call wait for anything).
                    edges += [(job.job_id, s, w) for w, s in dependants[index] if w in fresh_ids]
                continue
            run_at = job.run_at_ms
            if job.delay_ms > 0:
                run_at = max(run_at, now + job.delay_ms)
            stored = StoredJob(job.envelope, "queued", now, priority=job.priority)
            stored.limit_keys = job.limit_keys
            state.jobs[job.job_id] = stored
            if node is not None:
                # Every dependant named here is written by this call: born now.
                following = [(w, s, now) for w, s in dependants[index] if w in fresh_ids]
                if following:
                    stored.next = following
                edges += [(d, s, job.job_id) for d, s in node.after]
            if node is not None and (node.kind == "group" or node.pending > 0):
                stored.status = "waiting"
                stored.pending = node.pending
                stored.policy = node.policy
                if run_at > 0:
                    stored.run_at_ms = run_at
                stored.feed = node.feed
                if node.kind == "group":
                    stored.kind = "group"
                    stored.size = node.pending if node.size is None else node.size
                    stored.shape = node.shape
                    groups.append(job.job_id)
            elif run_at > now:
                stored.status = "scheduled"
                stored.run_at_ms = run_at
                state.delayed.add(job.job_id, run_at)
            else:
                stored.entry = state.add_entry(job.job_id)
            written[stored.status].append(job.job_id)
        # Dependencies that existed before this call: wait for them, or take their outcome.
        # As enqueue.lua, the edges to one dependency are gathered and appended once, after
        # every edge is seen: a dependency found waiting is not looked at again, even if an
        # edge resolved meanwhile ended it (its drain then settles them all).
        appends: dict[str, tuple[StoredJob, list[tuple[str, int, int]]]] = {}
        for did, slot, wid in edges:
            gathered = appends.get(did)
            if gathered is not None:
                gathered[1].append((wid, slot, now))
                continue
            dependency = state.job(did)
            if dependency is None:
                state.resolve_edge(ctx, did, (None, None, None), wid, slot, None)
            elif dependency.status in FINAL:
                outcome = (dependency.status, dependency.result, dependency.error)
                state.resolve_edge(ctx, did, outcome, wid, slot, None)
            else:
                appends[did] = (dependency, [(wid, slot, now)])
        for dependency, lines in appends.values():
            if dependency.next is None:
                dependency.next = lines
            else:
                dependency.next += lines
        # A group with no members is complete at once.
        for group_id in groups:
            node_job = state.job(group_id)
            if node_job is not None and node_job.status == "waiting" and node_job.pending <= 0:
                state.release(ctx, group_id, node_job)
        # Written before anything this call released or failed, so they come first: queued,
        # scheduled, waiting (each item expanded into one event per job, as readers do).
        ctx.events[:0] = [
            (job_id, "enqueued", status)
            for status in ("queued", "scheduled", "waiting")
            for job_id in written[status]
        ]
        state.flow_drain(ctx)
        state.events.add(self.events_max_len, ctx.events)
        return created

    # -- debounce and throttle -------------------------------------------------------------

    async def enqueue_keyed(self, job: NewJob, keyed: Keyed, max_size: int) -> str:
        """Write one job under a debounce or throttle key (``keyed.lua``); returns the id
        of the job that answers the enqueue.

        An id whose record holds an envelope answers itself (the same request repeated).
        Throttle: while the key's slot lives (one window from the job that took it), the
        holder answers and nothing is written; a refusal whose slot ends within
        :data:`MEMO_SECONDS` keeps its answer that long for a repeat. Otherwise the job is
        queued and takes the slot. Debounce: the job is scheduled a window from now and
        takes the slot for the window plus :data:`DEBOUNCE_MARGIN_SECONDS`; the job the
        slot named, if still scheduled, ends aborted (reason ``debounced``, ``replaced_by``
        the new job) and hands that outcome to its dependants. Raises QueueFull, writing
        nothing, when a job that replaces none would take the queue past ``max_size``."""
        state = await self._state()
        stored = state.job(job.job_id)
        if stored is not None and stored.envelope is not None:
            return job.job_id
        slot = f"{keyed.mode}:{len(keyed.task)}:{keyed.task}:{keyed.key}"
        previous: tuple[str, StoredJob] | None = None
        if keyed.mode == "throttle":
            memo = state.memos.get(job.job_id)
            if memo is not None:
                return memo
            holder = state.keyed.get(slot)
            if holder is not None:
                if state.keyed.ttl(slot) < MEMO_SECONDS:
                    state.memos.set(job.job_id, holder, MEMO_SECONDS)
                return holder
        else:
            named = state.keyed.get(slot)
            found = None if named is None else state.job(named)
            if named is not None and found is not None and found.status == "scheduled":
                previous = (named, found)
        if max_size > 0 and previous is None and state.size() + 1 > max_size:
            raise QueueFull(self.queue, max_size, 1)
        now = now_ms()
        ctx = FlowContext(now, self.result_ttl)
        window = keyed.window_ms / 1000
        if keyed.mode == "throttle":
            stored = StoredJob(job.envelope, "queued", now)
            state.jobs[job.job_id] = stored
            stored.entry = state.add_entry(job.job_id)
            state.keyed.set(slot, job.job_id, window)
            ctx.event(job.job_id, "enqueued", "queued")
        else:
            run_at = now + keyed.window_ms
            state.jobs[job.job_id] = StoredJob(job.envelope, "scheduled", now, run_at_ms=run_at)
            state.delayed.add(job.job_id, run_at)
            state.keyed.set(slot, job.job_id, window + DEBOUNCE_MARGIN_SECONDS)
            ctx.event(job.job_id, "enqueued", "scheduled")
        if previous is not None:
            replaced_id, replaced = previous
            state.delayed.discard(replaced_id)
            replaced.status = "aborted"
            replaced.finished_ms = now
            replaced.reason = "debounced"
            replaced.replaced_by = job.job_id
            state.expire(replaced_id, replaced, self.result_ttl)
            state.finalized(replaced_id)
            ctx.event(replaced_id, "aborted", "debounced")
            if replaced.next:
                ctx.work.append(replaced_id)
                state.flow_drain(ctx)
        state.events.add(self.events_max_len, ctx.events)
        return job.job_id

    # -- consuming -------------------------------------------------------------------------

    def configure(
        self, limits: Mapping[str, Limits], lease_ms: int, on_deferred: Callable[[], None]
    ) -> None:
        """The worker's tasks' limits, its lease and its deferral callback (begin uses
        them)."""
        self._limits = dict(limits)
        self._lease_ms = lease_ms
        self._on_deferred = on_deferred

    async def fetch(
        self, consumer: str, count: int, block: float, max_deliveries: int
    ) -> list[Delivery]:
        """Wait up to ``block`` seconds for ready jobs, hand up to ``count`` of them to
        ``consumer``, highest priority first, and mark them running (``fetch.lua``). Wakes
        as soon as a job is enqueued, promoted, released, requeued or the queue is resumed;
        a paused queue hands out nothing."""
        fetched = await self.fetch_many([self], consumer, count, None, block, max_deliveries)
        return [delivery for _, delivery in fetched]

    async def fetch_many(
        self,
        queues: Sequence[MemoryBroker],
        consumer: str,
        count: int,
        shares: Sequence[int] | None,
        block: float,
        max_deliveries: int,
    ) -> list[tuple[int, Delivery]]:
        """Fetch from several queues of this store in one step: in their order (strict), or
        each up to its share of ``count`` first (weighted). Returns (index of the queue,
        delivery) pairs."""
        states = [await queue._state() for queue in queues]
        fetched: list[tuple[int, Delivery]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block
        while True:
            open_ = [s.paused_ms is None for s in states]
            wanted = [0] * len(queues)
            left = count
            if shares is not None:
                for i, state in enumerate(states):
                    if open_[i]:
                        wanted[i] = min(shares[i], left, len(state.ready))
                        left -= wanted[i]
            for i, state in enumerate(states):
                if open_[i]:
                    more = min(left, len(state.ready) - wanted[i])
                    wanted[i] += more
                    left -= more
            if any(wanted):
                for index, (queue, state) in enumerate(zip(queues, states, strict=True)):
                    if wanted[index]:
                        entries = state.deliver(consumer, wanted[index])
                        got = queue._begin(state, consumer, entries, max_deliveries, check=False)
                        fetched += [(index, delivery) for delivery in got]
                return fetched
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            await wait_any([state.ready_waiters for state in states], remaining)
            states = [await queue._state() for queue in queues]

    def _begin(
        self,
        state: QueueState,
        consumer: str,
        entries: Sequence[tuple[str, str]],
        max_deliveries: int,
        *,
        check: bool,
    ) -> list[Delivery]:
        """``begin_batch`` with this broker's result TTL, events cap and limits."""
        return state.begin(
            consumer,
            entries,
            max_deliveries,
            check=check,
            ttl=self.result_ttl,
            cap=self.events_max_len,
            paused=state.paused_ms is not None,
            limits=self._limits,
            lease_ms=self._lease_ms,
            on_deferred=self._on_deferred,
        )

    async def reclaim(
        self, consumer: str, count: int, min_idle: float, max_deliveries: int
    ) -> list[Delivery]:
        """Take over up to ``count`` pending entries idle for ``min_idle`` seconds or more
        (XAUTOCLAIM) and begin them. This consumer's own idle entries are taken too; begin
        hands those back as they stand, without counting a delivery."""
        state = await self._state()
        if count <= 0:
            return []
        now = time.monotonic()
        taken: list[tuple[str, str]] = []
        for entry, row in state.pending.items():
            if len(taken) >= count:
                break
            if now - row.delivered_at >= min_idle:
                row.consumer = consumer
                row.delivered_at = now
                taken.append((entry, row.job_id))
        if taken:
            state.consumers[consumer] = now
        return self._begin(state, consumer, taken, max_deliveries, check=True)

    async def adopt(
        self, consumer: str, known: Collection[str], count: int, max_deliveries: int
    ) -> list[Delivery]:
        """Begin up to ``count`` entries in this consumer's pending list that are not in
        ``known`` (delivered by a read, or begun by a call, whose reply was lost)."""
        state = await self._state()
        unknown = [(e, j) for e, j in state.own_pending(consumer) if e not in known]
        adopted: list[Delivery] = []
        start = 0
        while start < len(unknown) and len(adopted) < count:
            batch = unknown[start : start + count - len(adopted)]
            start += len(batch)
            adopted += self._begin(state, consumer, batch, max_deliveries, check=True)
        return adopted

    async def settle(self, consumer: str, settlements: Sequence[Settlement]) -> list[Recorded]:
        """Record outcomes (``settle.lua``), in order, one step per :data:`CHUNK`
        settlements as the Redis broker splits them. A settlement is accepted only from the
        consumer and entry that began the job (False otherwise: the lease was lost). An
        accepted outcome is applied only to a running job (an aborted job takes only
        'aborted'); one already settled (a repeat) changes nothing. The entries of accepted
        settlements are dropped. The final outcome of a running job is announced and handed
        to its dependants (:meth:`QueueState.flow_drain`); a retry hands over nothing, and a
        job aborted while it ran was announced and handed over by the abort."""
        state = await self._state()
        out: list[Recorded] = []
        for start in range(0, len(settlements), CHUNK):
            ctx = FlowContext(now_ms(), self.result_ttl)
            for settlement in settlements[start : start + CHUNK]:
                out.append(self._settle_one(state, ctx, consumer, settlement))
            state.flow_drain(ctx)
            state.events.add(self.events_max_len, ctx.events)
        return out

    def _settle_one(
        self, state: QueueState, ctx: FlowContext, consumer: str, settlement: Settlement
    ) -> Recorded:
        delivery = settlement.delivery
        job_id = delivery.job_id
        job = state.job(job_id)
        pair = (consumer, delivery.entry_id)
        if job is None or job.worker != consumer or job.entry != delivery.entry_id:
            settled = job is not None and job.settled == pair
            return Recorded.YES if settled else Recorded.LOST
        aborting = isinstance(settlement, Finished) and settlement.status == "aborted"
        state.drop_entry(delivery.entry_id)
        state.free_slot(job_id, job)
        if job.status == "aborted" and not aborting:
            return Recorded.ABORTED
        if job.status == "running" or (job.status == "aborted" and aborting):
            self._apply(state, ctx, job_id, job, settlement)
            job.settled = pair
        return Recorded.YES

    def _apply(
        self,
        state: QueueState,
        ctx: FlowContext,
        job_id: str,
        job: StoredJob,
        settlement: Settlement,
    ) -> None:
        """Write one accepted outcome to its job (running, or aborted while it ran and
        settled as aborted)."""
        now = ctx.now
        if isinstance(settlement, Done):
            job.status = "complete"
            job.result = settlement.result
            job.finished_ms = now
            if job.feed and job.inputs is not None:
                job.inputs.pop(1, None)  # a step's input is not kept once it ran
            state.expire(job_id, job, self.result_ttl)
            state.finalized(job_id)
            ctx.event(job_id, "completed")
            if job.next:
                ctx.work.append(job_id)
        elif isinstance(settlement, Again):
            run_at = now + settlement.delay_ms
            job.status = "retrying"
            job.error = settlement.error
            job.reason = settlement.reason
            job.run_at_ms = run_at
            job.deliveries = 0
            job.finished_ms = now
            job.attempt += 1
            state.delayed.add(job_id, run_at)
            ctx.event(job_id, "retrying", settlement.reason, job.attempt)
        else:
            was_running = job.status == "running"
            job.status = settlement.status
            job.error = settlement.error
            job.reason = settlement.reason
            job.finished_ms = now
            if settlement.status == "dead":
                job.expires_at = None
                state.dead.add(job_id, now)
            else:
                state.expire(job_id, job, self.result_ttl)
                if job.feed and job.inputs is not None:
                    job.inputs.pop(1, None)  # kept only for a dead job, to requeue it
            state.finalized(job_id)
            # A job aborted while it ran was announced and handed to its dependants by abort.
            if was_running:
                ctx.event(job_id, settlement.status, settlement.reason)
                if job.next:
                    ctx.work.append(job_id)

    async def renew(
        self, consumer: str, deliveries: Sequence[Delivery]
    ) -> tuple[list[str], list[str]]:
        """Reset the idle time of the entries this consumer still owns (``renew.lua``).

        Returns the entry ids it no longer owns and the entry ids of jobs aborted meanwhile.
        """
        state = await self._state()
        now = time.monotonic()
        lost: list[str] = []
        aborted: list[str] = []
        claimed = False
        for delivery in deliveries:
            row = state.pending.get(delivery.entry_id)
            if row is None or row.consumer != consumer:
                lost.append(delivery.entry_id)
                continue
            row.delivered_at = now
            claimed = True
            job = state.job(delivery.job_id)
            if job is not None and job.status == "aborted":
                aborted.append(delivery.entry_id)
            elif job is not None and job.slot is not None:
                holders = state.slots.get(job.slot, {})
                if delivery.job_id in holders:
                    holders[delivery.job_id] = now_ms() + self._lease_ms
        if claimed:
            state.consumers[consumer] = now
        return lost, aborted

    async def progress(
        self, consumer: str, delivery: Delivery, fraction: float, message: str, seq: int
    ) -> bool:
        """Store and announce a running job's progress (``progress.lua``): only while the
        job runs under this consumer and entry (False otherwise: a late report never
        overwrites a newer run's). Report ``seq`` of the delivery stored already (a repeat)
        answers True and announces nothing twice."""
        state = await self._state()
        job = state.job(delivery.job_id)
        if (
            job is None
            or job.status != "running"
            or job.worker != consumer
            or job.entry != delivery.entry_id
        ):
            return False
        mark = (delivery.entry_id, seq)
        if job.progress_seq == mark:
            return True
        number = float(fraction)
        job.progress = number
        job.progress_message = message
        job.progress_ms = now_ms()
        job.progress_seq = mark
        state.events.add(
            self.events_max_len, [(delivery.job_id, "progress", lua_number(number), message)]
        )
        return True

    async def listen_aborts(
        self, on_abort: Callable[[str], None], on_ready: Callable[[], None]
    ) -> None:
        """Call ``on_ready()`` once subscribed, then ``on_abort(job_id)`` for every abort of a
        running job, until cancelled."""
        state = await self._state()
        inbox: asyncio.Queue[str] = asyncio.Queue()
        state.abort_listeners.add(inbox)
        try:
            on_ready()
            while True:
                on_abort(await inbox.get())
        finally:
            state.abort_listeners.discard(inbox)

    async def release(self, consumer: str, keep: Collection[str] = ()) -> int:
        """Hand back every entry this consumer holds, except those in ``keep``, as a fresh
        ready entry (``release.lua``). Each entry is dropped; its job is re-queued only if the
        entry is still the job's current one and the job is queued or running; the
        cut-short delivery of a job running under this consumer is not counted. Returns how
        many jobs were handed back."""
        state = await self._state()
        mine = [(e, j) for e, j in state.own_pending(consumer) if e not in keep]
        return state.hand_back(consumer, mine)

    async def heartbeat(
        self, worker_id: str, info: dict[str, str | int | float], ttl: float
    ) -> None:
        """Record that a worker is alive, with its description; expires after ``ttl``; take
        an arrival sample."""
        state = await self._state()
        state.drop_expired_workers()
        text = {k: v if isinstance(v, str) else repr(v) for k, v in info.items()}
        if state.worker_alive(worker_id):
            text = {**state.workers[worker_id].info, **text}
        state.workers[worker_id] = Heartbeat(text, now_ms(), time.monotonic() + ttl)
        state.sample_arrivals()

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a stopping worker's heartbeat, and its consumer if it holds no entries."""
        state = await self._state()
        state.workers.pop(worker_id, None)
        state.forget_consumers([worker_id])

    async def forget_dead_consumers(self, min_idle: float) -> int:
        """Remove the consumers of workers that are gone (heartbeat expired), idle for
        ``min_idle`` seconds or more and holding no entries (``forget_consumers.lua``).
        Returns how many were removed."""
        state = await self._state()
        now = time.monotonic()
        idle = [name for name, seen in state.consumers.items() if now - seen >= min_idle]
        return state.forget_consumers(idle)

    async def promote_due(self, limit: int, *, early: bool = False) -> float | None:
        """Move up to ``limit`` due delayed jobs (``early``: the earliest ``limit`` delayed
        jobs, due or not) to the ready queue (``promote.lua``); returns the seconds until
        the next delayed job is due, or None if none is left."""
        state = await self._state()
        now = now_ms()
        for job_id in state.delayed.pop_due(END_OF_TIME_MS if early else now, limit):
            job = state.job(job_id)
            if job is not None and job.status in ("scheduled", "retrying"):
                job.status = "queued"
                job.entry = state.add_entry(job_id)
        head = state.delayed.head()
        return None if head is None else max(head[1] - now, 0) / 1000

    # -- looking at jobs -------------------------------------------------------------------

    async def claim_partitions(self, queue: str, wanted: int) -> int:
        """How many partitions queue ``queue`` has on record; with none on record yet,
        record ``wanted`` (unless it is more than 1 and the queue holds jobs as one
        partition): a process that gives another number later is refused."""
        self._store.bind()
        store = self._store
        if queue in store.partitions:
            return store.partitions[queue]
        if wanted > 1 and queue in store.queues and store.queues[queue].jobs:
            return 1
        store.partitions[queue] = wanted
        return wanted

    async def record(self, job_id: str) -> JobRecord | None:
        """Everything stored about one job, or None."""
        job = (await self._state()).job(job_id)
        return None if job is None else job.to_record(job_id)

    async def wait_final(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """Wait until the job is final (or gone) and return its record; raises TimeoutError
        after ``timeout`` seconds. Sleeps until the step that ends the job wakes it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            state = await self._state()
            job = state.job(job_id)
            if job is None or job.status in FINAL:
                return None if job is None else job.to_record(job_id)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {job_id!r} did not finish within {timeout:g}s")
            waiters = state.final_waiters.setdefault(job_id, Waiters())
            try:
                await waiters.wait(remaining)
            finally:
                if not waiters and state.final_waiters.get(job_id) is waiters:
                    del state.final_waiters[job_id]

    async def abort(self, job_id: str) -> str:
        """Abort a queued, delayed, waiting or running job (``abort.lua``); returns the status
        it had (``not_found`` if none). Listeners are told to cancel a running one; its
        dependants get its outcome (aborted) in the same step."""
        (found,) = await self.abort_many([job_id])
        return found

    async def abort_many(self, job_ids: Sequence[str]) -> list[str]:
        """Abort jobs, one after another as ``abort.lua`` does each (one events entry
        each); returns the status each had."""
        state = await self._state()
        return [self._abort(state, job_id) for job_id in job_ids]

    def _abort(self, state: QueueState, job_id: str) -> str:
        job = state.job(job_id)
        if job is None:
            return "not_found"
        status = job.status
        if status in FINAL:
            return status
        if status in ("scheduled", "retrying"):
            state.delayed.discard(job_id)
        elif status == "queued" and job.entry:
            state.drop_entry(job.entry)
        ctx = FlowContext(now_ms(), self.result_ttl)
        job.status = "aborted"
        job.finished_ms = ctx.now
        state.expire(job_id, job, self.result_ttl)
        if status == "running":
            state.publish_abort(job_id)
        state.finalized(job_id)
        ctx.event(job_id, "aborted", status)
        if job.next:
            ctx.work.append(job_id)
            state.flow_drain(ctx)
        state.events.add(self.events_max_len, ctx.events)
        return status

    async def events_tail(self) -> str:
        """The cursor after the newest event kept (``0-0/*`` when none is)."""
        newest = (await self._state()).events.newest()
        return "0-0/*" if newest is None else f"{newest.entry_id}/*"

    async def events(self, after: str, count: int, block: float | None) -> list[StoredEvent]:
        """Events after cursor ``after`` (``<entry id>/<index>``: the rest of that entry
        first; ``<entry id>/*``: from the next entry; ``0-0/*``: from the oldest kept), from
        up to ``count`` entries. With none, waits up to ``block`` seconds for a new entry
        (None: returns at once). Raises ValueError for a malformed cursor."""
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        key, index = parse_cursor(after)
        state = await self._state()
        if index is not None:
            entry = state.events.find(key)
            found = [] if entry is None else entry.stored(index + 1)
            if found:
                return found
        loop = asyncio.get_running_loop()
        # As the Redis broker's XREAD: BLOCK is at least 1 ms (0 would wait forever).
        deadline = None if block is None else loop.time() + max(block, 0.001)
        while True:
            entries = state.events.after(key, count if count > 0 else len(state.events))
            if entries or deadline is None:
                return [event for entry in entries for event in entry.stored()]
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            await state.events.waiters.wait(remaining)
            state = await self._state()

    async def dependants(self, job_id: str) -> list[str]:
        """The ids of the jobs that wait (or waited) on this one, in the order they were
        wired (its ``next`` field)."""
        job = (await self._state()).job(job_id)
        return [] if job is None or job.next is None else [wid for wid, _, _ in job.next]

    async def statuses(self, job_ids: Sequence[str]) -> list[str | None]:
        """The status of each job (None: no such job), in one step."""
        state = await self._state()
        jobs = [state.job(job_id) for job_id in job_ids]
        return [None if job is None else job.status for job in jobs]

    async def pause(self, paused: bool) -> bool:
        """Set or remove the paused flag (a second pause keeps the first one's time);
        resuming wakes blocked fetches."""
        state = await self._state()
        was = state.paused_ms is not None
        if paused and not was:
            state.paused_ms = now_ms()
        elif not paused:
            state.paused_ms = None
            state.ready_waiters.wake_all()
        return was

    async def paused_since(self) -> int | None:
        """When the queue was paused (ms), None while it runs."""
        return (await self._state()).paused_ms

    async def counts(self) -> QueueCounts:
        """Ready, pending (delivered, unsettled), delayed and dead job counts."""
        state = await self._state()
        return QueueCounts(
            ready=len(state.ready),
            pending=len(state.pending),
            delayed=len(state.delayed),
            dead=len(state.dead),
        )

    async def waiting(self, limit: int) -> list[JobRecord]:
        """Jobs not fetched yet: ready in order, then delayed by due time (XRANGE + ZRANGE)."""
        if limit <= 0:
            return []
        state = await self._state()
        ids = state.ready.job_ids()[:limit] + state.delayed.ordered()[:limit]
        records = [state.job(job_id) for job_id in ids]
        return [job.to_record(job_id) for job_id, job in zip(ids, records, strict=True) if job]

    async def lag_ms(self) -> int | None:
        """Age in ms of the oldest job no worker has fetched yet (None when none waits)."""
        state = await self._state()
        oldest = state.ready.oldest()
        if oldest is None:
            return None
        return max(now_ms() - int(oldest.split("-")[0]), 0)

    async def workers(self) -> list[dict[str, str]]:
        """Live workers (heartbeat not expired) with their description, oldest beat first.
        Read-only."""
        state = await self._state()
        alive = [w for w in state.workers if state.worker_alive(w)]
        alive.sort(key=lambda w: (state.workers[w].beat_ms, w))
        return [{"id": w, **state.workers[w].info} for w in alive]

    async def purge_queue(self) -> int:
        """Delete everything stored for the queue; returns how many job records and other
        non-empty structures (ready queue, delayed, dead, cron state, heartbeats, events)
        went."""
        state = await self._state()
        state.drop_expired_workers()
        structures = (
            bool(state.ready or state.pending),
            bool(state.delayed),
            bool(state.dead),
            bool(state.cron),
            bool(state.cron_runs),
            bool(state.cron_claims),
            bool(state.workers),
            bool(state.events),
            bool(state.arrivals),
        )
        gone = len(state.jobs) + len(state.workers) + sum(structures)
        gone += len(state.keyed) + len(state.memos)
        # Limit state and the paused flag, one key each in Redis.
        gone += len(state.rates) + sum(1 for w in state.rate_waiters.values() if w)
        gone += sum(1 for s in state.slots.values() if s)
        gone += sum(1 for w in state.slot_waiters.values() if w)
        gone += state.paused_ms is not None
        job_ids = list(state.jobs)
        state.jobs.clear()
        state.ready.clear()
        state.pending.clear()
        state.delayed = ScoredSet()
        state.dead = ScoredSet()
        state.cron.clear()
        state.cron_runs.clear()
        state.cron_claims.clear()
        state.workers.clear()
        state.consumers.clear()
        state.events.clear()
        state.keyed.clear()
        state.memos.clear()
        state.rates.clear()
        state.rate_waiters.clear()
        state.slots.clear()
        state.slot_waiters.clear()
        state.paused_ms = None
        # Deleting the stream starts its entries-added counter again.
        state.entries_added = 0
        state.arrivals.clear()
        for job_id in job_ids:
            state.finalized(job_id)
        return gone

    # -- arrivals --------------------------------------------------------------------------

    async def arrivals(self) -> list[ArrivalSample]:
        """The arrival samples heartbeats took (XRANGE of the arrivals stream)."""
        return list((await self._state()).arrivals)

    # -- cron ------------------------------------------------------------------------------

    async def claim_tick(
        self, name: str, fire_ms: int, job: NewJob, unique: bool, lease_ms: int
    ) -> CronClaim:
        """Claim one cron tick and enqueue its run in the same step (``cron_claim.lua``).

        EARLY while ``fire_ms`` is later than the broker's clock (nothing written); TAKEN
        when this tick or a later one was claimed by another broker; OVERLAP when claimed
        but the run skipped, because ``unique`` and the previous run is queued, delayed, or
        running with its entry pending and idle for less than ``lease_ms``; else CLAIMED.
        The same call repeated by this broker answers the same and writes nothing more.
        """
        state = await self._state()
        claimer: object = getattr(self, "_cron_claimer", None)
        if claimer is None:
            claimer = self._cron_claimer = object()
        current = state.cron.get(name)
        if current is not None and current >= fire_ms:
            last_claim = state.cron_claims.get(name)
            if current == fire_ms and last_claim is not None:
                at, by, answer = last_claim
                if at == fire_ms and by is claimer:
                    return answer
            return CronClaim.TAKEN
        now = now_ms()
        if fire_ms > now:
            return CronClaim.EARLY
        state.cron[name] = fire_ms
        last = state.cron_runs.get(name)
        if unique and last is not None and last != job.job_id:
            previous = state.job(last)
            status = None if previous is None else previous.status
            unfinished = status in ("queued", "retrying", "scheduled")
            if previous is not None and status == "running":
                row = state.pending.get(previous.entry)
                idle_ms = None if row is None else (time.monotonic() - row.delivered_at) * 1000
                unfinished = idle_ms is not None and idle_ms < lease_ms
            if unfinished:
                state.cron_claims[name] = (fire_ms, claimer, CronClaim.OVERLAP)
                return CronClaim.OVERLAP
        if state.job(job.job_id) is None:
            stored = StoredJob(job.envelope, "queued", now, priority=job.priority)
            state.jobs[job.job_id] = stored
            stored.entry = state.add_entry(job.job_id)
            state.events.add(self.events_max_len, [(job.job_id, "enqueued", "queued")])
        state.cron_runs[name] = job.job_id
        state.cron_claims[name] = (fire_ms, claimer, CronClaim.CLAIMED)
        return CronClaim.CLAIMED

    async def cron_runs(self, names: Sequence[str]) -> dict[str, CronRun]:
        """The last claimed tick and the record of its run, per cron job name."""
        state = await self._state()
        runs: dict[str, CronRun] = {}
        for name in names:
            job_id = state.cron_runs.get(name)
            job = None if job_id is None else state.job(job_id)
            record = None if job is None or job_id is None else job.to_record(job_id)
            runs[name] = CronRun(state.cron.get(name), job_id, record)
        return runs

    # -- dead letters ----------------------------------------------------------------------

    async def dead(self, offset: int, limit: int) -> list[JobRecord]:
        """Dead-lettered jobs, most recent first."""
        state = await self._state()
        newest_first = state.dead.ordered()[::-1][max(offset, 0) : max(offset, 0) + limit]
        records: list[JobRecord] = []
        for job_id in newest_first:
            job = state.job(job_id)
            if job is not None:
                records.append(job.to_record(job_id))
        return records

    async def dead_ids(self) -> list[str]:
        """Every dead-lettered job id, oldest first."""
        return (await self._state()).dead.ordered()

    async def requeue_dead(self, job_ids: Sequence[str]) -> int:
        """Put dead jobs back in the ready queue from attempt 1 (``requeue.lua``, one step
        and events entry per :data:`CHUNK` ids); ids that are not dead, or name no job to
        run, are ignored. Returns how many were requeued."""
        state = await self._state()
        now = now_ms()
        requeued = 0
        job_ids = list(dict.fromkeys(job_ids))  # an id named twice is one job
        for start in range(0, len(job_ids), CHUNK):
            ctx = FlowContext(now, self.result_ttl)
            for job_id in job_ids[start : start + CHUNK]:
                job = state.job(job_id)
                # A dead letter without a job to run (a foreign entry's) stays listed.
                if job is None or job.envelope is None or job_id not in state.dead:
                    continue
                state.dead.discard(job_id)
                job.status = "queued"
                job.attempt = 1
                job.deliveries = 0
                job.enqueued_ms = now
                job.finished_ms = job.run_at_ms = job.started_ms = None
                job.worker = ""
                job.entry = state.add_entry(job_id)
                ctx.event(job_id, "enqueued", "queued")
                requeued += 1
            state.events.add(self.events_max_len, ctx.events)
        return requeued

    async def purge_dead(self, job_ids: Sequence[str]) -> int:
        """Delete dead jobs and their records; ids that are not dead are left alone. Returns
        how many were deleted."""
        state = await self._state()
        purged = 0
        for job_id in job_ids:
            if state.dead.discard(job_id):
                state.jobs.pop(job_id, None)
                purged += 1
        return purged
