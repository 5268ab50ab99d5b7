"""The value types every input surface shares: one ``Name``, one ``Roi``, one ``TargetFrr``.

The YAML config, ``recipe.json``, MQTT command bodies, HTTP bodies and the CLI all validate these
through the same pydantic types, so a value one surface accepts is never refused by another at
run time (a recipe named ``Bracket:v2`` is refused by all of them, with the same message).

The config's field types live here too (bounded numbers, strict booleans, text, paths relative
to the config file, MQTT topic levels): each room's config model (cameras, delivery, line) is
declared with them, and every message they raise reads after a key path
(``mqtt.port: must be an integer between 1 and 65535, got 'lots'``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    GetCoreSchemaHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import CoreSchema

__all__ = [
    "MIN_ROI_SIDE",
    "Between",
    "ConfigPath",
    "ExistingPath",
    "FieldError",
    "Flag",
    "Name",
    "Roi",
    "TargetFrr",
    "Text",
    "TopicLevel",
    "as_text",
    "check_name",
    "check_roi",
    "integer",
    "number",
    "parse",
    "resolve_path",
    "roi_from_text",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# Device names Windows refuses as file names (with any extension): a recipe folder synced to an
# engineering PC must not be one of them.
_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|COM[0-9¹²³]|LPT[0-9¹²³])(\..*)?\Z", re.IGNORECASE)
#: The smallest ROI side in pixels: below it the encoder sees less than one patch of real image.
MIN_ROI_SIDE = 8


class FieldError(ValueError):
    """A check across fields that blames one of them: ``loc`` is the blamed field's path below the
    model that raised it, so the error names that key (and its YAML line), not the whole model."""

    def __init__(self, loc: tuple[str | int, ...], message: str):
        super().__init__(message)
        self.loc = loc


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
        raise ValueError(f"must be [x, y, w, h] with x, y >= 0 and w, h >= {MIN_ROI_SIDE} pixels, got {list(value)}")
    return value


def _roi_sequence(value: Any) -> Any:
    # JSON and YAML give lists; a bool is an int to Python but never a pixel count.
    if isinstance(value, list | tuple):
        if len(value) != 4 or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"must be [x, y, w, h] in whole pixels, got {value!r}")
        return tuple(value)
    raise ValueError(f"must be [x, y, w, h] in whole pixels, got {value!r}")


Name = Annotated[str, AfterValidator(check_name)]
Roi = Annotated[tuple[int, int, int, int], BeforeValidator(_roi_sequence), AfterValidator(check_roi)]


def _frr(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 0.5:
        raise ValueError(f"must be a number in (0, 0.5), got {value!r}")
    return value


#: The false-reject rate the automatic threshold aims at: above 0, below one part in two.
TargetFrr = Annotated[float, BeforeValidator(_frr), Field(gt=0.0, lt=0.5)]


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
        raise ValueError(f"roi: must be x,y,w,h in whole pixels, got {text!r}") from None
    roi: tuple[int, int, int, int] = parse(Roi, parts, "roi")
    return roi


# --- config field types -------------------------------------------------------------------------


def as_text(value: Any) -> Any:
    """A YAML scalar read as text where the YAML reads a number (``protocol: 5``); others unchanged."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _text(value: Any) -> str:
    # YAML reads `source: 0` as an int; a bool is never text (`source: yes` is a typo).
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return str(value)


def _number(low: float, high: float, whole: bool, value: Any) -> Any:
    # Stricter than pydantic's lax mode on purpose: `fps: true` or `port: "1883"` is a mistake.
    ok_type = isinstance(value, int) if whole else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not low <= value <= high:
        kind = "an integer" if whole else "a number"
        bound = f"between {low:g} and {high:g}" if high != math.inf else f">= {low:g}"
        raise ValueError(f"must be {kind} {bound}, got {value!r}")
    return int(value) if whole else float(value)


@dataclass(frozen=True)
class Between:
    """``Annotated[int, Between(1, 65535)]``, ``Annotated[float, Between(0, 1)]``: a config number in
    ``[low, high]`` with the project's messages (booleans and text refused; floats too for an ``int``).

    Metadata rather than a type built by a call, so a type checker reads the plain ``int`` or
    ``float`` the field holds; the annotated type says whether whole numbers are required.
    """

    low: float
    high: float = math.inf

    def __get_pydantic_core_schema__(self, source_type: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        whole = source_type is int
        check = BeforeValidator(partial(_number, self.low, self.high, whole))
        bounds = Field(ge=self.low) if self.high == math.inf else Field(ge=self.low, le=self.high)
        return handler(Annotated[source_type, check, bounds])


def number(low: float, high: float = math.inf) -> Any:
    """A real number in ``[low, high]`` (ints accepted, booleans and text refused)."""
    return Annotated[float, Between(low, high)]


def integer(low: int, high: float = math.inf) -> Any:
    """A whole number in ``[low, high]`` (booleans, floats and text refused)."""
    return Annotated[int, Between(low, high)]


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def check_topic_level(value: str) -> str:
    """One MQTT topic level (device id, topic prefix): no wildcards, separators or spaces."""
    if any(c in value for c in "/+#$ \t") or len(value) > 64:
        raise ValueError(f"{value!r} cannot be an MQTT topic level (no / + # $ or spaces, max 64)")
    return value


def resolve_path(value: str, info: ValidationInfo | None) -> Path:
    """``~`` expanded; relative to the config file's folder (validation context ``base``) when one is given."""
    path = Path(os.path.expanduser(value))
    base = (info.context or {}).get("base") if info is not None else None
    return path if path.is_absolute() or base is None else Path(base) / path


def _path(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, Path):
        return resolve_path(str(value), info)
    return resolve_path(_text(value), info)


def _existing(value: Path) -> Path:
    if not value.exists():
        raise ValueError(f"{value} does not exist")
    return value


Text = Annotated[str, BeforeValidator(_text)]
Flag = Annotated[bool, BeforeValidator(_flag)]
TopicLevel = Annotated[str, BeforeValidator(_text), AfterValidator(check_topic_level)]
#: A path in the config: relative paths are relative to the config file's folder.
ConfigPath = Annotated[Path, BeforeValidator(_path)]
#: A path in the config that must exist when the config is loaded (secrets, certificates, models).
ExistingPath = Annotated[Path, BeforeValidator(_path), AfterValidator(_existing)]
