"""``anomalygpt-edge export vision``: write the image-side engine bundle for a source model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.integrity import sha256_file
from anomalygpt_edge.engines.manifest import PatchLayer, Preprocess
from anomalygpt_edge.export.bank_matcher import BankMatcher
from anomalygpt_edge.export.bundle_writer import BundleWriter, log


def export_efficientnet(args: argparse.Namespace, writer: BundleWriter) -> EngineBundle:
    """The embedded default: EfficientNet-Lite0 patch encoder + L2/cosine bank matcher."""
    from anomalygpt_edge.export import efficientnet_encoder as eff

    size = (args.image_size, args.image_size)
    log(f"loading EfficientNet-Lite0 ImageNet weights from {eff.weights_path()}")
    taps = eff.DEFAULT_TAPS
    if getattr(args, "taps", None):
        taps = tuple(sorted(int(t) for t in args.taps.split(",")))
        if not all(0 <= t < len(eff.BLOCK_STRIDES) for t in taps):
            raise SystemExit(f"--taps must be block indices 0..{len(eff.BLOCK_STRIDES) - 1}, got {args.taps}")
    encoder = eff.EfficientNetPatchEncoder(eff.load_efficientnet_lite0(args.image_size), taps=taps).eval()
    grid = encoder.grid_for(size)
    dim = encoder.channels()
    writer.add_graph(
        "encoder",
        encoder,
        {"pixel_values": torch.randn(1, 3, *size)},
        ["patches_0"],
        {"pixel_values": {0: "batch"}, "patches_0": {0: "batch"}},
        fp16=not args.no_fp16,
    )
    matcher = BankMatcher(1, grid, size, metric=args.metric)
    names_in, names_out = matcher.io_names()
    writer.add_graph(
        "bank_matcher",
        matcher,
        matcher.example_inputs([dim]),
        names_out,
        matcher.dynamic_axes(),
        fp16=not args.no_fp16,
    )
    return writer.finish(
        source={
            "kind": "efficientnet-lite0",
            "checkpoints": [
                {"name": "efficientnet-lite0-57934424.pth", "sha256": sha256_file(Path(eff.weights_path()))}
            ],
            "taps": list(taps),
            "licence": "Apache-2.0",
        },
        preprocess=Preprocess(
            size=size, resize="squash", interpolation="area", mean=eff.MEAN, std=eff.STD, color="RGB"
        ),
        patch_layers=[PatchLayer("patches_0", grid, dim)],
        map_size=size,
        matching={"metric": args.metric, "image_score": "max", "smoothing_sigma": args.smoothing_sigma},
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``export vision``; returns the exit code."""
    if args.source == "anomalygpt":
        missing = [f"--{n.replace('_', '-')}" for n in ("imagebind", "anomalygpt") if getattr(args, n) is None]
        if missing and not args.random_weights:
            raise SystemExit(f"export vision --source anomalygpt needs {' and '.join(missing)} (or --random-weights)")
        for name in ("imagebind", "anomalygpt", "pandagpt_delta"):
            path = getattr(args, name)
            if path is not None and not Path(path).is_file():
                raise SystemExit(f"--{name.replace('_', '-')}: {path} is not a file")
    if args.image_size < 32 or args.image_size % 8:
        raise SystemExit(f"--image-size must be a multiple of 8 and at least 32, got {args.image_size}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    writer = BundleWriter(Path(args.out), overwrite=args.overwrite)
    try:
        if args.source == "efficientnet-lite0":
            bundle = export_efficientnet(args, writer)
        else:
            from anomalygpt_edge.export.anomalygpt_export import export_anomalygpt

            bundle = export_anomalygpt(args, writer)
    except BaseException:
        writer.abort()
        raise
    print(writer.report())
    print(f"bundle sha256 {bundle.sha256}")
    return 0
