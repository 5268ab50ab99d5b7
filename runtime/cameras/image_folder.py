"""A folder of images replayed in name order as a camera (paced at ``fps``, default 10 per second).

The folder is listed again at every pass, so images added while it runs join the next pass; a
folder that disappears is a camera that dropped (it is reopened with backoff when it comes back).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from anomalygpt_edge.runtime.cameras.base import CameraError, CameraSource, EndOfStreamError, register_source
from anomalygpt_edge.runtime.preprocess import ImageError, read_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_FPS = 10.0


def list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` in name order (hidden and temporary files skipped)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


@register_source("image_folder")
class ImageFolderSource(CameraSource):
    """Images of a folder, one per frame period, in name order."""

    _files: list[Path]
    _index = 0
    _next = 0.0

    def open(self) -> None:
        folder = Path(self.config.source)
        if not folder.is_dir():
            raise CameraError(f"camera {self.config.name}: image folder {folder} not found")
        self._files = list_images(folder)
        if not self._files:
            raise CameraError(f"camera {self.config.name}: no images in {folder}")
        self._index = 0
        self._next = time.monotonic()

    def read(self) -> tuple[np.ndarray, str | None]:
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next = max(self._next + 1.0 / (self.config.fps or DEFAULT_FPS), time.monotonic())
        if self._index >= len(self._files):
            if not self.config.loop:
                raise EndOfStreamError(f"camera {self.config.name}: all images of {self.config.source} replayed")
            self.open()
        path = self._files[self._index]
        self._index += 1
        try:
            return read_image(path), path.name
        except ImageError as exc:
            raise CameraError(f"camera {self.config.name}: {exc}") from exc
