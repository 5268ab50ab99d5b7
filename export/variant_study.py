"""Variant study: which changes to the default vision path hold across every dataset.

``python -m anomalygpt_edge.export.variant_study --data DIR [DIR ...] --json FILE``

A research tool beside ``evaluate``, not a product path: it encodes every image of each dataset
once with the default bundle (``patches_0`` and the head-only ``head_0``), then replays the
16-shot protocol of ``evaluate`` (same seeds, same golden and labelled-defect draws) for many
variants on the cached features, using the product's own matcher maths, upsampling, smoothing,
image-score rules and defect-head training. Its baseline row equals ``evaluate``'s image AUROC.
Rows: bank-only variants (smoothing, image-score rule, which encoder taps go into the bank) and,
with ``--defects K``, defect-head variants (which features the head reads, masks or not).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from anomalygpt_edge.engines.bundle import EngineBundle
from anomalygpt_edge.engines.preprocess import read_image
from anomalygpt_edge.runtime.evaluation.accuracy import auroc
from anomalygpt_edge.runtime.evaluation.evaluate import load_mask, scan_dataset
from anomalygpt_edge.runtime.inspection.defect_head import LabelledDefect
from anomalygpt_edge.runtime.inspection.head_training import ScoredPart, fit_head
from anomalygpt_edge.runtime.inspection.pipeline import VisionPipeline, image_score, upsample_aligned
from anomalygpt_edge.runtime.recipes.enrollment import patch_coverage

SHOTS = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def encode_dataset(pipeline: VisionPipeline, root: Path) -> dict[str, np.ndarray]:
    """Every train/test image's features (all encoder outputs side by side), masks as patch coverage."""
    data = scan_dataset(root)

    def encode(paths: list[Path], tests=None) -> tuple[np.ndarray, list[np.ndarray]]:
        feats, cov = [], []
        for i in range(0, len(paths), 16):
            images = [read_image(p) for p in paths[i : i + 16]]
            preps = [pipeline.prepare(im) for im in images]
            feats.append(pipeline.patches(pipeline.encode(preps)))
            for t, im, prep in zip(tests[i : i + 16] if tests else [], images, preps):
                cov.append(patch_coverage(load_mask(t, im.shape[:2]), prep, pipeline.grid))
        return np.concatenate(feats), cov

    train, _ = encode(data.train)
    test, cov = encode([t.path for t in data.tests], data.tests)
    labels = np.array([t.defect != "good" for t in data.tests])
    return {"train": train, "test": test, "coverage": np.stack(cov), "labels": labels}


