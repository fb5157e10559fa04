"""pytest plugin (registered by aioqueue's ``pytest11`` entry point).

Fixture ``aioqueue_memory``: call it with a queue to point that queue at a private
``memory://`` store for the duration of the test::

    def test_enqueue_is_recorded(aioqueue_memory):
        aioqueue_memory(app.queue)
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from aioqueue.queue import Queue
from aioqueue.testing import Restore, use_memory


@pytest.fixture
def aioqueue_memory() -> Iterator[Callable[[Queue], Queue]]:
    """Isolate queues on private in-memory stores; restored when the test ends."""
    restores: list[Restore] = []

    def isolate(queue: Queue) -> Queue:
        restores.append(use_memory(queue))
        return queue

    yield isolate
    for restore in reversed(restores):
        restore()
