"""``anomalygpt-edge bench goldens``: what k golden parts cost and buy, k = 1 … 1000 (issue 16, item 2b).

For each k the first k images of one shuffled ``train/good`` order (seeded; the same order for
every k, so k+1 adds one part to k's) become a memory bank with the coreset budget in force
(:data:`~anomalygpt_edge.runtime.inspection.memory_bank.DEFAULT_BUDGET` unless ``--budget``), and
the figures are:

* bank memory (bytes) and patches kept;
* enroll seconds: encoding the k images (measured per image, summed) plus building the bank
  (concatenation and greedy coreset); the leave-one-out quality check and threshold calibration
  of a full ``enroll`` are not included (they do not depend on the bank budget);
* match ms per image: the bank matcher (and smoothing) over the encoded test images, encoder
  excluded (the encoder's cost does not depend on k);
* image AUROC on the dataset's test set (scores as the line computes them).

The reference runs side by side in the same run: the same k with **no** budget (the whole
concatenated bank), for memory, match time and AUROC, reported as ratios (bounded / unbounded).
Below the budget both banks are the same bank, so the reference is measured only where the
coreset subsamples. A k larger than ``train/good`` is capped at the number of images there (no
augmentation), and the report says so. ``--max-test`` bounds the test images (stratified draw).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.runtime.evaluation import accuracy as metrics
from anomalygpt_edge.runtime.evaluation.evaluate import Dataset, Skips, TestImage, scan_dataset
from anomalygpt_edge.runtime.inspection.memory_bank import DEFAULT_BUDGET, build_bank
from anomalygpt_edge.runtime.inspection.pipeline import ENCODE_BATCH, VisionPipeline

#: Unbounded reference banks above this many patches are not matched (memory and time bound).
REFERENCE_MAX_PATCHES = 400_000
#: One chart of ``goldens.png``, pixels.
PANEL_W, PANEL_H = 520, 340


@dataclass
class Encoded:
    """Bank-layer features of readable images, with the encoder seconds each took."""

    names: list[str]
    features: dict[str, np.ndarray]  # layer -> (n, N, C)
    seconds: np.ndarray  # (n,) encoder + preprocess seconds per image
    labels: np.ndarray  # (n,) True for a defect (test images only)


def _encode(pipeline: VisionPipeline, items: list[tuple[str, Path, bool]], skips: Skips, tag: str) -> Encoded:
    """Read, preprocess and encode ``(name, path, is_defect)`` in encoder batches, timing each image."""
    names, labels, secs = [], [], []
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in pipeline.layer_names}
    for i in range(0, len(items), ENCODE_BATCH):
        batch = [(n, r[0], y) for n, p, y in items[i : i + ENCODE_BATCH] if (r := skips.read(p)) is not None]
        if not batch:
            continue
        t0 = time.perf_counter()
        prepared = [pipeline.prepare(image, name=n) for n, image, _ in batch]
        out = pipeline.encode(prepared)
        per_image = (time.perf_counter() - t0) / len(batch)
        for n in pipeline.layer_names:
            chunks[n].append(out[n])
        names += [n for n, _, _ in batch]
        labels += [y for _, _, y in batch]
        secs += [per_image] * len(batch)
        print(f"[goldens] encoded {len(names)}/{len(items)} {tag}", file=sys.stderr, flush=True)
    features = {n: np.concatenate(c) for n, c in chunks.items()}
    return Encoded(names, features, np.array(secs), np.array(labels, bool))


def _test_items(data: Dataset, max_test: int | None, rng: np.random.Generator) -> list[TestImage]:
    """All test images, or a draw of ``max_test`` keeping the good/defect proportions."""
    tests = list(data.tests)
    if max_test is None or max_test >= len(tests):
        return tests
    good = [t for t in tests if t.defect == "good"]
    bad = [t for t in tests if t.defect != "good"]
    n_good = max(1, round(max_test * len(good) / len(tests)))
    n_bad = max(1, max_test - n_good)
    pick_good = rng.choice(len(good), size=min(n_good, len(good)), replace=False)
    pick_bad = rng.choice(len(bad), size=min(n_bad, len(bad)), replace=False)
    return [good[i] for i in sorted(pick_good)] + [bad[i] for i in sorted(pick_bad)]


def _match(pipeline: VisionPipeline, tests: Encoded, bank: dict[str, np.ndarray]) -> tuple[float, float]:
    """(match ms per test image, image AUROC) of ``bank`` over the encoded test images."""
    scores: list[float] = []
    n = len(tests.names)
    t0 = time.perf_counter()
    for i in range(0, n, ENCODE_BATCH):
        feats = {name: f[i : i + ENCODE_BATCH] for name, f in tests.features.items()}
        scores += [pipeline.image_score(m) for m in pipeline.bank_maps(feats, bank)]
    ms = (time.perf_counter() - t0) * 1e3 / max(1, n)
    return ms, metrics.auroc(np.array(scores), tests.labels)


def _sweep_point(
    pipeline: VisionPipeline, goldens: Encoded, tests: Encoded, k: int, budget: int, reference: bool
) -> dict[str, Any]:
    """Every figure at one k: the budgeted bank and, where the coreset subsamples, the unbounded one."""
    per_sample = [{n: f[i] for n, f in goldens.features.items()} for i in range(k)]
    t0 = time.perf_counter()
    bank, meta = build_bank(per_sample, budget=budget)
    build_s = time.perf_counter() - t0
    match_ms, auroc = _match(pipeline, tests, bank)
    bank_bytes = int(sum(a.nbytes for a in bank.values()))
    full_bytes = int(sum(f[:k].nbytes for f in goldens.features.values()))
    row: dict[str, Any] = {
        "k": k,
        "bank_patches": int(meta["kept_patches"]),
        "total_patches": int(meta["total_patches"]),
        "subsampled": bool(meta["subsampled"]),
        "bank_bytes": bank_bytes,
        "encode_s": float(goldens.seconds[:k].sum()),
        "bank_build_s": build_s,
        "enroll_s": float(goldens.seconds[:k].sum()) + build_s,
        "match_ms_per_image": match_ms,
        "image_auroc": auroc,
        "unbounded_bank_bytes": full_bytes,
        "memory_ratio": bank_bytes / full_bytes,
    }
    if not meta["subsampled"]:  # the same bank: the reference figures are these
        row.update(unbounded_match_ms_per_image=match_ms, unbounded_image_auroc=auroc, match_ratio=1.0)
    elif reference and meta["total_patches"] <= REFERENCE_MAX_PATCHES:
        full = {n: np.ascontiguousarray(f[:k].reshape(-1, f.shape[-1])) for n, f in goldens.features.items()}
        ref_ms, ref_auroc = _match(pipeline, tests, full)
        row.update(unbounded_match_ms_per_image=ref_ms, unbounded_image_auroc=ref_auroc, match_ratio=match_ms / ref_ms)
    return row


def _prepare(args: argparse.Namespace) -> tuple[VisionPipeline, Encoded, Encoded, dict[str, Any]]:
    """Open the bundle, scan the dataset, encode the goldens (shuffled, seeded) and the test images once."""
    bundle = EngineBundle.open(args.bundle, backend=args.backend)
    pipeline = VisionPipeline(bundle)
    data = scan_dataset(args.data)
    rng = np.random.default_rng(args.seed)
    ks: list[int] = args.k
    k_max = min(ks[-1], len(data.train))
    order = rng.permutation(len(data.train))[:k_max]
    tests = _test_items(data, args.max_test, rng)
    skips = Skips()
    goldens = _encode(pipeline, [(data.train[i].name, data.train[i], False) for i in order], skips, "golden")
    encoded_tests = _encode(pipeline, [(t.path.name, t.path, t.defect != "good") for t in tests], skips, "test")
    notes = list(data.notes)
    available = len(goldens.names)
    if ks[-1] > available:
        capped = [k for k in ks if k > available]
        notes.append(
            f"k {', '.join(map(str, capped))} asked for more golden parts than the {available} readable "
            f"images in train/good: measured at k = {available} (no augmentation)"
        )
    if len(tests) < len(data.tests):
        notes.append(f"test set bounded to {len(tests)} of {len(data.tests)} images (stratified, seed {args.seed})")
    head = {
        "dataset": str(args.data),
        "bundle": str(args.bundle),
        "bundle_sha256": bundle.sha256,
        "engine_backend": pipeline.encoder.describe(),
        "seed": args.seed,
        "requested_k": ks,
        "train_goods": available,
        "n_test": len(encoded_tests.names),
        "n_test_defects": int(encoded_tests.labels.sum()),
        "patches_per_image": int(next(iter(goldens.features.values())).shape[1]),
        "skipped": [{"path": p, "reason": why} for p, why in skips.items.items()],
        "notes": notes,
    }
    return pipeline, goldens, encoded_tests, head


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """The whole sweep as one JSON-able document (k ascending, so the large k run last)."""
    budget = args.budget or DEFAULT_BUDGET
    pipeline, goldens, tests, head = _prepare(args)
    head["budget"] = budget
    rows: list[dict[str, Any]] = []
    for k in sorted({min(k, head["train_goods"]) for k in args.k}):
        t0 = time.perf_counter()
        row = _sweep_point(pipeline, goldens, tests, k, budget, args.reference)
        rows.append(row)
        print(
            f"[goldens] k {k}: bank {row['bank_bytes'] / 2**20:.2f} MiB, match {row['match_ms_per_image']:.2f} ms, "
            f"AUROC {row['image_auroc']:.4f} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    first = rows[0]
    for row in rows:  # growth against the smallest k, measured in the same run
        row["vs_first_k"] = {
            "bank_bytes": row["bank_bytes"] / first["bank_bytes"],
            "match_ms": row["match_ms_per_image"] / first["match_ms_per_image"],
            "enroll_s": row["enroll_s"] / first["enroll_s"],
        }
    return {**head, "rows": rows}


def table(doc: dict[str, Any]) -> str:
    """The sweep as a Markdown table (what BENCHMARKS.md carries)."""

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) and np.isfinite(v) else "n/a"

    lines = [
        "| k | bank patches | bank MiB (unbounded) | enroll s | match ms/img (unbounded) | image AUROC (unbounded) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['k']} | {r['bank_patches']} | {r['bank_bytes'] / 2**20:.2f}"
            f" ({r['unbounded_bank_bytes'] / 2**20:.2f})"
            f" | {r['enroll_s']:.1f} | {num(r['match_ms_per_image'], '.2f')}"
            f" ({num(r.get('unbounded_match_ms_per_image'), '.2f')}) | {num(r['image_auroc'], '.4f')}"
            f" ({num(r.get('unbounded_image_auroc'), '.4f')}) |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``bench goldens``: sweep, write JSON (and the report folder's PNG + Markdown), print the table."""
    doc = sweep(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    text = table(doc)
    if args.report is not None:
        args.report.mkdir(parents=True, exist_ok=True)
        write_plots(doc, args.report)
        notes = "".join(f"- {n}\n" for n in doc["notes"])
        (args.report / "goldens.md").write_text(f"# Golden parts k sweep: {doc['dataset']}\n\n{notes}\n{text}\n")
    print(text)
    for note in doc["notes"]:
        print(f"note: {note}")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _log_x(k: float, ks: list[int], x0: int, x1: int) -> int:
    lo, hi = np.log(ks[0]), np.log(max(ks[-1], ks[0] + 1))
    return int(x0 + (np.log(k) - lo) / (hi - lo) * (x1 - x0))


def _panel(title: str, ks: list[int], series: list[tuple[str, list[float], tuple[int, int, int]]]) -> np.ndarray:
    """One chart (k on a log axis) drawn with OpenCV: matplotlib is not a dependency of the runtime."""
    img = np.full((PANEL_H, PANEL_W, 3), 255, np.uint8)
    x0, x1, y0, y1 = 60, PANEL_W - 20, PANEL_H - 40, 40
    values = [v for _, vs, _ in series for v in vs if np.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (x0, 24), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.line(img, (x0, y0), (x1, y0), (0, 0, 0), 1)
    cv2.line(img, (x0, y0), (x0, y1), (0, 0, 0), 1)
    last_label = -100
    for k in ks:
        x = _log_x(k, ks, x0, x1)
        cv2.line(img, (x, y0), (x, y0 + 4), (0, 0, 0), 1)
        if x - last_label >= 28:  # close ticks (256 and 285) keep the first label only
            cv2.putText(img, str(k), (x - 8, y0 + 18), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
            last_label = x
    for frac in (0.0, 0.5, 1.0):
        y = int(y0 + frac * (y1 - y0))
        cv2.putText(img, f"{lo + frac * (hi - lo):.3g}", (2, y + 4), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    # The reference (listed last) is drawn first and thinner: where both banks are one bank,
    # the budgeted line stays visible on top of it.
    for n, (label, vs, colour) in reversed(list(enumerate(series))):
        width = 2 if n == 0 else 1
        pts = [
            (_log_x(k, ks, x0, x1), int(y0 + (v - lo) / (hi - lo) * (y1 - y0)))
            for k, v in zip(ks, vs)
            if np.isfinite(v)
        ]
        for a, b in zip(pts, pts[1:]):
            cv2.line(img, a, b, colour, width, cv2.LINE_AA)
        for pt in pts:
            cv2.circle(img, pt, 3, colour, -1, cv2.LINE_AA)
        cv2.putText(img, label, (x1 - 170, y1 + 14 + 16 * n), font, 0.4, colour, 1, cv2.LINE_AA)
    return img


def write_plots(doc: dict[str, Any], folder: Path) -> Path:
    """``goldens.png``: bank MiB, enroll s, match ms and AUROC against k, budgeted vs unbounded."""
    rows = doc["rows"]
    ks = [r["k"] for r in rows]

    def col(key: str, scale: float = 1.0) -> list[float]:
        return [float(r[key]) * scale if r.get(key) is not None else float("nan") for r in rows]

    blue, grey = (200, 90, 30), (140, 140, 140)
    panels = [
        _panel(
            "bank memory (MiB)",
            ks,
            [("budgeted", col("bank_bytes", 2**-20), blue), ("unbounded", col("unbounded_bank_bytes", 2**-20), grey)],
        ),
        _panel("enroll (s): encode + bank", ks, [("budgeted", col("enroll_s"), blue)]),
        _panel(
            "match (ms / image)",
            ks,
            [("budgeted", col("match_ms_per_image"), blue), ("unbounded", col("unbounded_match_ms_per_image"), grey)],
        ),
        _panel(
            "image AUROC",
            ks,
            [("budgeted", col("image_auroc"), blue), ("unbounded", col("unbounded_image_auroc"), grey)],
        ),
    ]
    grid = np.vstack([np.hstack(panels[:2]), np.hstack(panels[2:])])
    path = Path(folder) / "goldens.png"
    if not cv2.imwrite(str(path), grid):
        raise OSError(f"{path}: could not write the plot")
    return path
