"""Runtime subcommands (no torch): enroll, calibrate, inspect, evaluate, and the ``bench`` group.

Parsers only; each names its implementation module in ``handler`` (imported when it runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomalygpt_edge.runtime.defaults import DEFAULT_BUNDLE, DEFAULT_STORE
from anomalygpt_edge.runtime.values import TargetFrr, parse, roi_from_text

#: Light modules that each add one ``bench`` target with ``add_bench_target(targets)``.
BENCH_TARGET_MODULES: tuple[str, ...] = ("anomalygpt_edge.runtime.cli.line",)


def roi_arg(text: str) -> tuple[int, int, int, int]:
    """``x,y,w,h`` in pixels, the one :data:`~anomalygpt_edge.runtime.values.Roi` every surface accepts."""
    try:
        return roi_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def frr_arg(text: str) -> float:
    """A target false-reject rate, the one :data:`~anomalygpt_edge.runtime.values.TargetFrr`: in (0, 0.5)."""
    try:
        value: float | str = float(text)
    except ValueError:
        value = text  # refused below with the same sentence as an out-of-range number
    try:
        frr: float = parse(TargetFrr, value, "target false-reject rate")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return frr


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"recipe store folder (default {DEFAULT_STORE})")
    p.add_argument("--bundle", type=Path, help=f"engine bundle (default: the recipe's, else {DEFAULT_BUNDLE})")
    p.add_argument("--backend", default="auto", help="engine backend (auto, onnxruntime, onnxruntime-cuda, tensorrt)")
    _precision_arg(p)


def _precision_arg(p: argparse.ArgumentParser) -> None:
    """``--precision``: the encoder's, fp32 or the bundle's CPU INT8 variant (``export int8``)."""
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="encoder precision: fp32 (default) or int8, the bundle's CPU INT8 variant (anomalygpt-edge export int8)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the runtime subcommands."""
    _add_enroll(sub)
    _add_calibrate_and_inspect(sub)
    _add_evaluate(sub)
    _add_bench(sub)


def _add_enroll(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("enroll", help="enroll golden parts into a recipe (creates it if new)")
    e.add_argument("--recipe", required=True)
    e.add_argument("--images", type=Path, help="folder (or single file) of golden images to add")
    e.add_argument(
        "--defects",
        type=Path,
        help="folder (or file) of known-defective images; an optional NAME_mask.png beside each marks the defect",
    )
    e.add_argument("--defect-type", help="defect type of the --defects images (e.g. crack)")
    e.add_argument("--remove", metavar="SAMPLE", help="remove one golden sample (file name or sha256 prefix)")
    e.add_argument("--roi", type=roi_arg, help="crop x,y,w,h applied to every image (new recipes)")
    e.add_argument(
        "--resize", choices=("squash", "letterbox", "shorter_side_crop"), help="override the bundle's resize"
    )
    e.add_argument("--augment", default="", help="comma list of rot90,hflip,vflip (only for invariant parts)")
    e.add_argument(
        "--source",
        choices=("bank", "text", "text+bank"),
        default="bank",
        help="few-shot bank (default), AnomalyGPT's text decoder, or both averaged (the paper's few-shot mode)",
    )
    e.add_argument("--class-name", help="object name for the text decoder (source text)")
    e.add_argument("--target-frr", type=frr_arg, default=None, help="target false-reject rate (default 0.01)")
    e.add_argument("--budget", type=int, default=None, help="memory-bank patch budget per layer")
    e.add_argument("--accept-flagged", action="store_true", help="go live although the quality check flagged samples")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _store_args(e)
    e.set_defaults(handler="anomalygpt_edge.runtime.cli.parts_run:enroll")


def _add_calibrate_and_inspect(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("calibrate", help="refine a recipe's threshold with known-good/known-bad parts")
    c.add_argument("--recipe", required=True)
    c.add_argument("--labelled", type=Path, required=True, help="folder with good/ and one or more defect folders")
    c.add_argument("--json", action="store_true")
    _store_args(c)
    c.set_defaults(handler="anomalygpt_edge.runtime.cli.parts_run:calibrate")

    i = sub.add_parser("inspect", help="OK/NG verdicts for image files")
    i.add_argument("--recipe", required=True)
    i.add_argument("images", nargs="+", type=Path)
    i.add_argument("--json", action="store_true", help="one JSON object per line")
    i.add_argument("--heatmap", type=Path, help="write heatmap overlays into this folder")
    _store_args(i)
    i.set_defaults(handler="anomalygpt_edge.runtime.cli.parts_run:inspect")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("evaluate", help="k-shot accuracy on an MVTec-layout dataset")
    v.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        help="one or more folders with train/good, test/<defect>, optional ground_truth/<defect>",
    )
    v.add_argument("--shots", type=int, default=16)
    v.add_argument(
        "--defects", type=int, default=0, help="labelled defects per seed moved from the test set into enrollment"
    )
    v.add_argument("--seeds", type=int, default=3)
    v.add_argument("--json", type=Path, required=True, help="write the figures here")
    v.add_argument("--report", type=Path, help="folder for a Markdown summary, ROC/PR curves and heatmap examples")
    v.add_argument("--target-frr", type=frr_arg, default=None)
    v.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    v.add_argument("--backend", default="auto")
    _precision_arg(v)
    v.add_argument("--resize", choices=("squash", "letterbox", "shorter_side_crop"))
    v.add_argument("--augment", default="", help="comma list of rot90,hflip,vflip for the golden bank")
    v.set_defaults(handler="anomalygpt_edge.runtime.cli.parts_run:evaluate")  # first run, then evaluation


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    targets = b.add_subparsers(dest="target", required=True, metavar="TARGET")
    bv = targets.add_parser("vision", help="encoder + bank matcher: PyTorch eager vs ONNX Runtime (needs torch)")
    bv.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    bv.add_argument("--json", type=Path, required=True)
    bv.add_argument("--shots", type=int, default=16, help="golden images in the bank")
    bv.add_argument("--repeats", type=int, default=30)
    bv.add_argument("--enroll-images", type=Path, help="golden images to time enrollment with (default: generated)")
    bv.add_argument("--backend", default="auto")
    bv.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="int8: also time the bundle's CPU INT8 encoder against FP32 in the same run (the ratio)",
    )
    bv.set_defaults(handler="anomalygpt_edge.runtime.cli.parts_run:bench_vision")  # first run, then the bench
    _add_bench_goldens(targets)
    _add_bench_learn(targets)
    import importlib

    for name in BENCH_TARGET_MODULES:
        importlib.import_module(name).add_bench_target(targets)


