"""Folder watch: each new image file in a camera's folder is a part (never dropped), its name the part id.

A file is taken once its size stopped changing between two polls; one still 0 bytes after the
binding's ``settle_ms`` (or :data:`EMPTY_FILE_SETTLE_S`) is answered ERROR: a writer that leaves a
file empty that long is not "still writing".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from anomalygpt_edge.engines.preprocess import ImageError, list_images, read_image
from anomalygpt_edge.runtime.line.jobs import Job
from anomalygpt_edge.runtime.line.trigger_board import TriggerBoard

if TYPE_CHECKING:
    from anomalygpt_edge.runtime.line.config import RecipeBinding

FOLDER_POLL_S = 0.05
#: A folder-watch file still 0 bytes after this long (or the binding's settle_ms) is answered ERROR.
EMPTY_FILE_SETTLE_S = 1.0


class FolderWatcher:
    """Polls one camera's folder and hands every new, completely written file to the board."""

    def __init__(
        self,
        binding: RecipeBinding,
        folder: Path,
        board: TriggerBoard,
        answer_error: Callable[[Job, str], None],
        tick: Callable[[str], None],
    ):
        self.binding = binding
        self.folder = folder
        self.board = board
        self.answer_error = answer_error
        self.tick = tick
        self.settle_s = binding.settle_ms / 1e3 if binding.settle_ms > 0 else EMPTY_FILE_SETTLE_S
        self._seen: set[Path] = set()
        self._sizes: dict[Path, int] = {}
        self._empty_since: dict[Path, float] = {}

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; files already there at start are not parts."""
        self._seen = set(list_images(self.folder, allow_empty=True)) if self.folder.is_dir() else set()
        loop = threading.current_thread().name
        while not stop.wait(FOLDER_POLL_S):
            self.tick(loop)
            try:
                paths = list_images(self.folder, allow_empty=True) if self.folder.is_dir() else []
            except OSError:  # the folder went away mid-listing: next poll
                continue
            for path in paths:
                if path not in self._seen:
                    self._consider(path)

    def _consider(self, path: Path) -> None:
        try:
            size = path.stat().st_size
        except OSError:  # removed or renamed before we looked
            self._sizes.pop(path, None)
            self._empty_since.pop(path, None)
            return
        if size == 0:
            self._empty(path)
            return
        self._empty_since.pop(path, None)
        if self._sizes.get(path) != size:  # still being written: wait one more poll
            self._sizes[path] = size
            return
        self._seen.add(path)
        self._sizes.pop(path, None)
        job = self.board.folder_part(self.binding, path)
        try:
            job.image = read_image(path)
        except ImageError as exc:
            self.answer_error(job, str(exc))
            return
        self.board.enqueue_triggered(job)

    def _empty(self, path: Path) -> None:
        first = self._empty_since.setdefault(path, time.monotonic())
        if time.monotonic() - first < self.settle_s:
            return
        self._seen.add(path)
        self._empty_since.pop(path, None)
        job = self.board.folder_part(self.binding, path)
        self.answer_error(job, f"empty file: {path.name} stayed 0 bytes for {self.settle_s:g} s")
