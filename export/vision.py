"""``anomalygpt-edge export vision``: write the image-side engine bundle for a named source.

Every source is one row of :data:`SOURCES` (the Ultralytics exporter's habit: one table, no
if-chain): its input-size rule, the flags it accepts, its published matching recipe, how it is
exported and how its PyTorch reference is rebuilt for ``bench vision``. Arguments are checked
against the row before anything heavy runs.

| source | backbone (weights) | patches | metric | image score |
| --- | --- | --- | --- | --- |
| ``efficientnet-lite0`` | EfficientNet-Lite0 (registry, offline default) | tap 10, 3×3 avg | cosine | max |
| ``wide_resnet50`` | WideResNet-50-2 (torchvision) | PatchCore layer2+layer3, 3×3 avg | L2 | max |
| ``dinov2-small``/``-base`` | DINOv2 ViT-S/14, B/14 (hub) | AnomalyDINO last layer | cosine | mean top 1 % |
| ``anomalygpt`` | ImageBind-Huge + AnomalyGPT | 4 taps + text decoder | cosine | max |

Weights of ``wide_resnet50`` and ``dinov2-*``: ``--weights FILE`` (safetensors or a torch file,
read with ``weights_only=True``), else the library's official URL through torch.hub (export
machines with network; its cache is reused), or ``--random-weights`` (tests, benchmarks). Keys are
accounted strictly: a missing, unexpected or mis-shaped key is named in one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from anomalygpt_edge.atomic_files import sha256_file
from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.manifest import Manifest, PatchLayer, Preprocess
from anomalygpt_edge.export import checkpoints as ckpt
from anomalygpt_edge.export.bank_matcher import BankMatcher
from anomalygpt_edge.export.bundle_writer import BundleWriter, log

if TYPE_CHECKING:  # annotations only: each source's model module is imported when that source runs
    from anomalygpt_edge.export.dinov2 import DinoVisionTransformer
    from anomalygpt_edge.export.wide_resnet import WideResNet50_2

#: Source-specific flags (argparse dest -> what an unset flag looks like), checked against each row.
SOURCE_FLAGS: dict[str, Any] = {
    "weights": None,
    "random_weights": False,
    "taps": None,
    "head_taps": None,
    "imagebind": None,
    "anomalygpt": None,
    "pandagpt_delta": None,
    "bpe_vocab": None,
}


@dataclass(frozen=True)
class VisionSource:
    """One row of the source table: how a named source is validated, exported and rebuilt."""

    name: str
    #: Default input size (square) and the rule an ``--image-size`` must follow.
    default_size: int
    size_multiple: int
    min_size: int
    #: Source-specific flags (keys of :data:`SOURCE_FLAGS`) this source accepts.
    flags: tuple[str, ...]
    #: ``export(args, writer) -> EngineBundle``; ``args.image_size``/``args.metric`` are resolved.
    export: Callable[[argparse.Namespace, BundleWriter], EngineBundle]
    default_metric: str = "cosine"
    #: Only this input size is possible (ImageBind's 224); ``--image-size`` must equal it.
    fixed_size: bool = False
    #: ``reference(manifest) -> encoder module`` for ``bench vision``; None: not supported.
    reference: Callable[[Manifest], nn.Module] | None = None
    #: Graphs and data files the export writes: the progress bar's step count.
    graphs: int = 2
    files: int = 0

    def steps(self, fp16: bool) -> int:
        """Progress steps of an export: each graph (and its fp16 conversion), each data file, the finish."""
        return self.graphs * (2 if fp16 else 1) + self.files + 1


# --- weights -------------------------------------------------------------------------------------


def _hub_cache_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``'s file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _download(source: str, url: str, check_hash: bool) -> tuple[dict[str, torch.Tensor], Path]:
    """The official weights through torch.hub (cached); one clear line when it cannot."""
    log(f"no --weights: loading {url} through torch.hub (cache {_hub_cache_path(url).parent})")
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=check_hash, weights_only=True)
    except Exception as exc:  # URLError, HTTPError, hash mismatch, unpickling refusal: all one message
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SystemExit(
            f"export vision --source {source}: cannot download {url} ({type(exc).__name__}: {reason}); "
            f"fetch that file on a machine with network and pass --weights FILE (or --random-weights to test)"
        ) from exc
    return dict(state), _hub_cache_path(url)


def load_weights(
    source: str,
    model: nn.Module,
    weights: Path | None,
    url: str,
    check_hash: bool = False,
    optional: set[str] | None = None,
) -> dict[str, Any]:
    """Load ``model``'s full state dict from ``weights`` (or ``url``) strictly; return the manifest record.

    Every key of ``model.state_dict()`` must be in the file with its shape, except ``optional``
    ones (loaded when present); a file key the model lacks is unexpected. Errors are one
    :class:`~anomalygpt_edge.export.checkpoints.CheckpointError` line naming the file and keys.
    """
    optional = optional or set()
    if weights is not None:
        path, origin = Path(weights), "--weights"
        log(f"loading {path} ...")
        state = ckpt.read_state_dict(path)
    else:
        state, path = _download(source, url, check_hash)
        origin = url
    present_optional = optional & set(state)
    mapping = {k: (model, k) for k in model.state_dict() if k not in optional or k in present_optional}
    # The checkpoints module's strict accounting: missing / unexpected / wrong-shape keys, one line.
    report = ckpt._assign(path, state, mapping)
    log(f"hashing {path} ...")
    return {
        "name": path.name,
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "keys_loaded": report.loaded,
        "origin": origin,
    }


def _weights_record(args: argparse.Namespace, model: nn.Module, url: str, **kw: Any) -> dict[str, Any]:
    """Load ``--weights``/the download into ``model`` (or keep its seeded random init); manifest fields."""
    seed = int(getattr(args, "seed", 0) or 0)
    if getattr(args, "random_weights", False):
        log(f"RANDOM weights (seed {seed}; testing and benchmarks only)")
        return {"weights": "random", "random_weights": True, "seed": seed, "checkpoints": []}
    try:
        record = load_weights(args.source, model, getattr(args, "weights", None), url, **kw)
    except ckpt.CheckpointError as exc:
        # A user-facing file problem: the message names the file and keys; a traceback adds nothing.
        raise SystemExit(f"export vision --source {args.source}: {exc}") from exc
    return {"weights": record["name"], "random_weights": False, "checkpoints": [record]}


# --- shared bundle layout of single-layer patch encoders ------------------------------------------


def _write_patch_bundle(
    args: argparse.Namespace,
    writer: BundleWriter,
    encoder: nn.Module,
    grid: tuple[int, int],
    dim: int,
    source: dict[str, Any],
    preprocess: Preprocess,
    image_score: str,
    head_dim: int = 0,
) -> EngineBundle:
    """``encoder`` (-> ``patches_0`` [, ``head_0``]) + a one-layer bank matcher, and the manifest."""
    size = preprocess.size
    fp16 = not args.no_fp16
    outputs = ["patches_0", "head_0"] if head_dim else ["patches_0"]
    writer.add_graph(
        "encoder",
        encoder.eval(),
        {"pixel_values": torch.randn(1, 3, *size)},
        outputs,
        {"pixel_values": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
        fp16=fp16,
    )
    matcher = BankMatcher(1, grid, size, metric=args.metric)
    _, names_out = matcher.io_names()
    writer.add_graph(
        "bank_matcher", matcher, matcher.example_inputs([dim]), names_out, matcher.dynamic_axes(), fp16=fp16
    )
    return writer.finish(
        source=source,
        preprocess=preprocess,
        patch_layers=[PatchLayer("patches_0", grid, dim)],
        map_size=size,
        matching={"metric": args.metric, "image_score": image_score, "smoothing_sigma": args.smoothing_sigma},
        head_layers=[PatchLayer("head_0", grid, head_dim)] if head_dim else None,
    )


# --- efficientnet-lite0 (the offline default) ------------------------------------------------------


def _efficientnet_taps(args: argparse.Namespace, key: str = "taps", default: tuple[int, ...] = ()) -> tuple[int, ...]:
    """``--taps`` / ``--head-taps`` as sorted block indices (``none`` for no head taps)."""
    from anomalygpt_edge.export import efficientnet_encoder as eff

    text = getattr(args, key, None)
    if not text:
        return default or eff.DEFAULT_TAPS
    if key == "head_taps" and text == "none":
        return ()
    taps = tuple(sorted(int(t) for t in text.split(",")))
    if not all(0 <= t < len(eff.BLOCK_STRIDES) for t in taps):
        flag = "--" + key.replace("_", "-")
        raise SystemExit(f"{flag} must be block indices 0..{len(eff.BLOCK_STRIDES) - 1}, got {text}")
    return taps


def export_efficientnet(args: argparse.Namespace, writer: BundleWriter) -> EngineBundle:
    """The embedded default: EfficientNet-Lite0 patch encoder + L2/cosine bank matcher."""
    from anomalygpt_edge.export import efficientnet_encoder as eff

    size = (args.image_size, args.image_size)
    log(f"loading EfficientNet-Lite0 ImageNet weights from {eff.weights_path()}")
    taps = _efficientnet_taps(args)
    head_taps = _efficientnet_taps(args, "head_taps", eff.DEFAULT_HEAD_TAPS)
    net = eff.load_efficientnet_lite0(args.image_size)
    encoder = eff.EfficientNetPatchEncoder(net, taps=taps, head_taps=head_taps).eval()
    source = {
        "kind": "efficientnet-lite0",
        "checkpoints": [{"name": "efficientnet-lite0-57934424.pth", "sha256": sha256_file(Path(eff.weights_path()))}],
        "taps": list(taps),
        "head_taps": list(head_taps),
        "licence": "Apache-2.0",
    }
    preprocess = Preprocess(size=size, resize="squash", interpolation="area", mean=eff.MEAN, std=eff.STD, color="RGB")
    return _write_patch_bundle(
        args, writer, encoder, encoder.grid_for(size), encoder.channels(), source, preprocess, "max",
        head_dim=encoder.head_channels(),
    )  # fmt: skip


def _efficientnet_reference(m: Manifest) -> nn.Module:
    from anomalygpt_edge.export import efficientnet_encoder as eff

    net = eff.load_efficientnet_lite0(m.preprocess.size[0])
    head_taps = tuple(m.source.get("head_taps", ()))
    return eff.EfficientNetPatchEncoder(net, taps=tuple(m.source["taps"]), head_taps=head_taps).eval()


# --- wide_resnet50: PatchCore ------------------------------------------------------------------------


def build_wide_resnet50(seed: int = 0) -> WideResNet50_2:
    """WideResNet-50-2 in torchvision's layout with torchvision's (seeded) random initialisation."""
    from anomalygpt_edge.export.wide_resnet import WideResNet50_2

    torch.manual_seed(seed)
    return WideResNet50_2().eval()


def export_wide_resnet50(args: argparse.Namespace, writer: BundleWriter) -> EngineBundle:
    """PatchCore's recipe on WideResNet-50-2: layer2+layer3 3×3-averaged patches, L2 kNN, max."""
    from anomalygpt_edge.export import wide_resnet as wrn

    net = build_wide_resnet50(int(getattr(args, "seed", 0) or 0))
    weights = _weights_record(args, net, wrn.WEIGHTS_URL, check_hash=True, optional=wrn.optional_keys(net))
    encoder = wrn.PatchCoreEncoder(net.eval())
    size = (args.image_size, args.image_size)
    source = {
        "kind": "wide_resnet50",
        "architecture": "torchvision wide_resnet50_2 (ImageNet IMAGENET1K_V1 when downloaded)",
        "recipe": "PatchCore: layer2 + layer3, 3x3 local average, layer3 bilinear to the layer2 grid, concat",
        "layers": ["layer2", "layer3"],
        "pool": encoder.pool,
        **weights,
        "licence": "BSD-3-Clause (torchvision weights)",
    }
    preprocess = Preprocess(size=size, resize="squash", interpolation="bilinear", mean=wrn.MEAN, std=wrn.STD)
    return _write_patch_bundle(
        args, writer, encoder, encoder.grid_for(size), encoder.channels(), source, preprocess, "max"
    )


