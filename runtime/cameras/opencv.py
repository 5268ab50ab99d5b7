"""Live cameras through OpenCV ``VideoCapture``: USB/V4L2, RTSP/HTTP streams, GStreamer pipelines.

``source`` is a device index (``0``), a device node (``/dev/video2``), a stream URL
(``rtsp://...``, ``http://...``) or, with ``gstreamer: true``, a pipeline string ending in
``appsink`` (Jetson CSI cameras: ``nvarguscamerasrc ! ... ! appsink``). The device paces the frames;
``read`` blocks until the next one.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import cv2
import numpy as np

from anomalygpt_edge.runtime.cameras.base import CameraConfig, CameraError, CameraSource, register_source
from anomalygpt_edge.runtime.values import Between, Flag

_DEV_NODE = re.compile(r"^/dev/video(\d+)$")


class OpenCVCameraConfig(CameraConfig):
    """A live camera: ``fps``, ``width`` and ``height`` are requested from the driver."""

    type: Literal["opencv"] = "opencv"
    width: Annotated[int, Between(1, 16384)] | None = None  # requested capture size
    height: Annotated[int, Between(1, 16384)] | None = None
    gstreamer: Flag = False  # ``source`` is a GStreamer pipeline (cv2.CAP_GSTREAMER)

    @property
    def loop(self) -> bool:
        """A live camera has no end to start again from (file kinds have a ``loop`` key)."""
        return True


@register_source("opencv")
class OpenCVSource(CameraSource):
    """A ``cv2.VideoCapture`` device or stream."""

    config_model = OpenCVCameraConfig
    config: OpenCVCameraConfig
    cap: cv2.VideoCapture | None = None

    def _target(self) -> tuple[int | str, int]:
        src = self.config.source.strip()
        if self.config.gstreamer:
            return src, cv2.CAP_GSTREAMER
        if src.isdigit():
            return int(src), cv2.CAP_V4L2
        m = _DEV_NODE.match(src)
        if m:
            # V4L2 by index is what every OpenCV build accepts; the node name maps to it.
            return int(m.group(1)), cv2.CAP_V4L2
        return src, cv2.CAP_FFMPEG if "://" in src else cv2.CAP_ANY

    def open(self) -> None:
        target, api = self._target()
        if api == cv2.CAP_GSTREAMER and not re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()):
            raise CameraError(f"camera {self.config.name}: this OpenCV build has no GStreamer support")
        cap = cv2.VideoCapture(target, api)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"camera {self.config.name}: cannot open {self.describe()}")
        if self.config.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.config.width)
        if self.config.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.config.height)
        if self.config.fps:
            cap.set(cv2.CAP_PROP_FPS, self.config.fps)
        # Ask the driver for the smallest internal queue: we want the newest frame, not an old one.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self.cap = cap

    def read(self) -> tuple[np.ndarray, str | None]:
        if self.cap is None:
            raise CameraError(f"camera {self.config.name}: not open")
        ok, image = self.cap.read()
        if not ok or image is None:
            raise CameraError(f"camera {self.config.name}: no frame from {self.describe()} (disconnected?)")
        return image, None

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
