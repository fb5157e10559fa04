"""``python -m aioqueue`` is the ``aioqueue`` command."""

from aioqueue.cli import main

main()
