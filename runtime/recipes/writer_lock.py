"""The per-recipe writer lock of :class:`RecipeStore`: one writer across threads and processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path


class WriterLock:
    """One writer per recipe across threads (an RLock) and processes (``flock`` on ``.lock``)."""

    _guard = threading.Lock()
    _held: dict[str, tuple[threading.RLock, list[int]]] = {}

    @classmethod
    @contextlib.contextmanager
    def hold(cls, path: Path) -> Iterator[None]:
        key = str(path.resolve())
        with cls._guard:
            lock, state = cls._held.setdefault(key, (threading.RLock(), [0, -1]))
        with lock:  # re-entrant within a thread; other threads of this process wait here
            if state[0] == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # other processes (CLI beside the daemon) wait here
                except BaseException:
                    os.close(fd)
                    raise
                state[1] = fd
            state[0] += 1
            try:
                yield
            finally:
                state[0] -= 1
                if state[0] == 0:
                    fcntl.flock(state[1], fcntl.LOCK_UN)
                    os.close(state[1])
                    state[1] = -1
