"""The technician station's names in one place (the web layer imports them from here).

The station is split by job:

* :mod:`.station_protocol`: the :class:`Station` protocol the web layer calls, its errors and
  request values (:class:`HistoryQuery`, :class:`DefectUpload`, :class:`Frame`);
* :mod:`.records`: verdict records and the bounded recent-verdict log (:class:`VerdictLog`);
* :mod:`.enroll_ops`: uploads screened before decoding, painted masks, the recipe state;
* :mod:`.station_base`: what every station shares (recipes, enrollment, history, ``ask``);
* :mod:`.daemon_station`: the one runtime, the line daemon (with MQTT, or with a null link);
* :mod:`.standalone`: that daemon with a null link, built in-process for a bench.
"""

from __future__ import annotations

from typing import Any

from anomalygpt_edge.runtime.web.enroll_ops import MAX_REMEMBERED_UPLOADS, MAX_UPLOAD_IMAGES, recipe_state
from anomalygpt_edge.runtime.web.records import (
    HISTORY_SIZE,
    JPEG_QUALITY,
    KEEP_OK_IMAGE_EVERY,
    VerdictLog,
    make_record,
    verdict_from_record,
)
from anomalygpt_edge.runtime.web.station_base import StationBase, bundle_status
from anomalygpt_edge.runtime.web.station_protocol import (
    DefectUpload,
    Frame,
    HistoryQuery,
    NotFoundError,
    Station,
    StationError,
)

__all__ = [
    "HISTORY_SIZE",
    "JPEG_QUALITY",
    "KEEP_OK_IMAGE_EVERY",
    "MAX_REMEMBERED_UPLOADS",
    "MAX_UPLOAD_IMAGES",
    "DefectUpload",
    "Frame",
    "HistoryQuery",
    "NotFoundError",
    "Station",
    "StationBase",
    "StationError",
    "VerdictLog",
    "bundle_status",
    "make_record",
    "recipe_state",
    "verdict_from_record",
]

#: Names that pull in the daemon (cameras, engines, MQTT): imported on first use, so importing
#: this module for the protocol stays light.
_LAZY = {"StandaloneStation": "StandaloneStation", "CameraSpec": "CameraSpec"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from anomalygpt_edge.runtime.web import standalone

        return getattr(standalone, _LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
