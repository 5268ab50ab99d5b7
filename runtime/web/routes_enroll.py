"""Recipe and enrollment routes: reading recipes and their images, and every change to them.

Each change is a *plan* (what to call on the station, its audit target and details); one handler,
:func:`changing`, runs any plan under the route's audit action. The near-twin defect routes
(upload, capture, mark: all ``enroll.defect.add``) differ only in their plans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response

from anomalygpt_edge.runtime.web import http_bodies as b
from anomalygpt_edge.runtime.web.http_base import Context, Handler, answer, json_answer
from anomalygpt_edge.runtime.web.station import DefectUpload


@dataclass(frozen=True)
class Change:
    """One audited change: the recipe (or camera) it targets, the station call, audit details."""

    target: str | None
    run: Callable[[], Any]
    details: dict[str, Any] = field(default_factory=dict)
    reply: Callable[[Any], Any] = lambda result: result


def changing(plan: Callable[[Any, Any], Change]) -> Handler:
    """The handler for a change route: plan it from the validated body, run it audited, answer JSON."""

    def handler(ctx: Context) -> Response:
        change = plan(ctx.station, ctx.body)
        result = ctx.audited(change.target, change.run, **change.details)
        return json_answer(change.reply(result))

    handler.__name__ = handler.__qualname__ = plan.__name__
    handler.__doc__ = plan.__doc__
    return handler


# --- reads ----------------------------------------------------------------------------------------


def get_recipes(ctx: Context) -> Response:
    return json_answer(ctx.station.recipes())


def get_recipe(ctx: Context, name: str) -> Response:
    return json_answer(ctx.station.recipe(name))


def get_sample(ctx: Context, name: str, sha: str) -> Response:
    return answer(200, ctx.station.sample_png(name, sha), "image/png")


def get_defect(ctx: Context, name: str, sha: str) -> Response:
    return answer(200, ctx.station.defect_png(name, sha), "image/png")


def get_defect_mask(ctx: Context, name: str, sha: str) -> Response:
    return answer(200, ctx.station.defect_png(name, sha, mask=True), "image/png")


# --- change plans ---------------------------------------------------------------------------------


def enroll_start(st: Any, body: b.EnrollStartBody) -> Change:
    """Start (or reopen) enrolling a recipe: ROI, target false-reject rate, augmentations."""
    settings: dict[str, Any] = {}
    if body.target_frr is not None:
        settings["target_frr"] = body.target_frr
    if body.augment:
        settings["augment"] = tuple(body.augment)
    return Change(
        body.recipe,
        lambda: st.enroll_start(body.recipe, body.camera, body.roi, **settings),
        {"camera": body.camera, "roi": body.roi},
    )


def enroll_capture(st: Any, body: b.RecipeCameraBody) -> Change:
    """Add the camera's current frame as a golden sample."""
    return Change(body.recipe, lambda: st.enroll_capture(body.recipe, body.camera), {"camera": body.camera})


def enroll_upload(st: Any, body: b.EnrollUploadBody) -> Change:
    """Add uploaded images as golden samples."""
    files = [(f.name, f.data) for f in body.files]
    return Change(body.recipe, lambda: st.enroll_upload(body.recipe, files), {"files": [n for n, _ in files]})


def enroll_remove(st: Any, body: b.SampleBody) -> Change:
    """Remove one golden sample."""
    return Change(body.recipe, lambda: st.enroll_remove(body.recipe, body.sample), {"sample": body.sample})


def enroll_finish(st: Any, body: b.EnrollFinishBody) -> Change:
    """Build the memory bank and threshold and put the recipe live (on the camera, when named)."""
    return Change(
        body.recipe,
        lambda: st.enroll_finish(body.recipe, body.camera, body.accept_flagged),
        {"camera": body.camera, "accept_flagged": body.accept_flagged},
    )


def defect_upload(st: Any, body: b.DefectUploadBody) -> Change:
    """Add uploaded labelled defective parts, each with an optional painted mask."""
    uploads = [DefectUpload(f.name, f.data, f.mask, f.defect_type) for f in body.files]
    details = {"files": [u.name for u in uploads], "masked": [u.name for u in uploads if u.mask is not None]}
    return Change(body.recipe, lambda: st.enroll_defect_upload(body.recipe, uploads), details)


def defect_capture(st: Any, body: b.DefectCaptureBody) -> Change:
    """Add the camera's current frame as a labelled defective part."""
    return Change(
        body.recipe,
        lambda: st.enroll_defect_capture(body.recipe, body.camera, body.defect_type),
        {"camera": body.camera, "defect_type": body.defect_type},
    )


def defect_mark(st: Any, body: b.DefectMarkBody) -> Change:
    """Turn a golden sample into a labelled defective part (with the mask painted on it)."""
    return Change(
        body.recipe,
        lambda: st.enroll_defect_mark(body.recipe, body.sample, body.mask, body.defect_type),
        {"from_sample": body.sample, "masked": body.mask is not None, "defect_type": body.defect_type},
    )


def defect_remove(st: Any, body: b.DefectRemoveBody) -> Change:
    """Remove one labelled defective part."""
    return Change(body.recipe, lambda: st.enroll_defect_remove(body.recipe, body.defect), {"defect": body.defect})


def assign(st: Any, body: b.AssignBody) -> Change:
    """Inspect a camera's parts with a recipe (or none)."""
    return Change(body.recipe, lambda: st.assign(body.camera, body.recipe), {"camera": body.camera})


def delete_recipe(st: Any, body: b.RecipeBody) -> Change:
    """Delete a recipe."""
    return Change(body.recipe, lambda: st.delete_recipe(body.recipe), reply=lambda _: {"deleted": body.recipe})
