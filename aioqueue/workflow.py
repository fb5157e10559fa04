"""Workflows: groups (fan-out), fan-in callbacks, chains and dependencies.

A workflow is written in one atomic step: every job of it, each one that must wait stored
``waiting`` with the edges it waits on. Nothing holds a worker slot while it waits and
nothing polls: the script that records a job's final outcome hands that outcome to the jobs
waiting on it in the same step, and releases those with nothing left to wait for. A group is
a node of its own that never runs: it completes with its members' results, in member order,
once every member has ended. See docs/workflows.md.

::

    g = await group(send.prepare(to) for to in recipients).enqueue()
    summary = await group(send.prepare(to) for to in recipients).then(report).enqueue()
    total = await fetch.prepare(url).then(parse).then(store, "table").enqueue()
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    TypeAlias,
    TypeVar,
    Union,
    overload,
)

import msgspec

from aioqueue.brokers.base import FlowNode, NewJob
from aioqueue.errors import ConfigurationError, JobNotFound
from aioqueue.job import Job, JobStatus
from aioqueue.queue import new_job_id
from aioqueue.serialization import Envelope, MemberFailure, Signer, decode_envelope, encode
from aioqueue.task import JobOptions, JobRequest, Task

if TYPE_CHECKING:
    from aioqueue.queue import Queue

__all__ = [
    "GROUP_TASK",
    "Chain",
    "Group",
    "GroupJob",
    "GroupStatus",
    "MemberFailure",
    "Partial",
    "chain",
    "group",
]

A = TypeVar("A")
R = TypeVar("R")
R2 = TypeVar("R2")
P2 = ParamSpec("P2")

GROUP_TASK = "aioqueue.group"
# Sets and dicts in a fixed order: the same workflow has the same digest in every process.
_DETERMINISTIC = msgspec.msgpack.Encoder(order="deterministic")
"""The task name in a group node's envelope; a group node never runs."""

_POLICIES = {"fail": "wait", "pass": "pass"}
MAX_DEPTH = 100
"""How deeply groups and chains may nest in one workflow."""
MAX_GROUP_ID = 180
"""Longest group id: the jobs of a named group's workflow get ids ``<group id>:<n>``."""


class Partial(Generic[A, R]):
    """A prepared job whose first argument (of type ``A``) is fed at run time by the step
    before it; made by :meth:`Task.partial`."""

    __slots__ = ("request",)

    def __init__(self, request: JobRequest[R]) -> None:
        self.request = request

    def __repr__(self) -> str:
        return f"Partial({self.request.task!r})"


Step: TypeAlias = "JobRequest[Any] | Partial[Any, Any] | Group[Any] | Chain[Any]"


class Group(Generic[R]):
    """Jobs that run in parallel and whose results are gathered in order; made by
    :func:`group`."""

    __slots__ = ("group_id", "members", "on_failure")

    def __init__(
        self,
        members: Sequence[JobRequest[Any] | Partial[Any, Any] | Chain[Any]],
        on_failure: Literal["fail", "pass"],
        group_id: str | None,
    ) -> None:
        self.members = tuple(members)
        self.on_failure = on_failure
        self.group_id = group_id
        for member in self.members:
            if isinstance(member, Group):
                raise ConfigurationError("a group cannot hold a group: list its members instead")
            if not isinstance(member, JobRequest | Partial | Chain):
                raise ConfigurationError(
                    f"a group holds task.prepare(...), task.partial(...) or chains, not "
                    f"{type(member).__name__}"
                )

    def __repr__(self) -> str:
        return f"Group({len(self.members)} members)"

    def __len__(self) -> int:
        return len(self.members)

    @overload
    def then(
        self,
        step: Task[Concatenate[list[R], P2], R2],
        /,
        *args: P2.args,
        **kwargs: P2.kwargs,
    ) -> Chain[R2]: ...

    @overload
    def then(self, step: Partial[list[R], R2], /) -> Chain[R2]: ...

    def then(self, step: Any, /, *args: Any, **kwargs: Any) -> Chain[Any]:
        """A fan-in callback: once every member has ended, run ``step`` with the list of
        their results (in member order) as its first argument. It is enqueued exactly once,
        by the step that records the last member's outcome; no worker waits meanwhile."""
        return Chain((self,)).then(step, *args, **kwargs)

    async def enqueue(self) -> GroupJob[R]:
        """Enqueue every member at once (all or none) and return the group's handle."""
        queue = _queue_of(self)
        plan = _Plan(queue, self)
        group_id = plan.add(self, None)
        await plan.write()
        return plan.group_job(group_id)