def _wide_resnet50_reference(m: Manifest) -> nn.Module:
    from anomalygpt_edge.export.wide_resnet import PatchCoreEncoder

    _require_random(m)
    return PatchCoreEncoder(build_wide_resnet50(int(m.source["seed"]))).eval()


# --- dinov2-small / dinov2-base: AnomalyDINO ---------------------------------------------------------


def build_dinov2(name: str, seed: int = 0) -> DinoVisionTransformer:
    """DINOv2 ``name`` ("dinov2-small" | "dinov2-base") in the hub layout, seeded random init."""
    from anomalygpt_edge.export import dinov2

    cfg = {"dinov2-small": dinov2.VITS14, "dinov2-base": dinov2.VITB14}[name]
    torch.manual_seed(seed)
    return dinov2.DinoVisionTransformer(cfg).eval()


def export_dinov2(args: argparse.Namespace, writer: BundleWriter) -> EngineBundle:
    """AnomalyDINO's recipe: last-layer normed patch tokens, cosine kNN, mean of the top 1 %."""
    from anomalygpt_edge.export import dinov2

    vit = build_dinov2(args.source, int(getattr(args, "seed", 0) or 0))
    weights = _weights_record(args, vit, vit.cfg.weights_url)
    size = (args.image_size, args.image_size)
    encoder = dinov2.DinoPatchEncoder(vit, size)
    source = {
        "kind": args.source,
        "architecture": f"facebookresearch/dinov2 {vit.cfg.name} (LVD-142M when downloaded)",
        "recipe": "AnomalyDINO: last-layer patch tokens after the final norm, cosine kNN (k=1)",
        "pos_embed": f"bicubic {dinov2.PRETRAIN_GRID}x{dinov2.PRETRAIN_GRID} -> {encoder.grid[0]}x{encoder.grid[1]}",
        **weights,
        "licence": "Apache-2.0 (DINOv2 weights)",
    }
    preprocess = Preprocess(size=size, resize="squash", interpolation="bicubic", mean=dinov2.MEAN, std=dinov2.STD)
    # "mean_top_1pct": the mean of the max(1, floor(1 % of N)) highest patch scores (AnomalyDINO).
    return _write_patch_bundle(
        args, writer, encoder, encoder.grid, encoder.channels(), source, preprocess, "mean_top_1pct"
    )


