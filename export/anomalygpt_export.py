"""``export vision --source anomalygpt``: AnomalyGPT's image side as an engine bundle.

Graphs (all with a dynamic batch axis, each with an FP16 variant):

* ``encoder``: ``pixel_values (B,3,224,224)`` -> ``image_embed (B,1024)`` (unit norm), ``img_llm
  (B,1,4096)`` (``llama_proj`` folded in) and ``tap7``/``tap15``/``tap23``/``tap31`` (B,256,1280),
  raw residual stream with CLS dropped.
* ``bank_matcher``: few-shot matching of ``q_0..q_3`` against ``bank_0..bank_3`` (cosine, max over
  the bank, mean over layers, 1 - sim, bilinear to 224).
* ``decoder``: taps + ``text_feats (B,2,1024)`` -> ``anomaly_map (B,1,224,224)`` (text matching).
* ``prompt_learner``: ``anomaly_map`` -> ``prompt_embeds (B,18,4096)``.

The per-class [normal, abnormal] text features are computed here with ImageBind's text tower and
stored as ``text_features.npz`` (no pickle); the text tower is never exported.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalygpt_edge.atomic_files import sha256_file
from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.manifest import PatchLayer, Preprocess
from anomalygpt_edge.export import checkpoints as ckpt
from anomalygpt_edge.export.anomalygpt_models import (
    PRESETS,
    AnomalyGPTConfig,
    AnomalyGPTEncoder,
    ImageBindVision,
    PromptLearner,
    TextMatchingDecoder,
    tap_names,
)
from anomalygpt_edge.export.anomalygpt_text import (
    CLASS_NAMES,
    DEFAULT_CLASS,
    OBJECT_NAMES,
    ClipBPETokenizer,
    ImageBindText,
    class_text_features,
)
from anomalygpt_edge.export.bank_matcher import BankMatcher
from anomalygpt_edge.export.bundle_writer import BundleWriter, log

#: CLIP's normalisation (ImageBind ``data.py``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_FEATURES_FILE = "text_features.npz"


@dataclasses.dataclass
class AnomalyGPTModules:
    """The reference modules of one export, with where their weights came from."""

    cfg: AnomalyGPTConfig
    vision: ImageBindVision
    llama_proj: torch.nn.Linear
    decoder: TextMatchingDecoder
    prompt_learner: PromptLearner
    text: ImageBindText | None
    tokenizer: ClipBPETokenizer | None
    checkpoints: list[dict[str, Any]]
    random_parts: list[str]


def _checkpoint_record(path: Path, role: str, report: ckpt.LoadReport) -> dict[str, Any]:
    """The manifest's record of one loaded checkpoint: name, role, hash, size and key accounting."""
    log(f"hashing {path} ...")
    entry = {
        "name": Path(path).name,
        "role": role,
        "sha256": sha256_file(Path(path)),
        "size": Path(path).stat().st_size,
        "keys_loaded": report.loaded,
    }
    if report.ignored:
        entry["keys_ignored"] = dict(sorted(report.ignored.items()))
    entry.update(report.info)
    return entry


def _random_parts(
    imagebind: Path | None, anomalygpt: Path | None, pandagpt_delta: Path | None, random_weights: bool
) -> list[str]:
    """The parts no checkpoint is given for; refused unless ``random_weights`` (decided before any read)."""
    random_parts = [
        part
        for part, path in (
            ("vision", imagebind),
            ("decoder", anomalygpt),
            ("prompt_learner", anomalygpt),
            ("llama_proj", pandagpt_delta),
        )
        if path is None
    ]
    if random_parts and not random_weights:
        flags = {"vision": "--imagebind", "decoder": "--anomalygpt", "llama_proj": "--pandagpt-delta"}
        need = ", ".join(f"{part} ({flags[part]})" for part in random_parts if part in flags)
        raise ckpt.CheckpointError(f"no checkpoint for {need}; pass it, or --random-weights to test without")
    return random_parts


def _load_imagebind(
    cfg: AnomalyGPTConfig, imagebind: Path, vision: ImageBindVision, bpe_vocab: Path | None
) -> tuple[ImageBindText | None, ClipBPETokenizer | None, dict[str, Any]]:
    """ImageBind's vision branch into ``vision`` and, with a BPE vocabulary, its text tower too."""
    text = tokenizer = None
    if bpe_vocab is not None:
        tokenizer = ClipBPETokenizer(bpe_vocab, cfg.text_context)
        if tokenizer.vocab_size != cfg.text_vocab:
            raise ckpt.CheckpointError(
                f"{bpe_vocab}: BPE vocabulary has {tokenizer.vocab_size} tokens, the text tower "
                f"{cfg.text_vocab}; use CLIP's bpe_simple_vocab_16e6.txt.gz"
            )
        text = ImageBindText(cfg).eval()
    log(f"loading {imagebind} ...")
    state = ckpt.read_state_dict(imagebind)
    report = ckpt.load_imagebind(imagebind, vision, text, state=state)
    del state
    role = "imagebind_huge (vision branch" + (" + text tower)" if text else ")")
    return text, tokenizer, _checkpoint_record(imagebind, role, report)


