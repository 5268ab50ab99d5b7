"""``anomalygpt-edge evaluate``: the k-shot protocol over one or more MVTec-layout datasets.

Per dataset and seed, K golden images are drawn from ``train/good`` and enrolled exactly as on the
line (bank, leave-one-out quality check, automatic threshold); with ``--defects N``, N defective
test images (with their masks where the dataset has them) are moved from the test set into
enrollment as labelled defects, which trains the recipe's defect head. Every remaining test image
is then inspected. Reported per dataset and as the mean over datasets: image AUROC, pixel AUROC
and AUPRO (``n/a`` where the dataset has no ``ground_truth/``), and at the automatic threshold the
false-reject rate (good test parts called NG), the escape rate (defective parts called OK) and
accuracy; for reference also the escape rate at the threshold that gives 1 % false rejects on the
test goods (an oracle no line has, showing how much is ranking and how much is threshold).

An image that cannot be read is named on stderr, skipped and counted (``skipped`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import ImageError, list_images, read_image
from anomalygpt_edge.progress import Progress, note
from anomalygpt_edge.runtime.evaluation import accuracy as metrics

# The report (tables, curves, heatmap grids) is a module of its own.
from anomalygpt_edge.runtime.evaluation.report import text_table, write_report, write_section
from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline
from anomalygpt_edge.runtime.inspection.verdict import Verdict
from anomalygpt_edge.runtime.recipes.enrollment import Enroller, LabelledImage
from anomalygpt_edge.runtime.recipes.inspector import Inspector
from anomalygpt_edge.runtime.recipes.store import RecipeStore

__all__ = ["run", "scan_dataset", "load_mask", "evaluate_dataset", "write_report", "write_section"]

#: Pixel metrics are computed on maps and masks scaled so the longer side is at most this.
PIXEL_EVAL_SIDE = 256
#: The oracle operating point reported beside the automatic threshold.
ORACLE_FRR = 0.01
FIGURES = ("image_auroc", "pixel_auroc", "aupro", "false_reject_rate", "escape_rate", "escape_at_1pct_frr", "accuracy")


class DatasetError(ValueError):
    """The dataset folder does not follow the MVTec layout; the message names the file or folder."""


@dataclass(frozen=True)
class TestImage:
    path: Path
    defect: str  # "good" or the defect folder name
    mask: Path | None  # None for goods and for defects of a set without pixel ground truth


@dataclass
class Dataset:
    """An MVTec-layout folder: golden candidates, test images, and what it lacks."""

    root: Path
    train: list[Path]
    tests: list[TestImage]
    has_masks: bool
    notes: list[str] = field(default_factory=list)


def scan_dataset(root: Path) -> Dataset:
    """Golden candidates and test images of an MVTec-layout folder.

    ``ground_truth/`` is optional: without it (image-level labels only) pixel metrics are n/a. With
    it, a defect image whose mask is missing is still evaluated at image level, and named in notes.
    """
    root = Path(root)
    if not (root / "train" / "good").is_dir():
        raise DatasetError(f"{root}: missing train/good/ (MVTec layout expected)")
    if not (root / "test").is_dir():
        raise DatasetError(f"{root}: missing test/")
    train = list_images(root / "train" / "good")
    tests: list[TestImage] = []
    notes: list[str] = []
    gt = root / "ground_truth"
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        for img in list_images(folder):
            if folder.name == "good":
                tests.append(TestImage(img, "good", None))
                continue
            mask = gt / folder.name / f"{img.stem}_mask.png"
            if gt.is_dir() and not mask.is_file():
                notes.append(f"{img}: no mask at {mask}; image-level metrics only")
            tests.append(TestImage(img, folder.name, mask if mask.is_file() else None))
    if not any(t.defect == "good" for t in tests) or all(t.defect == "good" for t in tests):
        raise DatasetError(f"{root}: test/ needs both good/ and at least one defect folder")
    return Dataset(root, train, tests, any(t.mask is not None for t in tests), notes)


def load_mask(test: TestImage, shape: tuple[int, int]) -> np.ndarray:
    """Boolean defect mask (value > 127) of the image's size; clear errors for bad masks."""
    if test.mask is None:
        return np.zeros(shape, bool)
    mask = read_image(test.mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != shape:
        raise DatasetError(f"{test.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}")
    return mask > 127


def _downscale(a: np.ndarray, interp: int) -> np.ndarray:
    h, w = a.shape
    s = min(1.0, PIXEL_EVAL_SIDE / max(h, w))
    if s >= 1.0:
        return a
    return cv2.resize(a, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


@dataclass(frozen=True)
class Protocol:
    """What one evaluation run does per seed."""

    shots: int
    defects: int = 0
    target_frr: float | None = None
    resize: str | None = None
    augment: tuple[str, ...] = ()


class Skips:
    """Unreadable images: named once on stderr, counted, never fatal."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    def read(self, path: Path, mask: TestImage | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            image = read_image(path)
            return image, (load_mask(mask, image.shape[:2]) if mask is not None else np.zeros(image.shape[:2], bool))
        except ImageError as exc:
            if str(path) not in self.items:
                note(f"[evaluate] skipped {path}: {exc}")  # above the progress bar, not through it
            self.items[str(path)] = str(exc)
            return None


def _enroll(enroller: Enroller, golden: list[Path], defects: list[TestImage], skips: Skips):
    goods = [(p.name, r[0]) for p in golden if (r := skips.read(p)) is not None]
    if len(goods) < 2:
        raise DatasetError("fewer than 2 readable golden images")
    result = enroller.add("eval", goods, accept_flagged=True)
    labelled = []
    for t in defects:
        r = skips.read(t.path, t)
        if r is not None:
            mask = r[1] if t.mask is not None and r[1].any() else None  # an empty mask teaches no region
            labelled.append(LabelledImage(t.path.name, r[0], mask, t.defect))
    if labelled:
        result = enroller.add_defects("eval", labelled, accept_flagged=True)
    return result


def _inspect_tests(inspector: Inspector, tests: list[TestImage], skips: Skips, bar: Progress) -> tuple:
    """Verdicts of the test images in batches of 8: per-image rows, downscaled maps and masks, examples."""
    rows: dict[str, list] = {k: [] for k in ("scores", "labels", "defects", "verdicts", "has_mask")}
    pix_maps: list[np.ndarray] = []
    pix_masks: list[np.ndarray] = []
    examples: list[tuple[TestImage, np.ndarray, Verdict]] = []
    for i in range(0, len(tests), 8):
        chunk = [(t, r) for t in tests[i : i + 8] if (r := skips.read(t.path, t)) is not None]
        verdicts = inspector.inspect_batch([r[0] for _, r in chunk], [t.path.name for t, _ in chunk]) if chunk else []
        bar.update(len(tests[i : i + 8]))
        for (t, (image, mask)), v in zip(chunk, verdicts):
            if v.anomaly_map is None:  # an ERROR verdict (its score is not a number): nothing to evaluate
                raise ValueError(f"{t.path}: {v.reason}")
            rows["scores"].append(v.score)
            rows["labels"].append(t.defect != "good")
            rows["defects"].append(t.defect)
            rows["verdicts"].append(v.verdict)
            rows["has_mask"].append(t.defect == "good" or t.mask is not None)
            pix_maps.append(_downscale(v.anomaly_map, cv2.INTER_AREA))
            pix_masks.append(_downscale(mask.astype(np.uint8), cv2.INTER_NEAREST) > 0)
            if len(examples) < 64:
                examples.append((t, image, v))
    return rows, pix_maps, pix_masks, examples


def run_seed(
    bundle: EngineBundle, pipeline: VisionPipeline, data: Dataset, protocol: Protocol, seed: int, skips: Skips
) -> dict:
    """Enroll K golden (and N labelled defect) images drawn with ``seed``, inspect the rest, return raw results."""
    rng = np.random.default_rng(seed)
    golden = [data.train[i] for i in sorted(rng.choice(len(data.train), size=protocol.shots, replace=False))]
    tests = list(data.tests)
    bad = [i for i, t in enumerate(tests) if t.defect != "good"]
    picked = (
        set(rng.choice(bad, size=min(protocol.defects, len(bad)), replace=False).tolist())
        if protocol.defects
        else set()
    )
    labelled = [tests[i] for i in sorted(picked)]
    tests = [t for i, t in enumerate(tests) if i not in picked]
    with tempfile.TemporaryDirectory(prefix="agpt-eval-") as tmp:
        store = RecipeStore(tmp)
        enroller = Enroller(store, bundle, pipeline)
        settings: dict = {"augment": protocol.augment}
        if protocol.resize:
            settings["resize"] = protocol.resize
        if protocol.target_frr:
            settings["target_frr"] = protocol.target_frr
        enroller.create("eval", **settings)
        t0 = time.perf_counter()
        result = _enroll(enroller, golden, labelled, skips)
        enroll_s = time.perf_counter() - t0
        inspector = Inspector(bundle, result.recipe, store, pipeline)
        with Progress(len(tests), f"evaluate {data.root.name} seed {seed}", "image") as bar:
            rows, pix_maps, pix_masks, examples = _inspect_tests(inspector, tests, skips, bar)
    return {
        "seed": seed,
        "golden": [p.name for p in golden],
        "labelled_defects": [t.path.name for t in labelled],
        "enroll_seconds": enroll_s,
        "threshold": result.threshold.to_json() if result.threshold else None,
        "expectation": result.expectation,
        "head": result.head,
        "flagged": [f["name"] for f in result.quality.flagged] if result.quality else [],
        **{k: np.array(v) for k, v in rows.items()},
        "pix_maps": pix_maps,
        "pix_masks": pix_masks,
        "examples": examples,
    }


def escape_at_frr(scores: np.ndarray, labels: np.ndarray, frr: float = ORACLE_FRR) -> float:
    """Escape rate at the lowest threshold whose false-reject rate on the goods is at most ``frr``."""
    good, bad = np.sort(scores[~labels]), scores[labels]
    if not good.size or not bad.size:
        return float("nan")
    t = good[max(0, math.ceil((1 - frr) * good.size) - 1)]
    return float((bad <= t).mean())


def seed_metrics(r: dict, with_pixels: bool) -> dict:
    """Overall and per-defect figures of one seed."""

    def figures(sel: np.ndarray) -> dict:
        y, s, v = r["labels"][sel], r["scores"][sel], r["verdicts"][sel]
        pixel = sel & r["has_mask"]
        maps = [m for m, k in zip(r["pix_maps"], pixel) if k]
        masks = [m for m, k in zip(r["pix_masks"], pixel) if k]
        has_pixels = with_pixels and any(m.any() for m in masks)
        ng = v == "NG"
        good = ~y
        return {
            "image_auroc": metrics.auroc(s, y),
            "pixel_auroc": metrics.auroc(
                np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
            )
            if has_pixels
            else float("nan"),
            "aupro": metrics.aupro(maps, masks) if has_pixels else float("nan"),
            "false_reject_rate": float(ng[good].mean()) if good.any() else float("nan"),
            "escape_rate": float((~ng[y]).mean()) if y.any() else float("nan"),
            "escape_at_1pct_frr": escape_at_frr(s, y),
            "accuracy": float((ng == y).mean()),
        }

    out = {"overall": figures(np.ones(len(r["labels"]), bool)), "per_defect": {}}
    for d in sorted(set(r["defects"]) - {"good"}):
        out["per_defect"][d] = figures((r["defects"] == "good") | (r["defects"] == d))
    return out


def _mean_std(values: list[dict]) -> dict:
    keys = values[0].keys()

    def stat(k: str, fn) -> float:
        v = np.array([x[k] for x in values], float)
        return float(fn(v)) if np.isfinite(v).any() else float("nan")

    return {k: {"mean": stat(k, np.nanmean), "std": stat(k, np.nanstd)} for k in keys}


def evaluate_dataset(bundle: EngineBundle, pipeline: VisionPipeline, data: Dataset, protocol: Protocol, seeds: int):
    """Every seed of one dataset; returns the JSON summary (today's keys) and the raw first seed."""
    if not 1 <= protocol.shots <= len(data.train):
        raise DatasetError(f"{data.root}: --shots must be between 1 and {len(data.train)} (images in train/good)")
    skips = Skips()
    per_seed, first = [], None
    for seed in range(seeds):
        t0 = time.perf_counter()
        r = run_seed(bundle, pipeline, data, protocol, seed, skips)
        m = seed_metrics(r, data.has_masks)
        first = first or r
        per_seed.append(
            {
                "seed": seed,
                "threshold": r["threshold"],
                "expectation": r["expectation"],
                "head": r["head"],
                "labelled_defects": r["labelled_defects"],
                "flagged_golden": r["flagged"],
                "enroll_seconds": r["enroll_seconds"],
                **m,
            }
        )
        o = m["overall"]
        print(
            f"[evaluate] {data.root.name} seed {seed}: image AUROC {o['image_auroc']:.4f}  pixel AUROC "
            f"{_fmt(o['pixel_auroc'])}  FRR {100 * o['false_reject_rate']:.1f}%  escape "
            f"{100 * o['escape_rate']:.1f}%  ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    overall = _mean_std([p["overall"] for p in per_seed])
    defects = sorted(per_seed[0]["per_defect"])
    summary = {
        "dataset": str(data.root),
        "shots": protocol.shots,
        "defects": protocol.defects,
        "seeds": seeds,
        "bundle_sha256": bundle.sha256,
        "bundle_source": bundle.manifest.source.get("kind"),
        "n_test": len(data.tests) - min(protocol.defects, sum(t.defect != "good" for t in data.tests)),
        "pixel_ground_truth": data.has_masks,
        "skipped": [{"path": p, "reason": why} for p, why in skips.items.items()],
        "notes": data.notes,
        **{k: v["mean"] for k, v in overall.items()},
        "overall": overall,
        "per_defect": {d: _mean_std([p["per_defect"][d] for p in per_seed]) for d in defects},
        "per_seed": per_seed,
    }
    return summary, first


def _fmt(v: float, pct: bool = False) -> str:
    if not np.isfinite(v):
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def _row(name: str, block: dict) -> tuple:
    return (
        name,
        *(_fmt(block[k]["mean"]) for k in ("image_auroc", "pixel_auroc", "aupro")),
        *(_fmt(block[k]["mean"], True) for k in ("false_reject_rate", "escape_rate", "escape_at_1pct_frr", "accuracy")),
    )


HEADER = ("", "image AUROC", "pixel AUROC", "AUPRO", "false reject", "escape", "escape @1% FRR", "accuracy")


def mean_over_sets(summaries: list[dict]) -> dict:
    """Mean of each figure over datasets (each dataset weighs the same, whatever its size)."""
    out = {}
    for k in FIGURES:
        v = np.array([s[k] for s in summaries], float)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def run(args: argparse.Namespace) -> int:
    """Entry point of ``evaluate``."""
    roots = args.data if isinstance(args.data, list) else [args.data]
    try:
        datasets = [scan_dataset(r) for r in roots]
        if args.seeds < 1:
            raise DatasetError("--seeds must be at least 1")
        if args.defects < 0:
            raise DatasetError("--defects must be 0 or more")
        bundle = EngineBundle.open(args.bundle, backend=args.backend, precision=getattr(args, "precision", "fp32"))
    except (DatasetError, ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipeline = VisionPipeline(bundle)
    protocol = Protocol(
        args.shots, args.defects, args.target_frr, args.resize, tuple(a for a in args.augment.split(",") if a)
    )
    summaries, firsts, tables = [], [], []
    for data in datasets:
        try:
            summary, first = evaluate_dataset(bundle, pipeline, data, protocol, args.seeds)
        except (DatasetError, ImageError, ValueError) as exc:
            print(f"error: {data.root}: {exc}", file=sys.stderr)
            return 2
        rows = [HEADER, _row("overall", summary["overall"])]
        rows += [_row(d, block) for d, block in summary["per_defect"].items()]
        tables.append(text_table(rows))
        print(f"\n{data.root}\n{tables[-1]}")
        summaries.append(summary)
        firsts.append(first)
    if len(summaries) == 1:
        result = summaries[0]
    else:
        mean = mean_over_sets(summaries)
        result = {"datasets": summaries, "mean": mean, **mean, "shots": args.shots, "defects": args.defects}
    rows = [HEADER] + [_row(Path(s["dataset"]).name, s["overall"]) for s in summaries]
    if len(summaries) > 1:
        rows.append(_row("mean", {k: {"mean": v} for k, v in mean_over_sets(summaries).items()}))
    summary_table = text_table(rows)
    print(f"\n{args.shots}-shot, {args.defects} labelled defects, {args.seeds} seed(s), mean over seeds:")
    print(summary_table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_finite(result), indent=2, default=_json_default) + "\n")
    if args.report:
        write_report(args.report, summaries, firsts, tables, summary_table)
    return 0


def _finite(value):
    """n/a figures (NaN) as JSON null: strict JSON has no NaN, and null reads as "not applicable"."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
