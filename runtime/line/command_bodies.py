"""The bodies of the ``cmd/*`` commands as pydantic models, validated in one place (:func:`parse_body`).

Names, ROIs and target FRRs are the shared value types of ``runtime/values.py``, so a body the
YAML config or the station would accept is accepted here, with the same message when it is not.
Bools are not numbers and numbers are not strings (strict models); a field sent as ``null`` counts
as absent; unknown fields (``token``, ``correlation_id``, ...) are ignored. Every refusal is one
line naming the field, which goes back to the client in the reply's ``error``.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from anomalygpt_edge.runtime.delivery.archive_labels import LABELS, MAX_NOTE_CHARS, MAX_VERDICT_ID_CHARS
from anomalygpt_edge.runtime.recipes.store import DEFECT_TYPE
from anomalygpt_edge.runtime.values import Name, Roi, TargetFrr

ENROLL_ACTIONS = ("start", "add", "add_defect", "remove", "finish", "cancel")
RECIPE_ACTIONS = ("list", "show", "switch", "rollback", "versions", "propose", "apply", "discard", "pending")
#: A defect's mask is a list of rectangles: a few boxes outline any defect a technician can name,
#: and the bound keeps rasterising (and the payload) small whatever a client sends.
MAX_MASK_RECTS = 32
Rect = tuple[int, int, int, int]


class CommandError(ValueError):
    """A command that cannot be carried out; the message goes back in the reply's ``error``."""


def _one_of(choices: tuple[str, ...], field: str = "action") -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{field} must be one of {', '.join(choices)}, got '{value[:40]}'")
        return value

    return AfterValidator(check)


def _defect_type(value: str) -> str:
    if not DEFECT_TYPE.match(value):
        raise ValueError(f"field 'defect_type' {value[:40]!r} is invalid: letters, digits, ' ', '_', '.', '-' (max 64)")
    return value


