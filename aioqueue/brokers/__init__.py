"""Storage backends. The worker and queue speak only the :class:`~aioqueue.brokers.base.Broker`
protocol; everything Redis-specific lives in :mod:`aioqueue.brokers.redis`."""
