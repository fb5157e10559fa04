"""The Redis Streams broker: key names, Lua scripts and their typed wrappers."""

from aioqueue.brokers.redis.broker import RedisBroker

__all__ = ["RedisBroker"]
