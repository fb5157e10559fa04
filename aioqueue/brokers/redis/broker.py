"""The Redis Streams implementation of the broker protocol.

:class:`RedisBroker` puts together the parts, each a module of its own: the connection,
scripts, shared clock and error mapping (``connection.py``); the job lifecycle the worker
drives (``lifecycle.py``); cron claims (``cron.py``); inspection and administration
(``admin.py``). Redis errors are turned into aioqueue errors in ``connection.py`` only.
"""

from __future__ import annotations

from aioqueue.brokers.redis.admin import Admin
from aioqueue.brokers.redis.cron import CronClaims
from aioqueue.brokers.redis.lifecycle import Lifecycle

__all__ = ["RedisBroker"]


class RedisBroker(Lifecycle, CronClaims, Admin):
    """A queue's storage on Redis >= 7.0: a stream with a consumer group, a delayed zset,
    a dead-letter zset and one hash per job. See ``docs/architecture.md``."""
