"""``anomalygpt-edge evaluate``: the k-shot protocol on an MVTec-layout dataset.

Per seed, K golden images are drawn from ``train/good`` and enrolled exactly as on the line (bank,
leave-one-out quality check, automatic threshold); every test image is then inspected. Reported:
image AUROC, pixel AUROC, AUPRO, and at the automatic threshold the false-reject rate (good test
parts called NG), escape rate (defective parts called OK) and accuracy — overall and per defect
type, as the mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.runtime import metrics
from anomalygpt_edge.runtime.commands import list_images
from anomalygpt_edge.runtime.enrollment import Enroller
from anomalygpt_edge.runtime.heatmap import overlay
from anomalygpt_edge.runtime.inspector import Inspector
from anomalygpt_edge.runtime.preprocess import ImageError, read_image
from anomalygpt_edge.runtime.recipes import RecipeStore
from anomalygpt_edge.runtime.vision import VisionPipeline

#: Pixel metrics are computed on maps and masks scaled so the longer side is at most this.
PIXEL_EVAL_SIDE = 256


class DatasetError(ValueError):
    """The dataset folder does not follow the MVTec layout; the message names the file or folder."""


@dataclass(frozen=True)
class TestImage:
    path: Path
    defect: str  # "good" or the defect folder name
    mask: Path | None


def scan_dataset(root: Path) -> tuple[list[Path], list[TestImage]]:
    """Golden candidates and test images of an MVTec-layout folder, every defect image with its mask."""
    root = Path(root)
    if not (root / "train" / "good").is_dir():
        raise DatasetError(f"{root}: missing train/good/ (MVTec layout expected)")
    if not (root / "test").is_dir():
        raise DatasetError(f"{root}: missing test/")
    train = list_images(root / "train" / "good")
    tests: list[TestImage] = []
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        for img in list_images(folder):
            if folder.name == "good":
                tests.append(TestImage(img, "good", None))
                continue
            mask = root / "ground_truth" / folder.name / f"{img.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"{img}: no mask at {mask}")
            tests.append(TestImage(img, folder.name, mask))
    if not any(t.defect == "good" for t in tests) or all(t.defect == "good" for t in tests):
        raise DatasetError(f"{root}: test/ needs both good/ and at least one defect folder")
    return train, tests


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


def run_seed(
    bundle: EngineBundle,
    pipeline: VisionPipeline,
    train: list[Path],
    tests: list[TestImage],
    shots: int,
    seed: int,
    target_frr: float | None,
    resize: str | None,
    augment: tuple[str, ...] = (),
) -> dict:
    """Enroll K golden images drawn with ``seed``, inspect every test image, return raw results."""
    rng = np.random.default_rng(seed)
    golden = [train[i] for i in sorted(rng.choice(len(train), size=shots, replace=False))]
    with tempfile.TemporaryDirectory(prefix="agpt-eval-") as tmp:
        store = RecipeStore(tmp)
        enroller = Enroller(store, bundle, pipeline)
        settings: dict = {"augment": augment}
        if resize:
            settings["resize"] = resize
        if target_frr:
            settings["target_frr"] = target_frr
        enroller.create("eval", **settings)
        t0 = time.perf_counter()
        result = enroller.add("eval", [(p.name, read_image(p)) for p in golden], accept_flagged=True)
        enroll_s = time.perf_counter() - t0
        inspector = Inspector(bundle, result.recipe, store, pipeline)
        scores, labels, defects, verdicts, pix_maps, pix_masks, examples = [], [], [], [], [], [], []
        for i in range(0, len(tests), 8):
            chunk = tests[i : i + 8]
            images = [read_image(t.path) for t in chunk]
            for t, image, v in zip(chunk, images, inspector.inspect_batch(images, [t.path.name for t in chunk])):
                mask = load_mask(t, image.shape[:2])
                scores.append(v.score)
                labels.append(t.defect != "good")
                defects.append(t.defect)
                verdicts.append(v.verdict)
                pix_maps.append(_downscale(v.anomaly_map, cv2.INTER_AREA))
                pix_masks.append(_downscale(mask.astype(np.uint8), cv2.INTER_NEAREST) > 0)
                if len(examples) < 64:
                    examples.append((t, image, v))
    return {
        "seed": seed,
        "golden": [p.name for p in golden],
        "enroll_seconds": enroll_s,
        "threshold": result.threshold.to_json() if result.threshold else None,
        "flagged": [f["name"] for f in result.quality.flagged] if result.quality else [],
        "scores": np.array(scores),
        "labels": np.array(labels),
        "defects": np.array(defects),
        "verdicts": np.array(verdicts),
        "pix_maps": pix_maps,
        "pix_masks": pix_masks,
        "examples": examples,
    }


def seed_metrics(r: dict) -> dict:
    """Overall and per-defect figures of one seed."""

    def figures(sel: np.ndarray) -> dict:
        y, s, v = r["labels"][sel], r["scores"][sel], r["verdicts"][sel]
        maps = [m for m, k in zip(r["pix_maps"], sel) if k]
        masks = [m for m, k in zip(r["pix_masks"], sel) if k]
        ng = v == "NG"
        good = ~y
        return {
            "image_auroc": metrics.auroc(s, y),
            "pixel_auroc": metrics.auroc(
                np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
            ),
            "aupro": metrics.aupro(maps, masks),
            "false_reject_rate": float(ng[good].mean()) if good.any() else float("nan"),
            "escape_rate": float((~ng[y]).mean()) if y.any() else float("nan"),
            "accuracy": float((ng == y).mean()),
        }

    out = {"overall": figures(np.ones(len(r["labels"]), bool)), "per_defect": {}}
    for d in sorted(set(r["defects"]) - {"good"}):
        out["per_defect"][d] = figures((r["defects"] == "good") | (r["defects"] == d))
    return out


def _mean_std(values: list[dict]) -> dict:
    keys = values[0].keys()
    return {
        k: {"mean": float(np.nanmean([v[k] for v in values])), "std": float(np.nanstd([v[k] for v in values]))}
        for k in keys
    }


def run(args: argparse.Namespace) -> int:
    """Entry point of ``evaluate``."""
    try:
        train, tests = scan_dataset(args.data)
        if not 1 <= args.shots <= len(train):
            raise DatasetError(f"--shots must be between 1 and {len(train)} (images in train/good)")
        if args.seeds < 1:
            raise DatasetError("--seeds must be at least 1")
        bundle = EngineBundle.open(args.bundle, backend=args.backend)
    except (DatasetError, ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipeline = VisionPipeline(bundle)
    runs, per_seed = [], []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        try:
            r = run_seed(
                bundle,
                pipeline,
                train,
                tests,
                args.shots,
                seed,
                args.target_frr,
                args.resize,
                tuple(a for a in args.augment.split(",") if a),
            )
        except (DatasetError, ImageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        m = seed_metrics(r)
        runs.append(r)
        per_seed.append(
            {
                "seed": seed,
                "threshold": r["threshold"],
                "flagged_golden": r["flagged"],
                "enroll_seconds": r["enroll_seconds"],
                **m,
            }
        )
        o = m["overall"]
        print(
            f"[evaluate] seed {seed}: image AUROC {o['image_auroc']:.4f}  pixel AUROC {o['pixel_auroc']:.4f}  "
            f"AUPRO {o['aupro']:.4f}  FRR {100 * o['false_reject_rate']:.1f}%  escape {100 * o['escape_rate']:.1f}%  "
            f"({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    overall = _mean_std([p["overall"] for p in per_seed])
    defects = sorted(per_seed[0]["per_defect"])
    summary = {
        "dataset": str(args.data),
        "shots": args.shots,
        "seeds": args.seeds,
        "bundle_sha256": bundle.sha256,
        "bundle_source": bundle.manifest.source.get("kind"),
        "n_test": len(tests),
        **{k: v["mean"] for k, v in overall.items()},
        "overall": overall,
        "per_defect": {d: _mean_std([p["per_defect"][d] for p in per_seed]) for d in defects},
        "per_seed": per_seed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    table = [("", "image AUROC", "pixel AUROC", "AUPRO", "false reject", "escape", "accuracy")]
    for name, block in [("overall", overall)] + [(d, summary["per_defect"][d]) for d in defects]:
        table.append(
            (
                name,
                *(f"{block[k]['mean']:.4f}" for k in ("image_auroc", "pixel_auroc", "aupro")),
                *(f"{100 * block[k]['mean']:.1f}%" for k in ("false_reject_rate", "escape_rate", "accuracy")),
            )
        )
    text = _table(table)
    print(text)
    if args.report:
        write_report(args.report, summary, runs[0], text)
    return 0


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plot(curves: list[tuple[np.ndarray, np.ndarray, str]], xlabel: str, ylabel: str, path: Path) -> None:
    """A small line plot drawn with OpenCV (no plotting library on the device)."""
    size, pad = 420, 50
    img = np.full((size + 2 * pad, size + 2 * pad, 3), 255, np.uint8)
    cv2.rectangle(img, (pad, pad), (pad + size, pad + size), (0, 0, 0), 1)
    colours = [(200, 60, 30), (30, 140, 30), (30, 30, 200), (150, 30, 150)]
    for i, (x, y, label) in enumerate(curves):
        pts = np.stack([pad + x * size, pad + (1 - y) * size], 1).astype(np.int32)
        cv2.polylines(img, [pts], False, colours[i % 4], 2, cv2.LINE_AA)
        cv2.putText(
            img, label, (pad + 10, pad + 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colours[i % 4], 1, cv2.LINE_AA
        )
    cv2.putText(img, xlabel, (pad + size // 2 - 40, size + pad + 35), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(img, ylabel, (5, pad - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)


def write_report(folder: Path, summary: dict, first: dict, table: str) -> None:
    """Markdown summary, ROC and PR curve PNGs, and a grid of heatmap examples (first seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    s, y = first["scores"], first["labels"]
    fpr, tpr = metrics.roc_curve(s, y)
    rec, prec = metrics.pr_curve(s, y)
    _plot(
        [(fpr, tpr, f"image ROC, AUROC {metrics.auroc(s, y):.3f}")],
        "false positive rate",
        "true positive rate",
        folder / "roc.png",
    )
    _plot([(rec, prec, "image precision-recall")], "recall", "precision", folder / "pr.png")
    tiles = []
    picked = [e for e in first["examples"] if e[0].defect != "good"][:8] + [
        e for e in first["examples"] if e[0].defect == "good"
    ][:4]
    for t, image, v in picked:
        tile = cv2.resize(overlay(image, v), (192, 192))
        cv2.putText(tile, t.defect, (4, 186), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    while len(tiles) % 4:
        tiles.append(np.zeros((192, 192, 3), np.uint8))
    if tiles:
        cv2.imwrite(
            str(folder / "heatmaps.png"), np.vstack([np.hstack(tiles[i : i + 4]) for i in range(0, len(tiles), 4)])
        )
    thr = first["threshold"] or {}
    md = [
        f"# Evaluation: {summary['dataset']}",
        "",
        f"{summary['shots']}-shot, {summary['seeds']} seed(s), bundle `{summary['bundle_sha256'][:16]}` "
        f"({summary['bundle_source']}), {summary['n_test']} test images. Mean over seeds:",
        "",
        "```",
        table,
        "```",
        "",
        f"Automatic threshold (seed 0): {thr.get('value', float('nan')):.5g} by {thr.get('method')}, "
        f"target false-reject {100 * thr.get('target_frr', 0):g}%.",
        *[f"- warning: {w}" for w in thr.get("warnings", [])],
        "",
        "![ROC](roc.png) ![PR](pr.png)",
        "",
        "Heatmaps (seed 0; threshold at mid-scale):",
        "",
        "![heatmaps](heatmaps.png)",
        "",
    ]
    (folder / "summary.md").write_text("\n".join(md))