def _dinov2_reference(m: Manifest) -> nn.Module:
    from anomalygpt_edge.export.dinov2 import DinoPatchEncoder

    _require_random(m)
    return DinoPatchEncoder(build_dinov2(m.source["kind"], int(m.source["seed"])), m.preprocess.size).eval()


def _require_random(m: Manifest) -> None:
    if m.source.get("weights") != "random":
        raise ValueError(
            f"a {m.source.get('kind')} bundle from a weights file ({m.source.get('weights')}) cannot be rebuilt "
            f"in PyTorch without that file; benchmark a --random-weights export of the same source"
        )


# --- anomalygpt ------------------------------------------------------------------------------------


def _export_anomalygpt(args: argparse.Namespace, writer: BundleWriter) -> EngineBundle:
    from anomalygpt_edge.export.anomalygpt_export import export_anomalygpt

    return export_anomalygpt(args, writer)


def _check_anomalygpt(args: argparse.Namespace) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in ("imagebind", "anomalygpt") if getattr(args, n, None) is None]
    if missing and not args.random_weights:
        raise SystemExit(f"export vision --source anomalygpt needs {' and '.join(missing)} (or --random-weights)")
    for name in ("imagebind", "anomalygpt", "pandagpt_delta"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"--{name.replace('_', '-')}: {path} is not a file")


