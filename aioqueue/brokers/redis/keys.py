"""Every Redis key and channel name aioqueue uses, built in one place.

All of a queue's keys share the hash tag ``{name}`` so a queue lives in one Redis Cluster slot
and every Lua script can touch all of them atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROUP = "aioqueue"
"""The consumer group every worker of a queue reads the stream through."""


@dataclass(frozen=True, slots=True)
class Keys:
    """The key names of one queue."""

    queue: str
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", f"aioqueue:{{{self.queue}}}")

    @property
    def stream(self) -> str:
        """Stream of ready jobs, read through the consumer group; entry = ``{"j": job_id}``."""
        return f"{self.prefix}:stream"

    def lane(self, priority: int | str) -> str:
        """Stream of ready jobs of one priority (docs/flow-control.md#priorities): the
        queue's stream itself for 0, ``<stream>:<priority>`` for the others."""
        return self.stream if str(priority) == "0" else f"{self.stream}:{priority}"

    @property
    def lanes(self) -> str:
        """Set of the priorities besides 0 that jobs were enqueued with (the lanes workers
        read)."""
        return f"{self.stream}:lanes"

    @property
    def wake(self) -> str:
        """Stream (same group) whose entries wake a blocked worker when a job is written to
        a priority lane the queue never had (the worker's read names only lanes it knew)."""
        return f"{self.stream}:wake"

    @property
    def paused(self) -> str:
        """Present while the queue is paused (value: when, in ms): workers start nothing
        new from it."""
        return f"{self.prefix}:paused"

    @property
    def delayed(self) -> str:
        """Sorted set of delayed jobs and retry backoffs, scored by run-at time in ms."""
        return f"{self.prefix}:delayed"

    @property
    def dead(self) -> str:
        """Sorted set of dead-lettered job ids, scored by the time they died in ms."""
        return f"{self.prefix}:dead"

    @property
    def events(self) -> str:
        """Capped stream of job events; each entry holds the events of one script call
        (field ``e``: msgpack array of ``[job id, event, details...]``)."""
        return f"{self.prefix}:events"

    @property
    def cron(self) -> str:
        """Sorted set: cron job name -> last claimed fire time in ms."""
        return f"{self.prefix}:cron"

    @property
    def cron_runs(self) -> str:
        """Hash: cron job name -> job id of its last run."""
        return f"{self.prefix}:cron-runs"

    @property
    def cron_claims(self) -> str:
        """Hash: cron job name -> ``'<fire ms> <answer> <claimer>'`` of its last claim, which
        lets ``cron_claim.lua`` answer a re-sent call as it answered the first one."""
        return f"{self.prefix}:cron-claims"

    @property
    def partitions(self) -> str:
        """How many partitions the queue has, once a process gave it more than one (see
        ``partitions.lua``)."""
        return f"{self.prefix}:partitions"

    @property
    def workers(self) -> str:
        """Sorted set: worker id -> last heartbeat in ms."""
        return f"{self.prefix}:workers"

    @property
    def arrivals(self) -> str:
        """Stream of arrival samples heartbeats take, about two minutes of them; entry =
        ``{"t": ms read at, "n": the ready stream's entries-added then}``."""
        return f"{self.prefix}:arrivals"

    def worker(self, worker_id: str) -> str:
        """Hash describing one live worker (host, pid, concurrency, counters); expires."""
        return f"{self.prefix}:worker:{worker_id}"

    def job(self, job_id: str) -> str:
        """Hash holding one job's envelope, status, counters and outcome."""
        return f"{self.prefix}:job:{job_id}"

    @property
    def job_prefix(self) -> str:
        """Common prefix of job keys, for scans."""
        return f"{self.prefix}:job:"

    def keyed(self, mode: str, task: str, key: str) -> str:
        """String naming the job that holds a debounce or throttle ``key`` of ``task``
        (``mode``: ``debounce`` or ``throttle``); see ``keyed.lua``. The task name's length
        comes first, so no task and key pair can spell another's name."""
        return f"{self.prefix}:{mode}:{len(task)}:{task}:{key}"

    def memo(self, request_id: str) -> str:
        """A script's answer to one request, kept a few minutes so a re-sent request (its
        reply was lost) gets the same answer after the first run destroyed what it read."""
        return f"{self.prefix}:memo:{request_id}"

    def done_channel(self, client_id: str) -> str:
        """Pub/sub channel of one client process, announcing ids of watched jobs that ended."""
        return f"{self.prefix}:done:{client_id}"

    @property
    def abort_channel(self) -> str:
        """Pub/sub channel telling workers to cancel a running job."""
        return f"{self.prefix}:abort"