class Chain(Generic[R]):
    """Steps that run one after another, each fed the previous one's result; made by
    :meth:`JobRequest.then`, :meth:`Group.then` or :func:`chain`."""

    __slots__ = ("steps",)

    def __init__(self, steps: tuple[Step, ...]) -> None:
        if not steps:
            raise ConfigurationError("a chain needs at least one step")
        self.steps = steps

    def __repr__(self) -> str:
        return f"Chain({len(self.steps)} steps)"

    @overload
    def then(
        self, step: Task[Concatenate[R, P2], R2], /, *args: P2.args, **kwargs: P2.kwargs
    ) -> Chain[R2]: ...

    @overload
    def then(self, step: Partial[R, R2], /) -> Chain[R2]: ...

    @overload
    def then(self, step: Group[R2], /) -> Chain[list[R2]]: ...

    def then(self, step: Any, /, *args: Any, **kwargs: Any) -> Chain[Any]:
        """Run ``step`` once the chain so far has completed, fed its result: a task (with
        the arguments that follow the fed one), a :class:`Partial`, or a group of partials
        (each member fed the same result)."""
        if isinstance(step, Task):
            step = step.partial(*args, **kwargs)
        elif args or kwargs:
            raise ConfigurationError("arguments go with a task: then(task, *args)")
        if not isinstance(step, Partial | Group):
            raise ConfigurationError(
                f"a chain step after the first is a task, task.partial(...) or a group, "
                f"not {type(step).__name__}"
            )
        return Chain((*self.steps, step))

    async def enqueue(self) -> Job[R]:
        """Enqueue the whole chain at once and return the handle of its last step."""
        queue = _queue_of(self)
        plan = _Plan(queue, self)
        last = plan.add(self, None)
        await plan.write()
        return queue.job(last, plan.result_task(last))


@overload
def group(
    members: Iterable[JobRequest[R] | Partial[Any, R] | Chain[R]],
    *,
    on_failure: Literal["fail"] = "fail",
    group_id: str | None = None,
) -> Group[R]: ...


@overload
def group(
    members: Iterable[JobRequest[R] | Partial[Any, R] | Chain[R]],
    *,
    on_failure: Literal["pass"],
    group_id: str | None = None,
) -> Group[R | MemberFailure]: ...


def group(
    members: Iterable[JobRequest[Any] | Partial[Any, Any] | Chain[Any]],
    *,
    on_failure: Literal["fail", "pass"] = "fail",
    group_id: str | None = None,
) -> Group[Any]:
    """Fan out: jobs (``task.prepare(...)``), chains, or, inside a chain,
    ``task.partial(...)`` steps, that run in parallel; their results are gathered in order.

    ``on_failure`` says what a member that does not complete (failed, dead, aborted) does
    to the group once every member has ended: ``"fail"`` fails it (and its callback) with
    the members' errors; ``"pass"`` completes it with a :class:`MemberFailure` in that
    member's place. ``group_id`` names the group and makes the whole workflow it is in
    idempotent, like a ``job_id``: its jobs get ids ``<group_id>:<n>`` (where no
    ``job_id`` was given), so enqueueing the same workflow again writes nothing and returns
    the same handles.
    """
    if on_failure not in _POLICIES:
        raise ConfigurationError('on_failure must be "fail" or "pass"')
    if group_id is not None and not isinstance(group_id, str):
        raise ConfigurationError(f"group_id must be a string, not {type(group_id).__name__}")
    if group_id is not None:
        JobOptions(job_id=group_id)  # the same rules as a job id
        if len(group_id) > MAX_GROUP_ID:
            raise ConfigurationError(f"group_id: at most {MAX_GROUP_ID} characters")
    return Group(list(members), on_failure, group_id)


def chain(first: JobRequest[Any] | Group[Any], *rest: Any) -> Chain[Any]:
    """Steps that run one after another, each fed the previous one's result as its first
    argument: ``chain(a.prepare(1), b, c.partial("x"), group([...]))``. For typed chains
    write ``a.prepare(1).then(b).then(c, "x")``."""
    if not isinstance(first, JobRequest | Group):
        raise ConfigurationError(
            f"a chain starts with task.prepare(...) or a group, not {type(first).__name__}"
        )
    built: Chain[Any] = Chain((first,))
    for step in rest:
        built = built.then(step)
    return built


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """Where a group is: its own status and how many members are in each status."""

    status: JobStatus
    """``waiting`` until every member has ended, then ``complete`` or ``failed``."""
    counts: dict[JobStatus, int]
    total: int

    @property
    def done(self) -> int:
        """Members that have ended."""
        return sum(n for status, n in self.counts.items() if status.is_final)