class Study:
    """One dataset's cached features and the product's scoring steps on them."""

    def __init__(self, pipeline: VisionPipeline, cache: dict[str, np.ndarray]):
        self.p, self.c = pipeline, cache
        self.bank_dim = pipeline.manifest.patch_layers[0].dim

    def maps(self, q: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (unsmoothed) cosine maps and patch scores, as the bank matcher graph computes them."""
        ps = 1 - (_unit(q) @ _unit(bank).T).max(-1)
        return upsample_aligned(ps.reshape(-1, *self.p.grid), self.p.manifest.map_size), ps

    def scores(self, raw: np.ndarray, sigma: float = 4.0, rule: str = "max") -> np.ndarray:
        smooth = [cv2.GaussianBlur(m, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) if sigma else m for m in raw]
        return np.array([image_score(m, rule) for m in smooth])

    def draw(self, seed: int, defects: int) -> tuple[list[int], list[int], np.ndarray]:
        """The golden, labelled-defect and test indices ``evaluate`` draws for ``seed``."""
        rng = np.random.default_rng(seed)
        golden = sorted(rng.choice(len(self.c["train"]), SHOTS, replace=False).tolist())
        bad = np.flatnonzero(self.c["labels"])
        picked = sorted(rng.choice(bad, defects, replace=False).tolist()) if defects else []
        rest = np.array([i for i in range(len(self.c["test"])) if i not in set(picked)])
        return golden, picked, rest

    def bank_variant(self, seed: int, features: Callable[[np.ndarray], np.ndarray], **score) -> float:
        golden, _, rest = self.draw(seed, 0)
        g = features(self.c["train"][golden])
        raw, _ = self.maps(features(self.c["test"]), g.reshape(-1, g.shape[-1]))
        return auroc(self.scores(raw, **score), self.c["labels"])

    def head_variant(self, seed: int, defects: int, head_cols: slice, masks: bool = True) -> float:
        golden, picked, rest = self.draw(seed, defects)
        b = slice(0, self.bank_dim)
        g, d, t = self.c["train"][golden], self.c["test"][picked], self.c["test"][rest]
        parts = []
        for i in range(SHOTS):
            others = np.concatenate([g[j, :, b] for j in range(SHOTS) if j != i])
            raw, ps = self.maps(g[i : i + 1, :, b], others)
            parts.append(ScoredPart(raw[0], ps[0], g[i][None][..., head_cols]))
        bank = g[..., b].reshape(-1, self.bank_dim)
        draw, dps = self.maps(d[..., b], bank)
        scored = [ScoredPart(draw[j], dps[j], d[j][None][..., head_cols]) for j in range(len(picked))]
        cov = self.c["coverage"]
        labels = [LabelledDefect(s.patches, cov[k] if masks else None) for s, k in zip(scored, picked)]
        head = fit_head(self.p, parts, scored, labels).head
        raw, _ = self.maps(t[..., b], bank)
        logits = head.logits(t[..., head_cols])
        head_map = upsample_aligned(logits.reshape(-1, *self.p.grid), raw.shape[1:])
        return auroc(self.scores(head.fuse(raw, head_map)), self.c["labels"][rest])


def variants(study: Study, defects: int) -> dict[str, Callable[[int], float]]:
    """Every row of the study: name → score of one seed."""
    b, n = study.bank_dim, study.c["train"].shape[-1]
    bank_only = lambda x: x[..., :b]  # noqa: E731 - the default bank
    rows: dict[str, Callable[[int], float]] = {
        "bank: default (block 10, sigma 4, max)": lambda s: study.bank_variant(s, bank_only),
        "bank: sigma 0": lambda s: study.bank_variant(s, bank_only, sigma=0),
        "bank: sigma 2": lambda s: study.bank_variant(s, bank_only, sigma=2),
        "bank: sigma 8": lambda s: study.bank_variant(s, bank_only, sigma=8),
        "bank: mean of top 1 % (AnomalyDINO's rule)": lambda s: study.bank_variant(s, bank_only, rule="mean_top_1pct"),
        "bank: sigma 0 + mean of top 1 %": lambda s: study.bank_variant(s, bank_only, sigma=0, rule="mean_top_1pct"),
    }
    if n > b:  # the default bundle's head-only block-14 features
        rows["bank: blocks 10+14 concatenated"] = lambda s: study.bank_variant(s, lambda x: x)
        rows["bank: blocks 10+14, each L2-normalised"] = lambda s: study.bank_variant(
            s, lambda x: np.concatenate([_unit(x[..., :b]), _unit(x[..., b:])], -1)
        )
        rows["bank: block 14 alone"] = lambda s: study.bank_variant(s, lambda x: x[..., b:])
    if defects:
        rows[f"head K={defects}: reads block 10 (the bank's features)"] = lambda s: study.head_variant(
            s, defects, slice(0, b)
        )
        if n > b:
            rows[f"head K={defects}: reads blocks 10 + 14 (default)"] = lambda s: study.head_variant(
                s, defects, slice(0, n)
            )
            rows[f"head K={defects}: reads block 14 alone"] = lambda s: study.head_variant(s, defects, slice(b, n))
            rows[f"head K={defects}: blocks 10 + 14, masks withheld (multiple-instance)"] = lambda s: (
                study.head_variant(s, defects, slice(0, n), masks=False)
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m anomalygpt_edge.export.variant_study", description=__doc__)
    ap.add_argument("--data", type=Path, nargs="+", required=True)
    ap.add_argument("--bundle", type=Path, default=Path("data/bundles/default"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--defects", type=int, default=8)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    pipeline = VisionPipeline(EngineBundle.open(args.bundle))
    table: dict[str, dict[str, float]] = {}
    for root in args.data:
        print(f"[variant_study] encoding {root}", file=sys.stderr, flush=True)
        study = Study(pipeline, encode_dataset(pipeline, root))
        for name, row in variants(study, args.defects).items():
            table.setdefault(name, {})[root.name] = float(np.mean([row(s) for s in range(args.seeds)]))
            print(f"[variant_study] {root.name}: {name}: {table[name][root.name]:.4f}", file=sys.stderr, flush=True)
    sets = [r.name for r in args.data]
    print("| variant | " + " | ".join(sets) + " | mean |\n| --- |" + " --- |" * (len(sets) + 1))
    for name, per_set in table.items():
        values = [per_set.get(s, float("nan")) for s in sets]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {np.mean(values):.4f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seeds": args.seeds, "defects": args.defects, "rows": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
