"""``anomalygpt-edge export <target>``: one subcommand per export target.

Arguments are declared and validated here without importing torch, so ``--help`` and argument
errors work on a runtime-only device; each target's module (which needs torch) loads when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomalygpt_edge.engines.manifest import MATCH_METRICS

#: Names of ``export vision --source`` (the table itself, which needs torch, is ``export/vision.py``).
VISION_SOURCES = ("efficientnet-lite0", "wide_resnet50", "dinov2-small", "dinov2-base", "anomalygpt")
#: Light modules (no torch at import) that each add one export target with ``add_export_target``.
EXPORT_TARGET_MODULES: tuple[str, ...] = (
    "anomalygpt_edge.export.engines_cli",
    "anomalygpt_edge.export.llm_cli",
    "anomalygpt_edge.export.int8_export",
)


def _add_encoder_args(v: argparse.ArgumentParser) -> None:
    """Which encoder and where its bundle goes: source, output folder, input size, metric, weights, taps."""
    v.add_argument("--source", choices=VISION_SOURCES, default="efficientnet-lite0")
    v.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    v.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    v.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="encoder input size (default per source: efficientnet-lite0 256, wide_resnet50 224, dinov2-* 448 "
        "(a multiple of 14); anomalygpt fixed at 224)",
    )
    v.add_argument(
        "--metric",
        choices=MATCH_METRICS,
        default=None,
        help="bank-matcher metric (default: the source's recipe, l2 for wide_resnet50, else cosine; anomalygpt "
        "always cosine)",
    )
    v.add_argument(
        "--weights",
        type=Path,
        help="backbone weights for wide_resnet50 / dinov2-*: .safetensors or a torch state dict (read with "
        "weights_only=True); without it the official file is downloaded through torch.hub",
    )
    v.add_argument(
        "--smoothing-sigma",
        type=float,
        default=4.0,
        help="Gaussian blur of the anomaly map, map pixels (bank-matching sources; PatchCore and AnomalyDINO use 4)",
    )
    v.add_argument(
        "--taps", default=None, help="EfficientNet-Lite0 block indices to tap, e.g. 4,10 (default source; default 10)"
    )
    v.add_argument(
        "--head-taps",
        default=None,
        help="EfficientNet-Lite0 blocks only the defect head reads (default 14; 'none' for no head features)",
    )


def _add_weights_args(v: argparse.ArgumentParser) -> None:
    """FP16 variants and the AnomalyGPT checkpoints (or seeded random weights for tests)."""
    v.add_argument("--no-fp16", action="store_true", help="skip the FP16 graph variants")
    v.add_argument("--imagebind", type=Path, help="imagebind_huge.pth (anomalygpt source)")
    v.add_argument(
        "--anomalygpt", type=Path, help="AnomalyGPT pytorch_model.pt (train_mvtec / train_visa / train_supervised)"
    )
    v.add_argument("--pandagpt-delta", type=Path, help="PandaGPT delta pytorch_model.pt (provides llama_proj)")
    v.add_argument(
        "--random-weights",
        action="store_true",
        help="the source's architecture with seeded random weights (anomalygpt, wide_resnet50, dinov2-*; testing)",
    )
    v.add_argument(
        "--bpe-vocab", type=Path, help="CLIP bpe_simple_vocab_16e6.txt.gz, to compute the decoder's text features"
    )
    v.add_argument(
        "--anomalygpt-size", choices=("full", "tiny"), default="full", help="architecture size (tiny: tests only)"
    )
    v.add_argument("--seed", type=int, default=0, help="seed of --random-weights")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` and its targets: ``vision`` here, the others from :data:`EXPORT_TARGET_MODULES`."""
    p = sub.add_parser("export", help="export engine bundles (needs the [export] extra: torch, onnx)")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")

    v = targets.add_parser("vision", help="image-side bundle: encoder, bank matcher, decoder, prompt learner")
    _add_encoder_args(v)
    _add_weights_args(v)
    v.set_defaults(handler="anomalygpt_edge.export.vision:run")

    import importlib

    for name in EXPORT_TARGET_MODULES:
        importlib.import_module(name).add_export_target(targets)


def default_vision_args(out: Path) -> argparse.Namespace:
    """The arguments of ``export vision --out OUT`` with every default, for code that exports the
    embedded default bundle itself (the demo, first runs) without going through the command line."""
    parser = argparse.ArgumentParser(prog="anomalygpt-edge")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["export", "vision", "--out", str(out)])
