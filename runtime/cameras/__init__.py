"""Camera sources: one interface (:mod:`.base`), one file per kind, chosen by the config's ``type``."""

from anomalygpt_edge.runtime.cameras.base import Camera, CameraError, CameraSource, Frame, create_source

__all__ = ["Camera", "CameraError", "CameraSource", "Frame", "create_source"]
