"""Callbacks handed to paho: a last-resort handler, because an exception raised into paho ends its
network thread, and with it every publish and every command of that connection."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def guard_callback(
    callback: Callable[..., None], what: str, report: Callable[[str], None] | None
) -> Callable[..., None]:
    """``callback`` that logs and reports (``"<what> callback <name> failed: ..."``) instead of raising."""

    def guarded(*args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:
            log.exception("%s callback %s failed", what, callback.__name__)
            if report is not None:
                with contextlib.suppress(Exception):
                    report(f"{what} callback {callback.__name__} failed: {exc!r}")

    guarded.__name__ = callback.__name__
    return guarded
