"""``aioqueue run --processes N``: N worker processes under one supervisor.

One asyncio loop uses one core; the supervisor starts N ``aioqueue run`` children (so a
2-core box runs two event loops), restarts a child that dies with an error (backing off if
it keeps dying at start-up), forwards SIGTERM/SIGINT to every child so each shuts down
gracefully (a second signal forces them too), and exits once all children have exited.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# A child that dies within this many seconds of starting counts as crash-looping.
QUICK_DEATH = 5.0
MAX_BACKOFF = 30.0
POLL = 0.2
# `aioqueue run` exits with this when its error is one a restart cannot fix (configuration,
# credentials, rights, certificates).
CONFIGURATION_EXIT = 2


@dataclass
class Child:
    """One supervised worker process."""

    slot: int
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Runs ``command`` (plus per-slot arguments) in ``processes`` child processes."""

    def __init__(
        self, command: Sequence[str], processes: int, slot_args: Sequence[Sequence[str]] = ()
    ) -> None:
        self.command = list(command)
        self.processes = processes
        self.slot_args = [list(a) for a in slot_args] or [[] for _ in range(processes)]
        self.children: dict[int, Child] = {}
        self.quick_deaths: dict[int, int] = {}
        self.signals = 0
        self.restarts = 0

    def _spawn(self, slot: int) -> Child:
        # A session of its own: a signal sent to the whole process group (Ctrl-C in a
        # terminal, systemd's control-group kill) reaches the children once, through the
        # supervisor, instead of twice, which would skip their grace period.
        process = subprocess.Popen([*self.command, *self.slot_args[slot]], start_new_session=True)
        logger.info("started worker process %d (pid %d)", slot, process.pid)
        return Child(slot, process)

    def _forward(self, signum: int, frame: object) -> None:
        self.signals += 1
        for child in self.children.values():
            if child.process.poll() is None:
                child.process.send_signal(signum)

    def run(self) -> int:
        """Supervise until every child has exited; 1 if a child ended with an error, 2 (and
        the others stopped) if one exited with 2: a bad setting, password or certificate
        that restarting would only repeat."""
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.children = {slot: self._spawn(slot) for slot in range(self.processes)}
            restart_at: dict[int, float] = {}
            failed = fatal = False
            while self.children or restart_at:
                time.sleep(POLL)
                now = time.monotonic()
                for slot, child in list(self.children.items()):
                    code = child.process.poll()
                    if code is None:
                        continue
                    del self.children[slot]
                    if code == 0 or self.signals:
                        failed = failed or code not in (0, -signal.SIGTERM, -signal.SIGINT)
                        continue
                    if code == CONFIGURATION_EXIT:
                        # A bad setting, password or certificate: restarting cannot fix it.
                        logger.error(
                            "worker process %d exited with %d (its error is above); stopping",
                            slot,
                            code,
                        )
                        self._forward(signal.SIGTERM, None)
                        restart_at.clear()
                        fatal = True
                        continue
                    quick = now - child.started < QUICK_DEATH
                    deaths = self.quick_deaths.get(slot, 0) + 1 if quick else 0
                    self.quick_deaths[slot] = deaths
                    delay = min(2.0**deaths - 1, MAX_BACKOFF) if quick else 0.0
                    logger.warning(
                        "worker process %d (pid %d) exited with %d; restarting in %.0fs",
                        slot,
                        child.process.pid,
                        code,
                        delay,
                    )
                    restart_at[slot] = now + delay
                for slot, due in list(restart_at.items()):
                    if self.signals:
                        del restart_at[slot]
                    elif now >= due:
                        del restart_at[slot]
                        self.children[slot] = self._spawn(slot)
                        self.restarts += 1
            if fatal:
                return CONFIGURATION_EXIT
            return 1 if failed else 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def worker_command() -> list[str]:
    """How to start one more ``aioqueue`` process with this interpreter."""
    return [sys.executable, "-m", "aioqueue"]