# --- the table -------------------------------------------------------------------------------------

_PRETRAINED = ("weights", "random_weights")


def _dinov2_source(name: str) -> VisionSource:
    """A DINOv2 row: both sizes take 448 px by default, multiples of the 14 px patch, 28 px (2 patches) at least."""
    return VisionSource(name, 448, 14, 28, _PRETRAINED, export_dinov2, reference=_dinov2_reference)


SOURCES: dict[str, VisionSource] = {
    s.name: s
    for s in (
        VisionSource(
            "efficientnet-lite0",
            256,
            8,
            32,
            ("taps", "head_taps"),
            export_efficientnet,
            reference=_efficientnet_reference,
        ),
        # Multiple of 16: the layer3 grid is then exactly half the layer2 grid.
        VisionSource(
            "wide_resnet50", 224, 16, 32, _PRETRAINED, export_wide_resnet50, "l2", reference=_wide_resnet50_reference
        ),
        _dinov2_source("dinov2-small"),
        _dinov2_source("dinov2-base"),
        VisionSource(
            "anomalygpt",
            224,
            14,
            224,
            ("random_weights", "imagebind", "anomalygpt", "pandagpt_delta", "bpe_vocab"),
            _export_anomalygpt,
            fixed_size=True,
            graphs=4,  # encoder, bank matcher, decoder, prompt learner
            files=1,  # the text features
        ),
    )
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def validate(args: argparse.Namespace) -> VisionSource:
    """Check ``args`` against its source's row and fill in the per-source defaults; return the row.

    Raises SystemExit with one line naming the flag for a flag the source does not take, an input
    size it cannot use, or a weights file that is not there.
    """
    spec = SOURCES.get(args.source)
    if spec is None:
        raise SystemExit(f"export vision: unknown --source {args.source!r}; choose from {', '.join(SOURCES)}")
    for dest, unset in SOURCE_FLAGS.items():
        if dest not in spec.flags and getattr(args, dest, unset) not in (unset, None):
            takers = ", ".join(s.name for s in SOURCES.values() if dest in s.flags)
            raise SystemExit(f"export vision --source {spec.name}: {_flag(dest)} does not apply (only to {takers})")
    size = getattr(args, "image_size", None) or spec.default_size
    if spec.fixed_size and size != spec.default_size:
        raise SystemExit(f"export vision --source {spec.name}: the input size is fixed at {spec.default_size}")
    if size < spec.min_size or size % spec.size_multiple:
        raise SystemExit(
            f"--image-size for {spec.name} must be a multiple of {spec.size_multiple} and at least "
            f"{spec.min_size}, got {size}"
        )
    args.image_size = size
    if getattr(args, "metric", None) is None:
        args.metric = spec.default_metric
    weights = getattr(args, "weights", None)
    if weights is not None:
        if getattr(args, "random_weights", False):
            raise SystemExit("export vision: --weights and --random-weights exclude each other")
        if not Path(weights).is_file():
            raise SystemExit(f"--weights: {weights} is not a file")
    if spec.name == "anomalygpt":
        _check_anomalygpt(args)
    return spec


def reference_encoder(manifest: Manifest) -> nn.Module:
    """The PyTorch encoder a bundle was exported from, rebuilt for ``bench vision``.

    Raises ValueError when the source has no single-layer reference, or when its weights came from a
    file the bundle does not carry (only seeded random weights are rebuilt).
    """
    kind = manifest.source.get("kind")
    spec = SOURCES.get(str(kind))
    if spec is None or spec.reference is None:
        raise ValueError(f"no PyTorch reference for a {kind} bundle")
    return spec.reference(manifest)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``export vision``; returns the exit code."""
    spec = validate(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    writer = BundleWriter(Path(args.out), overwrite=args.overwrite, steps=spec.steps(not args.no_fp16))
    try:
        bundle = spec.export(args, writer)
    except BaseException:
        writer.abort()
        raise
    print(writer.report())
    print(f"bundle sha256 {bundle.sha256}")
    return 0
