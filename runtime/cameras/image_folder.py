"""A folder of images replayed in name order as a camera (paced at ``fps``, default 10 per second).

The folder is listed again at every pass, so images added while it runs join the next pass; a
folder that disappears is a camera that dropped (it is reopened with backoff when it comes back).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from anomalygpt_edge.engines.preprocess import ImageError, list_images, read_image
from anomalygpt_edge.runtime.cameras.base import (
    CameraError,
    CameraSource,
    EndOfStreamError,
    FileCameraConfig,
    register_source,
)

log = logging.getLogger(__name__)

DEFAULT_FPS = 10.0


class ImageFolderCameraConfig(FileCameraConfig):
    """A folder of images replayed in name order at ``fps`` (default 10)."""

    type: Literal["image_folder"] = "image_folder"


@register_source("image_folder")
class ImageFolderSource(CameraSource):
    """Images of a folder, one per frame period, in name order.

    An unreadable file (corrupt, truncated, over the pixel limit, gone) is skipped: the camera
    delivers the next file in the same frame period and counts the skip (``skipped``,
    ``last_error`` in :meth:`stats`). Only a folder where no file can be read is a dropped camera.
    """

    config_model = ImageFolderCameraConfig
    config: ImageFolderCameraConfig
    _files: list[Path]
    _index = 0
    _next = 0.0

    def __init__(self, config: ImageFolderCameraConfig):
        super().__init__(config)
        self.skipped = 0
        self.last_error: str | None = None
        self._warned: set[str] = set()  # one warning per bad file, not one per pass of a looping folder

    def open(self) -> None:
        folder = Path(self.config.source)
        if not folder.is_dir():
            raise CameraError(f"camera {self.config.name}: image folder {folder} not found")
        try:
            self._files = list_images(folder, allow_empty=True)
        except (OSError, ImageError) as exc:  # gone between the check and the listing
            reason = (exc.strerror if isinstance(exc, OSError) else None) or exc
            raise CameraError(f"camera {self.config.name}: image folder {folder}: {reason}") from exc
        if not self._files:
            raise CameraError(f"camera {self.config.name}: no images in {folder}")
        self._index = 0
        self._next = time.monotonic()

    def read(self) -> tuple[np.ndarray, str | None]:
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next = max(self._next + 1.0 / (self.config.fps or DEFAULT_FPS), time.monotonic())
        # At most one pass over the listing per frame: a folder of only bad files is a dropped
        # camera (reopened with backoff), never a busy loop.
        for _ in range(len(self._files)):
            if self._index >= len(self._files):
                if not self.config.loop:
                    raise EndOfStreamError(f"camera {self.config.name}: all images of {self.config.source} replayed")
                self.open()
            path = self._files[self._index]
            self._index += 1
            try:
                return read_image(path), path.name
            except ImageError as exc:
                if not path.parent.is_dir():  # the folder itself went away: the camera dropped
                    raise CameraError(f"camera {self.config.name}: {exc} (folder gone)") from exc
                self._skip(path, exc)
        raise CameraError(f"camera {self.config.name}: no readable image in {self.config.source} ({self.last_error})")

    def _skip(self, path: Path, exc: ImageError) -> None:
        self.skipped += 1
        self.last_error = str(exc)
        if path.name not in self._warned and len(self._warned) < 1000:
            self._warned.add(path.name)
            log.warning("camera %s: skipping %s", self.config.name, exc)

    def stats(self) -> dict[str, Any]:
        """Files skipped as unreadable so far, and why the last one was."""
        return {"skipped": self.skipped, "last_error": self.last_error}
