"""Cron claims on Redis: one atomic script claims a tick and enqueues its run.

Ticks are decided on Redis's clock (``TIME``), which every worker shares: ``cron_claim.lua``
refuses a tick that is not due yet on it, so a worker whose clock runs ahead cannot claim
future ticks and block the others. See ``lua/cron_claim.lua`` for the rules.
"""

from __future__ import annotations

import uuid

from aioqueue.brokers.base import CronClaim, NewJob
from aioqueue.brokers.redis.connection import RedisConnection, redis_errors, text
from aioqueue.brokers.redis.keys import GROUP

__all__ = ["CronClaims"]


class CronClaims(RedisConnection):
    """Claiming cron ticks."""

    _claimer: str | None = None

    @property
    def claimer(self) -> str:
        """This broker's identity in cron claims: a call it repeats (same tick) is recognised
        as its own and answered the same; another broker's call for that tick is 'taken'."""
        if self._claimer is None:
            self._claimer = uuid.uuid4().hex
        return self._claimer

    async def claim_tick(
        self, name: str, fire_ms: int, job: NewJob, unique: bool, lease_ms: int
    ) -> CronClaim:
        """Claim the tick of cron job ``name`` at ``fire_ms`` (Redis's clock) and enqueue its
        run ``job`` in the same step (``cron_claim.lua``).

        Answers CLAIMED (claimed and enqueued), OVERLAP (claimed, run skipped: ``unique`` and
        the previous run is unfinished, that is queued, delayed, or running with a lease
        younger than ``lease_ms``), TAKEN (claimed by another broker, or a later tick was)
        or EARLY (not due yet on Redis's clock: nothing written). The same call repeated by
        the same broker answers the same and writes nothing more.
        """
        keys = self.keys
        new_key = keys.job(job.job_id)
        with redis_errors("claiming a cron tick"):
            while True:
                # The previous run's hash must be named in KEYS; if another claim replaces
                # it meanwhile, the script answers 'stale' and it is read again. Each
                # 'stale' means a newer tick was claimed, so this ends.
                previous = ""
                if unique:
                    last = await self.client.hget(keys.cron_runs, name)
                    previous = text(last) if last else ""
                script_keys = [
                    keys.cron,
                    keys.cron_runs,
                    keys.cron_claims,
                    keys.stream,
                    new_key,
                    keys.job(previous) if previous else new_key,
                    keys.events,
                ]
                args = [
                    name,
                    fire_ms,
                    job.job_id,
                    job.envelope,
                    "1" if unique else "0",
                    lease_ms,
                    GROUP,
                    previous,
                    self.claimer,
                    self.events_cap,
                    job.priority,
                ]
                [reply] = await self._eval_many([("cron_claim", script_keys, args)], durable=True)
                answer = text(reply)
                if answer != "stale":
                    return CronClaim(answer)