def _is_pixel(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _mask_rects(value: Any) -> list[Rect]:
    """The ``mask`` of ``add_defect``: 1..MAX_MASK_RECTS rectangles [x, y, w, h] in camera pixels."""
    if not isinstance(value, list) or not value:
        raise ValueError("field 'mask' must be a non-empty list of rectangles [x, y, w, h] in camera pixels")
    if len(value) > MAX_MASK_RECTS:
        raise ValueError(f"field 'mask' has {len(value)} rectangles; at most {MAX_MASK_RECTS}")
    rects = []
    for i, r in enumerate(value):
        ok = isinstance(r, list) and len(r) == 4 and all(_is_pixel(v) for v in r)
        if not ok or r[0] < 0 or r[1] < 0 or r[2] <= 0 or r[3] <= 0:
            raise ValueError(
                f"field 'mask' rectangle {i} must be [x, y, w, h] whole camera pixels, x, y >= 0, w, h > 0; "
                f"got {json.dumps(r)[:60]}"
            )
        rects.append((r[0], r[1], r[2], r[3]))
    return rects


EnrollAction = Annotated[str, _one_of(ENROLL_ACTIONS)]
RecipeAction = Annotated[str, _one_of(RECIPE_ACTIONS)]
DefectType = Annotated[str, AfterValidator(_defect_type)]
LabelName = Annotated[str, _one_of(LABELS, "label")]
MaskRects = Annotated[list[Rect], BeforeValidator(_mask_rects)]


class Body(BaseModel):
    """A command body: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class TriggerBody(Body):
    """``cmd/trigger``: the camera and the PLC's optional part id."""

    camera: str
    part_id: str | int | None = None


class EnrollBody(Body):
    """``cmd/enroll`` with the fields every action has (``add`` and ``cancel`` need no more)."""

    action: EnrollAction
    camera: str


class EnrollStart(EnrollBody):
    """``start``: the recipe to open or create, with its ROI and target FRR when new."""

    action: Literal["start"]
    recipe: Name
    roi: Roi | None = None
    target_frr: TargetFrr | None = None


class AddDefect(EnrollBody):
    """``add_defect``: an optional defect type and rectangle mask."""

    action: Literal["add_defect"]
    defect_type: DefectType | None = None
    mask: MaskRects | None = None


class RemoveDefect(EnrollBody):
    """``remove``: the label (or sha256 prefix) of the defect to remove."""

    action: Literal["remove"]
    name: str


class EnrollFinish(EnrollBody):
    """``finish``: accept flagged frames? switch the camera to the recipe (default yes)?"""

    action: Literal["finish"]
    accept_flagged: bool | None = None
    switch: bool | None = None


ENROLL_BODIES: dict[str, type[EnrollBody]] = {
    "start": EnrollStart,
    "add": EnrollBody,
    "add_defect": AddDefect,
    "remove": RemoveDefect,
    "finish": EnrollFinish,
    "cancel": EnrollBody,
}


class RecipeBody(Body):
    """``cmd/recipe`` ``list`` (no more fields)."""

    action: RecipeAction


class RecipeShow(RecipeBody):
    """``show``: the recipe to show."""

    recipe: Name


class RecipeSwitch(RecipeBody):
    """``switch``: the camera and the recipe it switches to."""

    camera: str
    recipe: Name


class RecipeVersions(RecipeBody):
    """``versions``: the recipe whose live and kept versions are listed."""

    recipe: Name


class RecipeRollback(RecipeBody):
    """``rollback``: the recipe, and the kept bank version to make live (default: the previous one)."""

    recipe: Name
    version: Annotated[int, Field(ge=0, le=999_999_999)] | None = None


class RecipePropose(RecipeBody):
    """``propose`` / ``discard`` / ``pending``: the recipe whose labels are learned from (or whose proposal is
    dropped, or shown)."""

    recipe: Name


class RecipeApply(RecipeBody):
    """``apply``: the recipe, optionally the bank version the proposal must be on, and why (audited)."""

    recipe: Name
    expect_base_version: Annotated[int, Field(ge=0, le=999_999_999)] | None = None
    reason: Annotated[str, Field(min_length=1, max_length=200)] | None = None


RECIPE_BODIES: dict[str, type[RecipeBody]] = {
    "list": RecipeBody,
    "show": RecipeShow,
    "switch": RecipeSwitch,
    "rollback": RecipeRollback,
    "versions": RecipeVersions,
    "propose": RecipePropose,
    "apply": RecipeApply,
    "discard": RecipePropose,
    "pending": RecipePropose,
}


class AskBody(Body):
    """``cmd/ask``: the camera whose last verdict is asked about, and the question."""

    camera: str
    question: str | None = None


class LabelBody(Body):
    """``cmd/label``: the archived verdict's id, ``good`` or ``defect``, an optional defect type and note."""

    id: Annotated[str, Field(min_length=1, max_length=MAX_VERDICT_ID_CHARS)]
    label: LabelName
    defect_type: DefectType | None = None
    note: Annotated[str, Field(max_length=MAX_NOTE_CHARS)] | None = None
    request_id: Annotated[str, Field(max_length=128)] | None = None


B = TypeVar("B", bound=Body)


def parse_body(model: type[B], data: dict[str, Any]) -> B:
    """``data`` as ``model``; :class:`CommandError` naming the first field that is wrong."""
    present = {k: v for k, v in data.items() if v is not None}  # null is "not sent"
    try:
        return model.model_validate(present)
    except ValidationError as exc:
        raise CommandError(_message(model, present, exc.errors()[0])) from None


def enroll_body(data: dict[str, Any]) -> EnrollBody:
    """The ``cmd/enroll`` body for its action (the action itself checked first)."""
    action = parse_body(EnrollBody, data).action
    return parse_body(ENROLL_BODIES[action], data)


def recipe_body(data: dict[str, Any]) -> RecipeBody:
    """The ``cmd/recipe`` body for its action (the action itself checked first)."""
    action = parse_body(RecipeBody, data).action
    return parse_body(RECIPE_BODIES[action], data)


def _message(model: type[Body], data: dict[str, Any], error: Any) -> str:
    name = str(error["loc"][0]) if error["loc"] else "body"
    kind = error["type"]
    if kind == "missing":
        return f"missing field '{name}'"
    if kind == "value_error":
        text = str(error.get("ctx", {}).get("error") or error["msg"])
        return text if text.startswith((f"{name} ", "field '")) else f"field '{name}': {text}"
    if kind.endswith("_type") and name in model.model_fields:
        value = data.get(name)
        try:
            shown = json.dumps(value)[:40]
        except (TypeError, ValueError):
            shown = repr(value)[:40]
        names = " or ".join(_kind_names(model.model_fields[name].annotation))
        return f"field '{name}' must be {names}, got {type(value).__name__} {shown}"
    return f"field '{name}': {error['msg']}"


def _kind_names(annotation: Any) -> list[str]:
    """``str | int | None`` -> ``["str", "int"]``; Annotated types by their base; floats as numbers."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _kind_names(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [n for a in typing.get_args(annotation) if a is not type(None) for n in _kind_names(a)]
    if annotation is float:
        return ["number"]
    base = origin or annotation
    return [getattr(base, "__name__", str(base))]
