"""The one vocabulary of states the line daemon reports: per camera, and for the daemon itself.

Cameras report their grabbing state (``runtime/cameras/base.py`` sets these words); the daemon adds
two for cameras without a grabbing thread (a watched folder). The status document, the heartbeat,
the technician station and the Prometheus gauges (``runtime/line/health.py``) all read the words
defined here, so a camera that is serving parts is ``online`` (or ``watching``) everywhere.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

#: A camera's state in the status document (``cameras.<name>.status``).
CameraState = Literal["starting", "online", "reconnecting", "ended", "stopped", "watching", "folder missing"]
CAMERA_STATES: Final[tuple[str, ...]] = get_args(CameraState)
#: States in which a camera delivers parts to inspect (the "camera up" gauge is 1 in these).
CAMERA_SERVING: Final[frozenset[str]] = frozenset({"online", "watching"})
#: States that are not a fault: a camera coming up, serving, or stopped on purpose.
CAMERA_NOT_FAULTY: Final[frozenset[str]] = frozenset({"online", "starting", "stopped", "watching"})

#: The daemon's state in its retained status (``offline`` is the Will / clean-exit message;
#: ``starting`` while the engines warm up, before READY=1).
DaemonState = Literal["starting", "online", "degraded", "offline"]
DAEMON_STATES: Final[tuple[str, ...]] = get_args(DaemonState)


def camera_serving(state: str) -> bool:
    """True when a camera in ``state`` delivers parts to inspect."""
    return state in CAMERA_SERVING
