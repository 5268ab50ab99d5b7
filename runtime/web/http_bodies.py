"""The station's HTTP request bodies as pydantic models, validated in one place (:func:`validate`).

Recipe and camera names, ROIs and the target false-reject rate are :mod:`runtime.values`' shared
types, so the page accepts exactly what the CLI, the YAML config and the MQTT commands accept.
Validation is strict (``"0.1"`` is not a number, ``true`` is not a pixel) and unknown keys are
ignored; a refusal is one line that names the field, answered with 400.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from anomalygpt_edge.runtime.values import Name, Roi, TargetFrr
from anomalygpt_edge.runtime.web.http_base import HttpError


def _blank_is_none(value: Any) -> Any:
    # The page sends "" for an unset select: the same as leaving the field out.
    return None if value == "" else value


def _base64(value: Any) -> bytes:
    """Base64 text, or a ``data:`` URL as a browser's FileReader/canvas gives it, as bytes."""
    if not isinstance(value, str):
        raise ValueError("must be base64 text")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not base64") from None


OptionalName = Annotated[Name | None, BeforeValidator(_blank_is_none)]
#: A sample or defect file name as uploaded: anything but a path.
FileName = Annotated[str, Field(pattern=r"^[^/\\]{1,200}$")]
DefectType = Annotated[
    str | None, BeforeValidator(_blank_is_none), Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_ .-]{0,63}$")
]
Base64 = Annotated[bytes, BeforeValidator(_base64)]
VerdictId = Annotated[str, Field(pattern=r"^[0-9a-f-]{8,64}$")]
UserName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class Body(BaseModel):
    """Strict, unknown keys ignored, frozen once validated."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class LoginBody(Body):
    username: str
    password: str


class EmptyBody(Body):
    pass


class EnrollStartBody(Body):
    recipe: Name
    camera: OptionalName = None
    roi: Roi | None = None
    target_frr: TargetFrr | None = None
    augment: list[str] | None = None


class RecipeCameraBody(Body):
    recipe: Name
    camera: Name


class UploadFile(Body):
    name: str
    data: Base64


class EnrollUploadBody(Body):
    recipe: Name
    files: list[UploadFile] = Field(min_length=1)


class SampleBody(Body):
    recipe: Name
    sample: FileName


class EnrollFinishBody(Body):
    recipe: Name
    camera: OptionalName = None
    accept_flagged: bool = False


class DefectFile(UploadFile):
    mask: Base64 | None = None
    defect_type: DefectType = None


class DefectUploadBody(Body):
    recipe: Name
    files: list[DefectFile] = Field(min_length=1)


class DefectCaptureBody(RecipeCameraBody):
    defect_type: DefectType = None


class DefectMarkBody(SampleBody):
    mask: Base64 | None = None
    defect_type: DefectType = None


class DefectRemoveBody(Body):
    recipe: Name
    defect: FileName


class AssignBody(Body):
    camera: Name
    recipe: OptionalName = None


class RecipeBody(Body):
    recipe: Name


class AskBody(Body):
    verdict_id: VerdictId
    question: str = Field(default="", max_length=1000)
    conversation: Annotated[str | None, BeforeValidator(_blank_is_none), Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None


class LabelBody(Body):
    """``POST /api/verdicts/<id>/label``: ``good`` or ``defect``, an optional defect type and note."""

    label: Literal["good", "defect"]
    defect_type: DefectType = None
    note: Annotated[str | None, BeforeValidator(_blank_is_none), Field(max_length=500)] = None


#: A bank version number as the store writes them (never reused; 0 before the first bank).
BankVersion = Annotated[int, Field(ge=0, le=1_000_000_000)]


class ProposeBody(Body):
    """``POST /api/recipes/<name>/proposal``: nothing to send; the labels come from the daemon's archive."""


class ApplyProposalBody(Body):
    """``POST /api/recipes/<name>/proposal/apply``: why (kept in the recipe's change record), and the
    bank version the proposal on the page was computed on (another one pending by then: 409)."""

    reason: Annotated[Annotated[str, Field(max_length=500)] | None, BeforeValidator(_blank_is_none)] = None
    base_bank_version: BankVersion | None = None


class RollbackBody(Body):
    """``POST /api/recipes/<name>/rollback``: the kept version to make live (none: the previous one)."""

    version: BankVersion | None = None


class UsersBody(Body):
    action: Literal["set", "remove"]
    name: UserName
    role: UserName | None = None
    password: str | None = None

    @model_validator(mode="after")
    def _set_needs_role_and_password(self) -> UsersBody:
        if self.action == "set" and (self.role is None or self.password is None):
            raise ValueError("role and password are required to set a user")
        return self


def validate(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    """``data`` as ``model``; :class:`HttpError` 400 with one line naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise HttpError(400, _one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    error = first.get("ctx", {}).get("error")
    message = str(error) if error is not None else first["msg"]
    return f"'{where}': {message}"[:300]
