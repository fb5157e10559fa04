"""The worker that runs the poll every 10 minutes (and whenever the app asks for one).

From the repository root::

    aioqueue run examples.github_poll.worker:worker
    aioqueue run examples.github_poll.worker:WorkerSettings   # the same, as a settings class
"""

from __future__ import annotations

from examples.github_poll.tasks import close_clients, open_clients, queue

__all__ = ["WorkerSettings", "worker"]

worker = queue.worker(concurrency=4, on_startup=[open_clients], on_shutdown=[close_clients])


class WorkerSettings:
    """The same worker described as a settings class: ``queue`` plus ``queue.worker()``
    keywords. The cron job comes with the task (``@queue.cron`` in ``tasks.py``)."""

    queue = queue
    concurrency = 4
    on_startup = (open_clients,)
    on_shutdown = (close_clients,)
