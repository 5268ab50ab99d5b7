"""The value types every input surface shares: one ``Name``, one ``Roi``, one ``TargetFrr``.

The YAML config, ``recipe.json``, MQTT command bodies, HTTP bodies and the CLI all validate these
through the same pydantic types, so a value one surface accepts is never refused by another at
run time (a recipe named ``Bracket:v2`` is refused by all of them, with the same message).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, ValidationError

__all__ = [
    "MIN_ROI_SIDE",
    "Name",
    "Roi",
    "TargetFrr",
    "check_name",
    "check_roi",
    "parse",
    "roi_from_text",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# Device names Windows refuses as file names (with any extension): a recipe folder synced to an
# engineering PC must not be one of them.
_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|COM[0-9¹²³]|LPT[0-9¹²³])(\..*)?\Z", re.IGNORECASE)
#: The smallest ROI side in pixels: below it the encoder sees less than one patch of real image.
MIN_ROI_SIDE = 8


def check_name(value: str) -> str:
    """A recipe or camera name: it becomes a folder name and an MQTT topic level, so letters,
    digits and ``_.-`` only, at most 64 characters, starting with a letter or digit, and not a
    device name. Raises ``ValueError`` with the reason."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"name {value!r} is invalid: use letters, digits, '_', '.', '-' (max 64)")
    if _RESERVED.match(value):
        raise ValueError(f"name {value!r} is a reserved device name (CON, NUL, COM1, ...): choose another")
    return value


def check_roi(value: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` in whole pixels: ``x, y >= 0`` and ``w, h >= MIN_ROI_SIDE``. Whether it fits
    a frame is checked against the frame (its size is not known here)."""
    x, y, w, h = value
    if x < 0 or y < 0 or w < MIN_ROI_SIDE or h < MIN_ROI_SIDE:
        raise ValueError(f"roi {list(value)} must be [x, y, w, h] with x, y >= 0 and w, h >= {MIN_ROI_SIDE} pixels")
    return value


def _roi_sequence(value: Any) -> Any:
    # JSON and YAML give lists; a bool is an int to Python but never a pixel count.
    if isinstance(value, list | tuple):
        if len(value) != 4 or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"roi must be [x, y, w, h] in whole pixels, got {value!r}")
        return tuple(value)
    raise ValueError(f"roi must be [x, y, w, h] in whole pixels, got {value!r}")


Name = Annotated[str, AfterValidator(check_name)]
Roi = Annotated[tuple[int, int, int, int], BeforeValidator(_roi_sequence), AfterValidator(check_roi)]
#: The false-reject rate the automatic threshold aims at: above 0, below one part in two.
TargetFrr = Annotated[float, Field(gt=0.0, lt=0.5)]

T = TypeVar("T")


def parse(kind: Any, value: Any, what: str) -> Any:
    """Validate ``value`` as ``kind`` (one of the types above, or any pydantic type); ``ValueError``
    with one line that starts with ``what`` when it is not one."""
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first.get("ctx", {}).get("error") or first["msg"])
        raise ValueError(f"{what}: {message}") from None


def roi_from_text(text: str) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` (the CLI's spelling) as a :data:`Roi`."""
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"roi must be x,y,w,h in whole pixels, got {text!r}") from None
    return parse(Roi, parts, "roi")