def build_modules(
    cfg: AnomalyGPTConfig,
    imagebind: Path | None = None,
    anomalygpt: Path | None = None,
    pandagpt_delta: Path | None = None,
    bpe_vocab: Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
) -> AnomalyGPTModules:
    """Build the modules for ``cfg`` and load every checkpoint given (strict key accounting).

    A part with no checkpoint keeps seeded random weights, which is allowed only with
    ``random_weights`` (and is then recorded in the manifest).
    """
    # Decide up front, before reading gigabytes, whether every part has weights.
    random_parts = _random_parts(imagebind, anomalygpt, pandagpt_delta, random_weights)
    torch.manual_seed(seed)
    vision = ImageBindVision(cfg).eval()
    llama_proj = torch.nn.Linear(cfg.embed_dim, cfg.llm_width).eval()
    decoder = TextMatchingDecoder(cfg).eval()
    prompt_learner = PromptLearner(cfg).eval()
    text = tokenizer = None
    records: list[dict[str, Any]] = []
    if imagebind is not None:
        text, tokenizer, entry = _load_imagebind(cfg, imagebind, vision, bpe_vocab)
        records.append(entry)
    if anomalygpt is not None:
        log(f"loading {anomalygpt} ...")
        report = ckpt.load_anomalygpt(anomalygpt, decoder, prompt_learner)
        records.append(_checkpoint_record(anomalygpt, "anomalygpt (image_decoder + prompt_learner)", report))
    if pandagpt_delta is not None:
        log(f"loading {pandagpt_delta} ...")
        report = ckpt.load_pandagpt_delta(pandagpt_delta, llama_proj)
        records.append(_checkpoint_record(pandagpt_delta, "pandagpt_delta (llama_proj; LoRA for the LLM)", report))
    return AnomalyGPTModules(cfg, vision, llama_proj, decoder, prompt_learner, text, tokenizer, records, random_parts)


