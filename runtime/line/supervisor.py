"""The daemon's threads: every long-lived loop runs under a last-resort handler.

An exception a loop did not expect is recorded (log, ``last_error``, ``degraded``) and the loop
restarted; one that keeps dying (:data:`MAX_CRASHES` within :data:`CRASH_WINDOW_S`) is given up on
and marked dead, so the systemd watchdog stops being fed and systemd restarts the whole service.
Threads not started here (paho's, the verdict sender, the archive writer) are covered by a
``threading.excepthook`` that marks them dead.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from anomalygpt_edge.runtime.line.status import DaemonHealth

log = logging.getLogger(__name__)
#: A supervised loop that crashes this often within CRASH_WINDOW_S is given up on (marked dead).
MAX_CRASHES = 5
CRASH_WINDOW_S = 60.0
#: How long a loop that crashed and was restarted keeps the status degraded: long enough for a
#: few heartbeats to carry it, short enough that a restarted loop that stays up clears by itself.
CRASH_REPORT_S = 30.0


class Supervisor:
    """Starts, restarts and accounts for the daemon's own threads."""

    def __init__(self, health: DaemonHealth):
        self.health = health
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        # name -> recent crash times, and the last crash's reason.
        self.crashes: dict[str, list[float]] = collections.defaultdict(list)
        self.crash_reason: dict[str, str] = {}
        self._previous_excepthook: Any = None

    def spawn(self, name: str, target: Any, *args: Any) -> threading.Thread:
        """Start ``target(*args)`` on a thread ``name`` under the last-resort handler; the thread."""
        t = threading.Thread(target=self._supervised, args=(name, target, *args), name=name, daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def spawner(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """:meth:`spawn` in the shape components take (cameras, commands, explanation worker)."""
        return self.spawn(name, target)

    def _supervised(self, name: str, target: Any, *args: Any) -> None:
        while not self.stopping.is_set():
            try:
                target(*args)
                return
            except Exception as exc:
                if self._crashed(name, exc):
                    return
                self.stopping.wait(0.2)

    def _crashed(self, name: str, exc: Exception) -> bool:
        """Record a crash of ``name``; True when it crashed too often and is given up on."""
        now = time.monotonic()
        crashes = [t for t in self.crashes[name] if now - t < CRASH_WINDOW_S] + [now]
        # last_error first: whoever sees the crash in the status also sees its reason.
        self.health.error(f"thread {name} died: {exc!r} ({len(crashes)} in {CRASH_WINDOW_S:g} s)")
        self.crash_reason[name] = f"{exc!r}"
        self.crashes[name] = crashes
        give_up = len(crashes) >= MAX_CRASHES
        log.exception("thread %s died; %s", name, "giving up" if give_up else "restarting")
        if give_up:
            self.health.mark_dead(name, f"{exc!r}")
        return give_up

    def recent_crashes(self) -> list[str]:
        """Problems for loops that crashed lately and were restarted (not the dead ones)."""
        now = time.monotonic()
        dead = self.health.dead_threads()
        return [
            f"thread {name} crashed and was restarted: {self.crash_reason.get(name)}"
            for name, crashes in list(self.crashes.items())
            if crashes and now - crashes[-1] < CRASH_REPORT_S and name not in dead
        ]

    def install_excepthook(self) -> None:
        """A thread not started through :meth:`spawn` that dies is recorded and marked dead, not silent."""
        previous = threading.excepthook
        self._previous_excepthook = previous

        def hook(args: threading.ExceptHookArgs) -> None:
            name = getattr(args.thread, "name", "?")
            if args.exc_type is not SystemExit and not self.stopping.is_set():
                self.health.error(f"thread {name} died: {args.exc_value!r}")
                self.health.mark_dead(name, repr(args.exc_value))
            previous(args)

        threading.excepthook = hook

    def restore_excepthook(self) -> None:
        """Put back the hook :meth:`install_excepthook` replaced."""
        if self._previous_excepthook is not None:
            threading.excepthook = self._previous_excepthook
            self._previous_excepthook = None

    def join(self, timeout_s: float = 3.0) -> None:
        """Wait for every supervised thread (each up to ``timeout_s``)."""
        for t in self.threads:
            t.join(timeout_s)