def ks_arg(text: str) -> list[int]:
    """``1,2,4`` -> [1, 2, 4]: golden-part counts, positive, ascending, no repeats."""
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"golden-part counts must be 1 or more, got {text!r}")
    return ks


def _add_bench_goldens(targets: argparse._SubParsersAction) -> None:
    g = targets.add_parser("goldens", help="bank memory, enroll time, match time and AUROC for k golden parts")
    g.add_argument("--data", type=Path, required=True, help="an MVTec-layout dataset folder")
    g.add_argument("--k", type=ks_arg, default=ks_arg("1,2,4,8,16,32,64,128,256,512,1000"), help="comma list")
    g.add_argument("--json", type=Path, required=True, help="write the figures here")
    g.add_argument("--report", type=Path, help="folder for goldens.png and goldens.md")
    g.add_argument("--budget", type=int, default=None, help="bank patch budget (default: the memory bank's)")
    g.add_argument("--max-test", type=int, default=None, help="bound the test images (stratified draw)")
    g.add_argument("--seed", type=int, default=0, help="golden order and test draw")
    g.add_argument("--no-reference", dest="reference", action="store_false", help="skip the unbounded-bank reference")
    g.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    g.add_argument("--backend", default="auto")
    g.set_defaults(handler="anomalygpt_edge.runtime.tools.golden_sweep:run")


def _add_bench_learn(targets: argparse._SubParsersAction) -> None:
    g = targets.add_parser("learn", help="replay datasets as a line that learns from labelled verdicts")
    g.add_argument("--data", type=Path, nargs="+", required=True, help="MVTec-layout dataset folders")
    g.add_argument("--shots", type=int, default=16, help="golden parts enrolled at the start")
    g.add_argument("--label-every", type=int, default=10, help="the operator labels every Nth verdict")
    g.add_argument("--apply-every", type=int, default=10, help="a proposal is applied every M labels")
    g.add_argument("--window", type=int, default=50, help="parts per window of the figures")
    g.add_argument("--control-parts", type=int, default=1000, help="control replay from unenrolled train/good")
    g.add_argument("--max-parts", type=int, default=None, help="replay only the first N parts of the order")
    g.add_argument("--seed", type=int, default=0, help="golden draw and part order")
    g.add_argument("--target-frr", type=frr_arg, default=None, help="the recipe's target false-reject rate")
    g.add_argument("--json", type=Path, required=True)
    g.add_argument("--report", type=Path, help="folder for the PNG plots and the table")
    g.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    g.add_argument("--backend", default="auto")
    g.set_defaults(handler="anomalygpt_edge.runtime.cli.parts_run:bench_learn")  # first run, then the bench