class GroupJob(Generic[R]):
    """A handle on an enqueued group: ``await g.results()``, ``await g.status()``."""

    __slots__ = ("_queue", "_result_type", "extra_ids", "id", "member_ids")

    def __init__(
        self,
        queue: Queue,
        group_id: str,
        member_ids: Sequence[str],
        result_type: Any = Any,
        extra_ids: Sequence[str] = (),
    ) -> None:
        self.id = group_id
        self.member_ids = list(member_ids)
        self.extra_ids = list(extra_ids)
        """Jobs inside the group that are not its members' last steps (chain steps)."""
        self._queue = queue
        self._result_type = result_type

    def __repr__(self) -> str:
        return f"GroupJob(id={self.id!r}, members={len(self.member_ids)})"

    @property
    def queue_name(self) -> str:
        """The name of the queue the group is on."""
        return self._queue.name

    @property
    def job(self) -> Job[list[R]]:
        """The group's own node, a job that never runs and completes with the results."""
        return Job(self._queue, self.id, list.__class_getitem__(self._result_type))

    @property
    def members(self) -> list[Job[R]]:
        """Handles on the members, in order (for a chain member: its last step)."""
        return [Job(self._queue, job_id, self._result_type) for job_id in self.member_ids]

    async def status(self) -> GroupStatus:
        """The group's status and its members' counts per status (one round trip)."""
        broker = await self._queue.connected_broker()
        statuses = await broker.statuses([self.id, *self.member_ids])
        counts: dict[JobStatus, int] = {}
        for value in statuses[1:]:
            status = _status(value)
            counts[status] = counts.get(status, 0) + 1
        return GroupStatus(_status(statuses[0]), counts, len(self.member_ids))

    async def results(self, timeout: float | None = None) -> list[R]:
        """Wait for every member to end and return their results in member order.

        Raises :class:`~aioqueue.JobFailed` (``GroupFailed``, naming the members that did
        not complete) when the group failed; a group made with ``on_failure="pass"`` holds
        a :class:`MemberFailure` in their place instead.
        """
        return await self.job.result(timeout)

    async def abort(self) -> int:
        """Abort the group: every job in it that has not ended (chain steps included) is
        aborted, and so are the jobs waiting on the group (its callback) that have not
        started. Returns how many members were aborted."""
        broker = await self._queue.connected_broker()
        waiting_on_it = await broker.dependants(self.id)
        await broker.abort_many([self.id])
        found = await broker.abort_many([*self.member_ids, *self.extra_ids])
        statuses = await broker.statuses(waiting_on_it)
        pending = {"waiting", "queued", "scheduled", "retrying"}
        await broker.abort_many(
            [j for j, s in zip(waiting_on_it, statuses, strict=True) if s in pending]
        )
        members = found[: len(self.member_ids)]
        return sum(1 for status in members if not _status(status).is_final)


def _status(value: str | None) -> JobStatus:
    try:
        return JobStatus(value) if value else JobStatus.NOT_FOUND
    except ValueError:
        return JobStatus.NOT_FOUND


def with_failures(result_type: Any) -> Any:
    """``result_type | MemberFailure`` where msgspec can tell the two apart (not, for
    instance, for another untagged Struct), else ``Any``."""
    if result_type is Any:
        return Any
    candidate = Union[result_type, MemberFailure]  # noqa: UP007 (a runtime type)
    try:
        msgspec.msgpack.Decoder(candidate)
    except TypeError:
        return Any
    return candidate


async def open_group(
    queue: Queue, group_id: str, task: Task[Any, Any] | None = None
) -> GroupJob[Any]:
    """The handle of an existing group, from its id (its members are listed in its
    record), its results typed by ``task``'s return type (with :class:`MemberFailure`
    where a member did not complete); raises :class:`JobNotFound` when there is none."""
    record = await (await queue.connected_broker()).record(group_id)
    if record is None or not record.envelope:
        raise JobNotFound(group_id)
    envelope = decode_envelope(Signer().open(group_id, record.envelope))
    if envelope.task != GROUP_TASK or not envelope.args:
        raise ConfigurationError(f"job {group_id!r} is not a group (its task is {envelope.task!r})")
    result_type = Any if task is None else with_failures(task.signature.return_type)
    member_ids = msgspec.convert(envelope.args[0], list[str])
    extra_ids = msgspec.convert(envelope.args[1], list[str]) if len(envelope.args) > 1 else []
    return GroupJob(queue, group_id, member_ids, result_type, extra_ids)


