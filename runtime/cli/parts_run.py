"""Implementations of ``enroll``, ``calibrate`` and ``inspect`` (see runtime/cli/parts.py for arguments)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from anomalygpt_edge.atomic_files import atomic_write_bytes
from anomalygpt_edge.calibration.threshold import refine_with_labels
from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import ImageError, crop_roi, list_images, read_image
from anomalygpt_edge.progress import Progress
from anomalygpt_edge.runtime.cli import first_run
from anomalygpt_edge.runtime.inspection.heatmap import overlay
from anomalygpt_edge.runtime.recipes.enrollment import Enroller, EnrollmentResult, LabelledImage
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import RecipeError, RecipeStore


def _bundle_for(args: argparse.Namespace, store: RecipeStore) -> EngineBundle:
    """``--bundle``, else the recipe's, else the default; the default is exported first on a first run."""
    if args.bundle is not None:
        return EngineBundle.open(args.bundle, backend=args.backend, precision=args.precision)
    if store.exists(args.recipe):
        return EngineBundle.open(
            first_run.ready(store.load(args.recipe).bundle_path), backend=args.backend, precision=args.precision
        )
    return EngineBundle.open(first_run.ready(None), backend=args.backend, precision=args.precision)


def evaluate(args: argparse.Namespace) -> int:
    """``anomalygpt-edge evaluate``: the first run's default bundle, then runtime/evaluation/evaluate.py."""
    from anomalygpt_edge.runtime.evaluation import evaluate as evaluation

    first_run.ready(args.bundle)
    return evaluation.run(args)


def bench_vision(args: argparse.Namespace) -> int:
    """``anomalygpt-edge bench vision``: the first run's default bundle, then export/bench_vision.py."""
    first_run.ready(args.bundle)
    try:
        from anomalygpt_edge.export import bench_vision as bench
    except ModuleNotFoundError as exc:  # the PyTorch side of the bench: the same line the CLI gives any torch command
        if exc.name not in ("torch", "onnx"):
            raise
        return _fail(f"bench vision needs {exc.name}; install the [export] extra")
    return bench.run(args)


def _read_all(paths: list[Path], what: str) -> list[tuple[str, np.ndarray]]:
    """Every image decoded (name, pixels), with a progress bar: a bad file fails before the store is touched."""
    with Progress(len(paths), what, "image") as bar:
        out = []
        for p in paths:
            out.append((p.name, read_image(p)))
            bar.update()
    return out


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def print_enrollment(result: EnrollmentResult, as_json: bool) -> None:
    """Human summary (or JSON) of an enrollment step."""
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    r = result.recipe
    print(
        f"recipe {r.name}: {len(r.samples)} golden samples, {len(r.defects)} labelled defects, bank v{r.bank_version}, "
        f"{'LIVE' if r.live else 'NOT LIVE'}  ({result.seconds:.2f} s)"
    )
    for name in result.added:
        print(f"  added   {name}")
    for note in result.skipped:
        print(f"  skipped {note}")
    if result.bank:
        b = result.bank
        print(
            f"  bank: {b['kept_patches']} of {b['total_patches']} patches"
            f"{' (coreset)' if b['subsampled'] else ''}, {b['bytes'] / 1e6:.1f} MB"
        )
    q = result.quality
    if q is not None:
        print(f"  quality check ({q.method}): {'passed' if q.ok else 'FAILED'}")
        for f in q.flagged:
            print(f"    FLAGGED {f['name']}: {f['reason']}")
        if q.inconsistent:
            print(f"    INCONSISTENT: {q.inconsistent}")
        if not q.ok and not r.live:
            print("    remove the flagged sample(s) with --remove NAME, or pass --accept-flagged to go live anyway")
    t = result.threshold
    if t is not None:
        print(f"  threshold {t.value:.5g} ({t.method}, target false-reject {100 * t.target_frr:g}%)")
        for w in t.warnings:
            print(f"    WARNING: {w}")
        print(f"  {t.explain()}")
    if result.head:
        h = result.head
        kind = "masks" if h["mode"] == "mask" else "no masks: multiple-instance"
        print(
            f"  defect head: {len(r.defects)} labelled defects ({kind}), {h['folds']}-fold cross-fitted, "
            f"trained in {h['seconds']:.2f} s"
        )
    if result.expectation.get("explained"):
        print(f"  expected on the line: {result.expectation['explained']}")
    if t is None and r.samples:
        print("  no threshold yet: enroll at least two golden parts")


