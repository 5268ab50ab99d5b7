"""Progress of long command-line work (export steps, enrollment, evaluation, calibration, benches, archive export).

On a terminal it is a tqdm bar with counts, rate and ETA; where stderr is not a terminal (systemd's
journal, CI logs, a pipe) it is plain lines with the same counts, one per step, thinned to about
:data:`PLAIN_LINES` lines for long runs so a journal is not flooded. Output goes to stderr: stdout
stays for tables and JSON.

This lives at the package root so every room may use it, but only command-line code does: the
daemon's modules never import it (tests/test_progress.py checks), and library code such as
enrollment takes a plain ``on_progress(done, total)`` callback instead. ``ANOMALYGPT_EDGE_PROGRESS``
overrides the choice: ``auto`` (default), ``bar``, ``plain`` or ``off``.
"""

from __future__ import annotations

import io
import os
import sys
import time
from types import TracebackType
from typing import Any, TextIO

MODE_ENV = "ANOMALYGPT_EDGE_PROGRESS"
MODES = ("auto", "bar", "plain", "off")
#: About how many plain lines one long bar writes (every step when it has fewer steps).
PLAIN_LINES = 20

#: The tqdm bars open now, so that :func:`note` writes above them instead of tearing them.
_open_bars: list[Any] = []


def mode(stream: TextIO | None = None) -> str:
    """``bar``, ``plain`` or ``off`` for ``stream`` (default stderr): the environment's choice, else by terminal."""
    chosen = os.environ.get(MODE_ENV, "auto").strip().lower()
    if chosen in ("bar", "plain", "off"):
        return chosen
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # a closed or exotic stream: no terminal
        return "plain"


def _columns(stream: TextIO) -> int:
    """The terminal's width, 0 when it does not say (a pty with no size: tqdm would draw an empty bar)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


def _plural(unit: str) -> str:
    return f"{unit}es" if unit.endswith(("s", "sh", "ch", "x")) else f"{unit}s"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


class Progress:
    """One unit of long work with ``total`` steps (None: unknown); advance with :meth:`update`."""

    def __init__(self, total: int | None, desc: str, unit: str = "step", stream: TextIO | None = None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode(self.stream)
        self.started = time.monotonic()
        self._next_line = 0
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm  # type: ignore[import-untyped]  # only on a terminal: plain lines need nothing

            # A pty that reports no size (0 x 0) makes tqdm hide the bar: give it one.
            width = {"dynamic_ncols": True} if _columns(self.stream) > 0 else {"ncols": 100, "nrows": 24}
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=True, **width)
            _open_bars.append(self._bar)

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more steps done; ``note`` says what the step was (shown beside the counts)."""
        self.done += n
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        elif self.mode == "plain" and (self.done >= self._next_line or self.done == self.total):
            self._next_line = self.done + max(1, (self.total or 0) // PLAIN_LINES)
            print(self.line(note), file=self.stream, flush=True)

    def report(self, done: int, total: int | None = None) -> None:
        """Callback form, ``(done, total)`` as library code reports it: move to ``done`` of ``total``."""
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if done > self.done:
            self.update(done - self.done)

    def line(self, note: str = "") -> str:
        """The plain line for the current count: ``[desc] 3/10 images (30%), 4.2 s, ETA 9.8 s: note``."""
        elapsed = time.monotonic() - self.started
        if self.total:
            text = f"[{self.desc}] {self.done}/{self.total} {_plural(self.unit)} ({100 * self.done / self.total:.0f}%)"
            text += f", {_seconds(elapsed)}"
            if 0 < self.done < self.total:
                text += f", ETA {_seconds(elapsed / self.done * (self.total - self.done))}"
        else:
            text = f"[{self.desc}] {self.done} {_plural(self.unit)}, {_seconds(elapsed)}"
        return f"{text}: {note}" if note else text

    def close(self) -> None:
        """End the bar (it stays on screen with its final counts)."""
        if self._bar is not None:
            self._bar.close()
            if self._bar in _open_bars:
                _open_bars.remove(self._bar)
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "step", stream: TextIO | None = None) -> Progress:
    """A :class:`Progress` for ``total`` steps of ``desc`` (use it as a context manager)."""
    return Progress(total, desc, unit, stream)


def note(message: str, stream: TextIO | None = None) -> None:
    """A log line on stderr that does not tear an open bar (tqdm writes it above the bar)."""
    stream = stream if stream is not None else sys.stderr
    if _open_bars:
        from tqdm import tqdm

        tqdm.write(message, file=stream)
        return
    print(message, file=stream, flush=True)
