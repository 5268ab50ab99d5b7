"""FP32 vs CPU INT8 encoder accuracy on MVTec-layout datasets, side by side in one run.

``python -m anomalygpt_edge.export.int8_accuracy --bundle data/bundles/default --data D1 D2 ... --work DIR``

Per dataset the bundle is copied to ``DIR/<dataset>`` and given its INT8 encoder calibrated on that
dataset's ``train/good`` (``export int8``: a line calibrates on its own golden parts; skipped when
the copy already has one). Then the k-shot protocol of ``evaluate`` runs twice on the same seeds and
shots, once per encoder precision, enrollment included (a recipe is enrolled at the precision it
runs at). Prints the image AUROC per dataset at FP32 and INT8, the delta, and whether INT8 passes
the default rule (no dataset drops by more than ``--max-drop``, 0.005); writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

#: INT8 may become the default only where no dataset's image AUROC drops by more than this.
MAX_DROP = 0.005
PRECISIONS = ("fp32", "int8")


def _calibrated_copy(bundle: Path, data: Path, work: Path) -> Path:
    """``work/<dataset>``: a copy of ``bundle`` with its INT8 encoder calibrated on ``data/train/good``."""
    from anomalygpt_edge.engines.manifest import read_manifest
    from anomalygpt_edge.export import int8_export

    target = work / data.name
    if not target.is_dir():
        shutil.copytree(bundle, target)
    if read_manifest(target)[0].int8 is None:
        calib = data / "train" / "good"
        if int8_export.run(argparse.Namespace(bundle=target, calib_images=calib, calib_method="minmax", force=False)):
            raise SystemExit(f"error: export int8 failed for {data}")
    return target


def _evaluate(bundle_dir: Path, data: Path, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """One dataset at one precision: ``evaluate``'s summary (image AUROC and the rest) plus its wall time."""
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.evaluation.evaluate import Protocol, evaluate_dataset, scan_dataset
    from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline

    bundle = EngineBundle.open(bundle_dir, precision=precision)
    t0 = time.perf_counter()
    summary, _first = evaluate_dataset(
        bundle, VisionPipeline(bundle), scan_dataset(data), Protocol(args.shots), args.seeds
    )
    keep = ("image_auroc", "pixel_auroc", "aupro", "false_reject_rate", "escape_rate", "n_test", "bundle_sha256")
    out = {k: summary[k] for k in keep}
    out["image_auroc_per_seed"] = [s["overall"]["image_auroc"] for s in summary["per_seed"]]
    out["seconds"] = time.perf_counter() - t0
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    """Image AUROC per dataset: FP32, INT8, delta, within the rule or not."""
    lines = [f"{'dataset':<16} {'fp32':>7} {'int8':>7} {'delta':>8}  within {MAX_DROP}"]
    for r in rows:
        ok = "yes" if r["delta"] >= -MAX_DROP else "NO"
        lines.append(f"{r['dataset']:<16} {r['fp32']:7.4f} {r['int8']:7.4f} {r['delta']:+8.4f}  {ok}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Calibrate, evaluate both precisions per dataset, print the table and the decision, write JSON."""
    args.work.mkdir(parents=True, exist_ok=True)
    rows, details = [], {}
    for data in args.data:
        bundle_dir = _calibrated_copy(args.bundle, data, args.work)
        res = {p: _evaluate(bundle_dir, data, p, args) for p in PRECISIONS}
        details[data.name] = res
        delta = res["int8"]["image_auroc"] - res["fp32"]["image_auroc"]
        rows.append({"dataset": data.name, "fp32": res["fp32"]["image_auroc"], "int8": res["int8"]["image_auroc"]})
        rows[-1]["delta"] = delta
        print(f"[int8-accuracy] {data.name}: fp32 {rows[-1]['fp32']:.4f} int8 {rows[-1]['int8']:.4f}", file=sys.stderr)
    passed = all(r["delta"] >= -args.max_drop for r in rows)
    report = {
        "shots": args.shots,
        "seeds": args.seeds,
        "max_drop": args.max_drop,
        "rows": rows,
        "int8_may_be_default": passed,
        "details": details,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(rows))
    verdict = "drops by at most {} on every dataset" if passed else "drops by more than {} on some dataset"
    print(f"INT8 image AUROC {verdict.format(args.max_drop)} ({args.seeds} seed(s), {args.shots} shots)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m anomalygpt_edge.export.int8_accuracy``."""
    p = argparse.ArgumentParser(prog="python -m anomalygpt_edge.export.int8_accuracy", description=__doc__)
    p.add_argument("--bundle", type=Path, required=True, help="FP32 bundle to copy and calibrate per dataset")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="MVTec-layout dataset folders")
    p.add_argument("--work", type=Path, required=True, help="folder for the calibrated bundle copies")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-drop", type=float, default=MAX_DROP)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