class _EnrollBars:
    """Enrollment's ``on_progress(stage, done, total)`` as one progress bar per stage, each opened as it starts."""

    UNITS = {"encoding": "image", "defects": "image", "memory bank": "patch"}

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar: Progress | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage or self.bar is None:
            self.close()
            self.stage, self.bar = stage, Progress(total, f"enroll: {stage}", self.UNITS.get(stage, "step"))
        self.bar.report(done, total)

    def close(self) -> None:
        """End the open stage's bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> _EnrollBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def enroll(args: argparse.Namespace) -> int:
    """``anomalygpt-edge enroll``: create/extend a recipe, or remove a golden sample."""
    store = RecipeStore(args.store)
    try:
        defects_dir = getattr(args, "defects", None)
        if args.images is None and args.remove is None and defects_dir is None:
            return _fail("enroll needs --images DIR (golden parts), --defects DIR (known-defective parts) or --remove")
        # Decode every image before touching the store: a bad file must not leave half an enrollment.
        images = _read_all(list_images(args.images), "enroll: reading") if args.images else []
        defects = read_defects(defects_dir, getattr(args, "defect_type", None)) if defects_dir else []
        bundle = _bundle_for(args, store)
        enroller = Enroller(store, bundle)
        settings = {
            "source": args.source,
            "roi": args.roi,
            "resize": args.resize,
            "augment": tuple(a for a in args.augment.split(",") if a),
            "class_name": args.class_name,
        }
        if args.target_frr is not None:
            settings["target_frr"] = args.target_frr
        if args.budget is not None:
            settings["bank_budget"] = args.budget
        enroller.open_or_create(args.recipe, **settings)
        if args.remove:
            result = enroller.remove(args.recipe, args.remove, args.accept_flagged)
        if images:
            with _EnrollBars() as bars:
                result = enroller.add(args.recipe, images, args.accept_flagged, on_progress=bars)
        if defects:
            with _EnrollBars() as bars:
                result = enroller.add_defects(args.recipe, defects, args.accept_flagged, on_progress=bars)
    except (ImageError, RecipeError, ValueError) as exc:
        return _fail(str(exc))
    print_enrollment(result, args.json)
    return 0 if result.recipe.live else 3


MASK_SUFFIX = "_mask"


def read_defects(path: Path, defect_type: str | None = None) -> list[LabelledImage]:
    """Known-defective images of a folder (or one file), each with ``NAME_mask.png`` beside it if present.

    Also accepts the MVTec layout's mask folder (``ground_truth/<type>/NAME_mask.png`` two levels up).
    """
    files = [p for p in list_images(path) if not p.stem.endswith(MASK_SUFFIX)]
    if not files:
        raise ImageError(f"{path}: only mask files, no defect images")
    out = []
    for p in files:
        candidates = [p.with_name(f"{p.stem}{MASK_SUFFIX}.png")]
        candidates.append(p.parent.parent.parent / "ground_truth" / p.parent.name / f"{p.stem}{MASK_SUFFIX}.png")
        mask_path = next((c for c in candidates if c.is_file()), None)
        mask = read_image(mask_path) if mask_path is not None else None
        out.append(LabelledImage(p.name, read_image(p), mask, defect_type))
    return out


def _labelled_sets(folder: Path) -> tuple[list[Path], list[Path]]:
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    good = list_images(folder / "good") if (folder / "good").is_dir() else []
    bad = [p for d in sorted(folder.iterdir()) if d.is_dir() and d.name != "good" for p in list_images(d)]
    if not bad and not good:
        raise ImageError(f"{folder}: needs a good/ folder and/or defect folders with images")
    return good, bad


def _scores(inspector: Inspector, paths: list[Path], bar: Progress) -> np.ndarray:
    """The recipe's score of each labelled image, one progress step each."""
    out = []
    for p in paths:
        out.append(inspector.inspect(read_image(p), p.name).score)
        bar.update()
    return np.array(out)


