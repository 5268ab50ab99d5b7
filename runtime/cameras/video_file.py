"""Video files replayed as a camera, paced in real time (the file's fps, or the configured one).

Used for the demo, the benchmark and tests, and to replay recorded line footage against a recipe.
With ``loop`` the file starts again at its end; without it the camera ends.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from anomalygpt_edge.runtime.cameras.base import (
    CameraError,
    CameraSource,
    EndOfStreamError,
    FileCameraConfig,
    register_source,
)

DEFAULT_FPS = 10.0


class VideoFileCameraConfig(FileCameraConfig):
    """A video file replayed at ``fps`` (default: the file's own rate)."""

    type: Literal["video_file"] = "video_file"


@register_source("video_file")
class VideoFileSource(CameraSource):
    """A video file read with OpenCV's FFmpeg backend."""

    config_model = VideoFileCameraConfig
    config: VideoFileCameraConfig

    cap: cv2.VideoCapture | None = None
    fps: float = DEFAULT_FPS
    _next: float = 0.0

    def open(self) -> None:
        path = Path(self.config.source)
        if not path.is_file():
            raise CameraError(f"camera {self.config.name}: video file {path} not found")
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"camera {self.config.name}: {path} is not a readable video")
        file_fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = self.config.fps or (file_fps if 0 < file_fps < 1000 else DEFAULT_FPS)
        self.cap = cap
        self._next = time.monotonic()

    def read(self) -> tuple[np.ndarray, str | None]:
        if self.cap is None:
            raise CameraError(f"camera {self.config.name}: not open")
        # Pace like a real camera: a frame is "captured" when its time comes, not as fast as we decode.
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next = max(self._next + 1.0 / self.fps, time.monotonic() - 1.0 / self.fps)
        ok, image = self.cap.read()
        if not ok:
            if not Path(self.config.source).is_file():
                raise CameraError(f"camera {self.config.name}: video file {self.config.source} disappeared")
            if not self.config.loop:
                raise EndOfStreamError(f"camera {self.config.name}: end of {self.config.source}")
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self.cap.read()
            if not ok:
                raise CameraError(f"camera {self.config.name}: cannot rewind {self.config.source}")
        return image, None

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