def _queue_of(step: Step) -> Queue:
    """The queue a workflow goes to: its first job's task's."""
    while not isinstance(step, JobRequest):
        if isinstance(step, Partial):
            step = step.request
        elif isinstance(step, Chain):
            step = step.steps[0]
        elif step.members:
            step = step.members[0]
        else:
            raise ConfigurationError("an empty group has no queue: use queue.enqueue_flow")
    if step.queue is None:
        raise ConfigurationError(
            "jobs prepared by name have no queue: use queue.enqueue_flow(workflow)"
        )
    return step.queue


@dataclass(slots=True)
class _Node:
    job_id: str
    request: JobRequest[Any] | None
    kind: str
    policy: str
    feed: bool
    deps: list[tuple[str, int]]


def refuse_cycles(deps: dict[str, list[str]]) -> None:
    """Raise :class:`ConfigurationError` when jobs of one batch wait on each other in a
    circle (they would wait forever); ``deps`` maps each job to the jobs it waits on."""
    done: set[str] = set()
    for root in deps:
        if root in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            job_id, index = stack.pop()
            if index == 0:
                if job_id in on_path:
                    loop = [*path[path.index(job_id) :], job_id]
                    raise ConfigurationError(f"dependency cycle: {' -> '.join(loop)}")
                if job_id in done or job_id not in deps:
                    continue
                path.append(job_id)
                on_path.add(job_id)
            children = deps[job_id]
            if index < len(children):
                stack.append((job_id, index + 1))
                stack.append((children[index], 0))
            else:
                path.pop()
                on_path.discard(job_id)
                done.add(job_id)


def _first_group_id(step: Step, depth: int = 0) -> str | None:
    """The id of the first named group in a workflow, depth first."""
    if depth > MAX_DEPTH:
        raise ConfigurationError(f"a workflow nests at most {MAX_DEPTH} groups and chains")
    if isinstance(step, Group):
        if step.group_id is not None:
            return step.group_id
        members: tuple[Any, ...] = step.members
    elif isinstance(step, Chain):
        members = step.steps
    else:
        return None
    for member in members:
        found = _first_group_id(member, depth + 1)
        if found is not None:
            return found
    return None