def calibrate(args: argparse.Namespace) -> int:
    """``anomalygpt-edge calibrate``: refit the threshold with labelled parts and report escapes."""
    store = RecipeStore(args.store)
    try:
        recipe = store.load(args.recipe)
        if recipe.threshold is None:
            raise RecipeError(f"recipe {recipe.name} is not live yet; enroll golden parts first")
        good, bad = _labelled_sets(args.labelled)
        inspector = Inspector(_bundle_for(args, store), recipe, store)
        with Progress(len(good) + len(bad), "calibrate: scoring", "image") as bar:
            good_scores, bad_scores = _scores(inspector, good, bar), _scores(inspector, bad, bar)
        golden = np.array([s.score for s in recipe.samples if s.score is not None])
        refined, report = refine_with_labels(recipe.threshold, golden, good_scores, bad_scores)
        from dataclasses import replace

        with store.writer(recipe.name):  # a concurrent enrollment may have committed since we loaded
            current = store.load(recipe.name)
            if current.bank_version != recipe.bank_version:
                raise RecipeError(
                    f"recipe {recipe.name} changed while calibrating (bank v{current.bank_version}); rerun"
                )
            recipe = store.commit(replace(current, threshold=refined))
    except (ImageError, RecipeError, ValueError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({"recipe": recipe.name, "threshold": refined.to_json(), "report": report}, indent=2))
    else:
        print(f"recipe {recipe.name}: threshold {report['threshold_before']:.5g} -> {refined.value:.5g}")
        print(f"  labelled good {report['labelled_good']}, false rejects {100 * report['false_reject_rate']:.1f}%")
        print(f"  labelled bad  {report['labelled_bad']}, escapes {100 * report['escape_rate']:.1f}%")
        print(f"  {refined.explain()}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    """``anomalygpt-edge inspect``: verdicts for image files, optionally with heatmap overlays."""
    store = RecipeStore(args.store)
    try:
        recipe = store.load(args.recipe)
        inspector = Inspector(_bundle_for(args, store), recipe, store)
    except (RecipeError, ValueError) as exc:
        return _fail(str(exc))
    failures = 0
    for path in args.images:
        try:
            image = read_image(path)
            verdict = inspector.inspect(image, path.name)
        except ImageError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        heatmap_path = None
        if args.heatmap is not None:
            ok, buf = cv2.imencode(".png", overlay(crop_roi(image, recipe.roi), verdict))
            heatmap_path = args.heatmap / f"{path.stem}.heatmap.png"
            atomic_write_bytes(heatmap_path, buf.tobytes())
        if args.json:
            print(
                json.dumps(
                    {"image": str(path), **verdict.to_json(), "heatmap": str(heatmap_path) if heatmap_path else None}
                )
            )
        else:
            where = f"  [{', '.join(r.location for r in verdict.regions)}]" if verdict.regions else ""
            print(
                f"{verdict.verdict:5} {verdict.normalized_score:5.3f}  score {verdict.score:.4g} / "
                f"{verdict.threshold:.4g}  {path.name}{where}"
            )
            print(f"      {verdict.sentence}")
    return 1 if failures else 0


def bench_learn(args: argparse.Namespace) -> int:
    """``anomalygpt-edge bench learn``: the first run's default bundle, then runtime/tools/learn_bench.py."""
    from anomalygpt_edge.runtime.tools import learn_bench

    first_run.ready(args.bundle)
    return learn_bench.run(args)