def compute_text_features(mods: AnomalyGPTModules, seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Per-object (2, E) [normal, abnormal] float32 features and a label of how they were made.

    With the text tower loaded they are AnomalyGPT's prompt-ensemble features; with random weights
    and no text tower they are random unit vectors, labelled as such (useful for plumbing only).
    """
    if mods.text is not None and mods.tokenizer is not None:
        log(f"computing text features for {len(OBJECT_NAMES)} classes with the ImageBind text tower ...")
        feats = {name: class_text_features(mods.text, mods.tokenizer, name).numpy() for name in OBJECT_NAMES}
        how = "ImageBind text tower, AnomalyGPT prompt ensemble"
        return {k: v.astype(np.float32) for k, v in feats.items()}, how
    rng = np.random.default_rng(seed)
    feats = {}
    for name in OBJECT_NAMES:
        v = rng.standard_normal((mods.cfg.n_states, mods.cfg.embed_dim)).astype(np.float32)
        feats[name] = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return feats, "RANDOM unit-norm vectors (--random-weights export; not meaningful text features)"


def _save_npz(features: dict[str, np.ndarray]):
    def write(path: Path) -> None:
        # Plain .npy arrays only: the runtime reads them with allow_pickle=False.
        with open(path, "wb") as f:
            np.savez(f, allow_pickle=False, **features)

    return write


def export_anomalygpt(args: argparse.Namespace, writer: BundleWriter) -> EngineBundle:
    """Write the AnomalyGPT bundle (encoder, bank matcher, decoder, prompt learner, text features)."""
    preset = getattr(args, "anomalygpt_size", "full") or "full"
    cfg = PRESETS[preset]
    bpe_vocab = getattr(args, "bpe_vocab", None)
    seed = int(getattr(args, "seed", 0) or 0)
    fp16 = not args.no_fp16
    if args.imagebind is not None and bpe_vocab is None and not args.random_weights:
        raise SystemExit(
            "export vision --source anomalygpt: computing the decoder's text features needs CLIP's BPE "
            "vocabulary (bpe_simple_vocab_16e6.txt.gz, shipped with ImageBind): pass --bpe-vocab"
        )
    try:
        mods = build_modules(
            cfg, args.imagebind, args.anomalygpt, args.pandagpt_delta, bpe_vocab, args.random_weights, seed
        )
    except ckpt.CheckpointError as exc:
        # A user-facing file problem: the message names the file and keys; a traceback adds nothing.
        raise SystemExit(f"export vision --source anomalygpt: {exc}") from exc
    if mods.random_parts:
        log(f"RANDOM weights for: {', '.join(mods.random_parts)} (testing only)")
    bundle = write_bundle(mods, writer, fp16=fp16, seed=seed, preset=preset)
    return bundle


def _add_graphs(mods: AnomalyGPTModules, writer: BundleWriter, fp16: bool) -> None:
    """Export the encoder, bank matcher, decoder and prompt learner, each with a dynamic batch axis."""
    cfg = mods.cfg
    size, g, taps = cfg.image_size, cfg.grid, tap_names(cfg)
    batch = {0: "batch"}

    encoder = AnomalyGPTEncoder(mods.vision, mods.llama_proj).eval()
    names = encoder.output_names()
    writer.add_graph(
        "encoder",
        encoder,
        {"pixel_values": torch.randn(1, 3, size, size)},
        names,
        {"pixel_values": batch, **{n: batch for n in names}},
        fp16=fp16,
    )
    del encoder

    matcher = BankMatcher(len(taps), (g, g), (cfg.map_size, cfg.map_size), metric="cosine")
    _, matcher_out = matcher.io_names()
    writer.add_graph(
        "bank_matcher",
        matcher,
        matcher.example_inputs([cfg.width] * len(taps)),
        matcher_out,
        matcher.dynamic_axes(),
        fp16=fp16,
    )

    text = torch.nn.functional.normalize(torch.randn(1, cfg.n_states, cfg.embed_dim), dim=-1)
    dec_inputs = {n: torch.randn(1, cfg.n_patches, cfg.width) for n in taps} | {"text_feats": text}
    writer.add_graph(
        "decoder",
        mods.decoder,
        dec_inputs,
        ["anomaly_map"],
        {**{n: batch for n in dec_inputs}, "anomaly_map": batch},
        fp16=fp16,
    )
    writer.add_graph(
        "prompt_learner",
        mods.prompt_learner,
        {"anomaly_map": torch.rand(1, 1, cfg.map_size, cfg.map_size)},
        ["prompt_embeds"],
        {"anomaly_map": batch, "prompt_embeds": batch},
        fp16=fp16,
    )


def write_bundle(
    mods: AnomalyGPTModules, writer: BundleWriter, fp16: bool = True, seed: int = 0, preset: str = "full"
) -> EngineBundle:
    """Export every graph and the text features of ``mods`` through ``writer`` and finish the bundle."""
    _add_graphs(mods, writer, fp16)
    features, how = compute_text_features(mods, seed)
    writer.add_file(TEXT_FEATURES_FILE, _save_npz(features), f"text features ({len(features)} classes)")
    return writer.finish(**_manifest_fields(mods, preset, how))


def _manifest_fields(mods: AnomalyGPTModules, preset: str, how: str) -> dict[str, Any]:
    """What the manifest says of an AnomalyGPT bundle beyond its graphs: source, preprocessing, text, LLM."""
    cfg = mods.cfg
    size, g, taps = cfg.image_size, cfg.grid, tap_names(cfg)
    source: dict[str, Any] = {
        "kind": "anomalygpt",
        "preset": preset,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "taps": list(cfg.taps),
        "random_weights": mods.random_parts,
        "checkpoints": mods.checkpoints,
        # ImageBind's weights are CC-BY-NC-4.0; the AnomalyGPT/PandaGPT/Vicuna files carry their own terms.
        "licence": "ImageBind weights CC-BY-NC-4.0 (non-commercial); see the AnomalyGPT/PandaGPT cards",
    }
    return dict(
        source=source,
        preprocess=Preprocess(
            size=(size, size),
            resize="shorter_side_crop",
            interpolation="bicubic",
            mean=CLIP_MEAN,
            std=CLIP_STD,
            color="RGB",
        ),
        patch_layers=[PatchLayer(n, (g, g), cfg.width) for n in taps],
        map_size=(cfg.map_size, cfg.map_size),
        matching={
            "metric": "cosine",
            "image_score": "max",
            "smoothing_sigma": 0,
            # AnomalyGPT: with normal images enrolled, the few-shot map replaces the text map.
            "few_shot": "replaces_text_map",
        },
        text_features={
            "file": TEXT_FEATURES_FILE,
            "classes": list(OBJECT_NAMES),
            "default_class": DEFAULT_CLASS,
            "selection": {
                "rule": "first entry of 'order' that is a substring of the user prompt, else default_class",
                "order": list(CLASS_NAMES),
                "underscores": "a class name's underscores are spaces ('metal_nut' -> 'metal nut')",
            },
            "layout": "per class (2, embed_dim) float32: [normal, abnormal], unit norm",
            "decoder_input": "text_feats",
            "source": how,
        },
        llm={
            "image_embedding_output": "img_llm",
            "width": cfg.llm_width,
            "n_prompts": cfg.n_prompts,
            "prompt_graph": "prompt_learner",
            "prompt_output": "prompt_embeds",
        },
    )