class _Plan:
    """A workflow compiled into jobs and edges, written in one enqueue call.

    In a workflow that holds a named group, jobs without a ``job_id`` are named after it
    (``<group id>:<n>``, in the order they are compiled), which makes enqueueing the same
    workflow twice write it once."""

    def __init__(self, queue: Queue, workflow: Step) -> None:
        self.queue = queue
        self.nodes: dict[str, _Node] = {}
        self.members: dict[str, list[str]] = {}
        self.extras: dict[str, list[str]] = {}
        self.prefix = _first_group_id(workflow)
        self.count = 0
        self.named: set[str] = set()

    def _id(self, given: str | None) -> str:
        if given is not None:
            return given
        if self.prefix is None:
            return new_job_id()
        self.count += 1
        return f"{self.prefix}:{self.count}"

    def _new(self, node: _Node) -> str:
        if node.job_id in self.nodes:
            raise ConfigurationError(f"job id {node.job_id!r} appears twice in one workflow")
        self.nodes[node.job_id] = node
        return node.job_id

    def _job(self, request: JobRequest[Any], fed: str | None) -> str:
        options = request.options
        deps = [(fed, 1)] if fed is not None else []
        if options.depends_on:
            first = len(deps) + 1
            deps += [(d, slot) for slot, d in enumerate(options.depends_on, first)]
        policy = "any" if options.on_dependency_failure == "run" else "fast"
        if fed is not None and policy == "any":
            raise ConfigurationError(
                f"{request.task}: a step fed the previous result cannot run without it "
                '(on_dependency_failure="run")'
            )
        job_id = self._id(options.job_id)
        if job_id in self.nodes:
            raise ConfigurationError(f"job id {job_id!r} appears twice in one workflow")
        self.nodes[job_id] = _Node(job_id, request, "job", policy, fed is not None, deps)
        return job_id

    def add(self, step: Step, fed: str | None, depth: int = 0) -> str:
        """Add a step fed by job ``fed`` (None: fed nothing); returns the id of the job
        whose result is the step's result."""
        if depth > MAX_DEPTH:
            raise ConfigurationError(f"a workflow nests at most {MAX_DEPTH} groups and chains")
        if isinstance(step, JobRequest):
            if fed is not None:
                raise ConfigurationError(
                    f"a step after the first is fed the previous result: write "
                    f"then({step.task}) or task.partial(...), not task.prepare(...)"
                )
            return self._job(step, None)
        if isinstance(step, Partial):
            if fed is None:
                raise ConfigurationError(
                    f"{step.request.task}.partial(...) needs a step before it to feed it"
                )
            return self._job(step.request, fed)
        if isinstance(step, Chain):
            out = fed
            for item in step.steps:
                out = self.add(item, out, depth + 1)
            assert out is not None
            return out
        if not isinstance(step, Group):
            raise ConfigurationError(
                f"a workflow is made of task.prepare(...), task.partial(...), groups and "
                f"chains, not {type(step).__name__}"
            )
        first = len(self.nodes)
        ids = [self.add(member, fed, depth + 1) for member in step.members]
        if step.group_id is not None:
            self.named.add(step.group_id)
        deps = [(member_id, slot) for slot, member_id in enumerate(ids, 1)]
        if fed is not None:
            # The gate (slot 0): a group inside a chain waits for the step before it, and
            # fails at once when that step did not complete, even with no members.
            deps.append((fed, 0))
        node = _Node(
            self._id(step.group_id), None, "group", _POLICIES[step.on_failure], False, deps
        )
        self.members[node.job_id] = ids
        inner = set(ids)
        self.extras[node.job_id] = [j for j in list(self.nodes)[first:] if j not in inner]
        return self._new(node)

    def _listed(self, group_id: str) -> tuple[list[str], ...]:
        """What a group node's envelope lists: its members, and the other jobs inside it."""
        extras = self.extras.get(group_id)
        return (self.members[group_id], extras) if extras else (self.members[group_id],)

    def result_task(self, job_id: str) -> Task[Any, Any] | None:
        """The task whose result job ``job_id`` holds (None: a group, or unknown)."""
        request = self.nodes[job_id].request
        return None if request is None else self.queue.tasks.get(request.task)

    def group_job(self, group_id: str) -> GroupJob[Any]:
        """The handle of group ``group_id``, typed when its members share a task."""
        member_ids = self.members[group_id]
        kinds = {self.result_task(m) for m in member_ids}
        task = kinds.pop() if len(kinds) == 1 else None
        result_type = Any if task is None else task.signature.return_type
        if self.nodes[group_id].policy == "pass":
            result_type = with_failures(result_type)
        extras = self.extras.get(group_id, [])
        return GroupJob(self.queue, group_id, member_ids, result_type, extras)

    def shape(self) -> str:
        """A digest of the whole workflow (its jobs, arguments and edges, not when it was
        enqueued): a named group stores it, so the same name for another workflow is
        refused instead of silently answered with the old one."""
        parts = [
            (
                job_id,
                node.kind,
                node.policy,
                node.feed,
                node.deps,
                None
                if node.request is None
                else (node.request.task, node.request.args, node.request.kwargs),
            )
            for job_id, node in self.nodes.items()
        ]
        return hashlib.sha256(_DETERMINISTIC.encode(parts)).hexdigest()[:32]

    async def write(self) -> None:
        """Enqueue every job of the plan in one atomic call."""
        queue = self.queue
        now_ms = int(time.time() * 1000)
        trace = queue.trace_carrier()
        nodes = self.nodes
        refuse_cycles({job_id: [d for d, _ in node.deps] for job_id, node in nodes.items()})
        following: dict[str, list[tuple[str, int]]] = {}
        for node in nodes.values():
            for dependency, slot in node.deps:
                following.setdefault(dependency, []).append((node.job_id, slot))
        shape = self.shape() if self.named else ""
        jobs: list[NewJob] = []
        for job_id, node in nodes.items():
            deps = node.deps
            flow = FlowNode(
                node.kind,
                node.policy,
                node.feed,
                len(deps),
                tuple(following.get(job_id, ())),
                tuple(dep for dep in deps if dep[0] not in nodes) if deps else (),
                len(self.members[job_id]) if node.kind == "group" else None,
                shape if job_id in self.named else "",
            )
            if node.request is None:
                envelope = encode(
                    Envelope(GROUP_TASK, self._listed(job_id), {}, now_ms, trace=trace)
                )
                sealed = queue.signer.seal(node.job_id, envelope)
                jobs.append(NewJob(node.job_id, sealed, 0, 0, flow))
            else:
                jobs.append(
                    queue.new_job(node.request, node.job_id, now_ms, trace, flow, fed=node.feed)
                )
        broker = await queue.connected_broker()
        await broker.enqueue(jobs, queue.settings.max_size)
