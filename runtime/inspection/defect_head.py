"""Defect head: a patch classifier trained at enrollment from labelled defective parts.

Golden parts alone tell the bank what *normal* looks like; a few real defective parts tell the
product what the defects of this line look like. The head is a linear logistic regression on the
encoder's patch features, trained with numpy (Newton's method, L2-regularised, class-balanced),
so nothing but a dot product runs at inspection time and no torch is needed on the device.

Training data, per labelled defect image:

- **with a mask**: positives are the patches the mask covers (at least half the
  image's largest coverage); negatives are the golden patches and the patches of the labelled
  image farther than one patch from the mask (they carry the line's dirt, wear and lighting);
- **without a mask** (multiple-instance): positives are the image's top-scoring patches by the
  bank score (``MIL_TOP_SHARE`` of them); it adds no negatives (its other patches may be defective).

The head's mode is ``mask`` when every labelled image has a mask, ``mil`` when none has, else ``mixed``.

The head alone learns only the defect types it saw (measured: labelled blowholes and cracks do not
help on breaks or frays), so it never replaces the bank: the inspected map is the **sum of the two
z-scores**, each standardised by the image scores of held-out golden parts (cross-fitted, so the
head's statistics describe a good part it has not seen). A defect type not shown keeps the bank's signal.

Stored as ``.npz`` with ``allow_pickle=False`` (arrays, metadata as a JSON string) and hash-checked
from ``recipe.json`` like the bank.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from anomalygpt_edge.atomic_files import atomic_write_bytes

HEAD_FORMAT = 1
#: L2 penalty on the standardised weights (mean log-loss scale). Chosen once, not per dataset.
L2 = 1e-3
NEWTON_STEPS = 25
#: Above this feature width the head works in a PCA projection of this many dimensions (kept as a
#: single linear map, so inspection is still one dot product per patch).
MAX_DIM = 256
#: At most this many negative patches enter training (random, seeded): Newton's Hessian costs
#: n·d², and more negatives add little once the golden variation is covered.
MAX_NEGATIVES = 8192
#: Without masks, this share of an image's patches (at least one) are its positives.
MIL_TOP_SHARE = 0.01
#: A masked patch is positive when it covers at least this share of the image's best-covered patch.
MASK_POSITIVE_SHARE = 0.5


class HeadError(ValueError):
    """A defect head that cannot be trained or used; the message says why."""


def linear_logits(mean: np.ndarray, scale: np.ndarray, weight: np.ndarray, bias: float, patches: Any) -> np.ndarray:
    """Patch logits ``((x - mean) / scale) · weight + bias`` for features (..., N, C) → (..., N).

    The one implementation: the live head and the cross-fitting folds (which have no head yet) both use it.
    """
    x = (np.asarray(patches, np.float32) - mean) / scale
    return x @ weight + np.float32(bias)


@dataclass
class DefectHead:
    """Linear patch logits ``((x - mean) / scale) · weight + bias`` and the fusion statistics."""

    mean: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)
    weight: np.ndarray  # (C,)
    bias: float
    bank_mu: float
    bank_sd: float
    head_mu: float
    head_sd: float
    mode: str  # "mask", "mil" or "mixed": how the labelled images taught it
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, patches: np.ndarray) -> np.ndarray:
        """Patch logits for features (..., N, C) → (..., N)."""
        return linear_logits(self.mean, self.scale, self.weight, self.bias, patches)

    def fuse(self, bank_map: np.ndarray, head_map: np.ndarray) -> np.ndarray:
        """The inspected map: the bank's z-score plus the head's, both scaled by held-out golden image scores."""
        return (bank_map - self.bank_mu) / self.bank_sd + (head_map - self.head_mu) / self.head_sd

    def check(self, dim: int, origin: str) -> None:
        """Refuse a head of another feature width or with non-finite numbers."""
        if self.dim != dim or self.mean.shape != (dim,) or self.scale.shape != (dim,):
            raise HeadError(f"{origin}: defect head has feature width {self.dim}, the bundle's patches have {dim}")
        arrays = (self.mean, self.scale, self.weight)
        stats = (self.bias, self.bank_mu, self.bank_sd, self.head_mu, self.head_sd)
        if not all(np.all(np.isfinite(a)) for a in arrays) or not np.all(np.isfinite(stats)):
            raise HeadError(f"{origin}: defect head holds NaN or infinite values")
        if self.bank_sd <= 0 or self.head_sd <= 0 or np.any(self.scale <= 0):
            raise HeadError(f"{origin}: defect head has a zero or negative scale")

    def to_bytes(self) -> bytes:
        meta = {
            **self.meta,
            "format": HEAD_FORMAT,
            "mode": self.mode,
            "bias": self.bias,
            "bank_mu": self.bank_mu,
            "bank_sd": self.bank_sd,
            "head_mu": self.head_mu,
            "head_sd": self.head_sd,
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            meta=np.array(json.dumps(meta)),
            mean=self.mean.astype(np.float32),
            scale=self.scale.astype(np.float32),
            weight=self.weight.astype(np.float32),
        )
        return buf.getvalue()

    def save(self, path: Any) -> None:
        """Crash-safe write (temp file, fsync, rename)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, origin: str) -> DefectHead:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k].astype(np.float32) for k in ("mean", "scale", "weight")}
        except Exception as exc:
            raise HeadError(f"{origin}: unreadable defect head: {exc}") from exc
        if meta.get("format") != HEAD_FORMAT:
            raise HeadError(f"{origin}: defect head format {meta.get('format')} is not {HEAD_FORMAT}; re-enroll")
        try:
            stats = {k: float(meta.pop(k)) for k in ("bias", "bank_mu", "bank_sd", "head_mu", "head_sd")}
            mode = str(meta.pop("mode"))
        except (KeyError, TypeError, ValueError) as exc:
            raise HeadError(f"{origin}: defect head metadata incomplete: {exc}") from exc
        return cls(arrays["mean"], arrays["scale"], arrays["weight"], **stats, mode=mode, meta=meta)


@dataclass(frozen=True)
class LabelledDefect:
    """One known-defective part's patch features (A, N, C) and, if painted, its mask on the patch grid."""

    features: np.ndarray
    coverage: np.ndarray | None  # (N,) share of each patch the mask covers, or None


def training_rows(
    golden: Sequence[np.ndarray],
    defects: Sequence[LabelledDefect],
    defect_bank_scores: Sequence[np.ndarray],
    grid: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Patch rows and 0/1 labels for training, and the mode: ``mask``, ``mil`` or ``mixed``.

    Each labelled image contributes by its own kind: a masked one its covered patches as positives
    and its far-from-mask patches as negatives, an unmasked one its top bank-scoring patches.
    """
    neg = [g.reshape(-1, g.shape[-1]) for g in golden]
    pos = []
    masked = 0
    for d, bank_scores in zip(defects, defect_bank_scores):
        feats = d.features[0]  # the un-augmented view
        if d.coverage is not None and d.coverage.max() > 0:
            masked += 1
            cov = d.coverage
            pos.append(feats[cov >= MASK_POSITIVE_SHARE * cov.max()])
            near = cv2.dilate((cov > 0).reshape(grid).astype(np.uint8), np.ones((3, 3), np.uint8)).reshape(-1)
            neg.append(feats[near == 0])
        else:  # multiple-instance: the image is defective somewhere, most likely where the bank says so
            top = max(1, int(round(MIL_TOP_SHARE * feats.shape[0])))
            pos.append(feats[np.argsort(bank_scores)[-top:]])
    if not pos:
        raise HeadError("no labelled defects to learn from")
    mode = "mask" if masked == len(defects) else "mil" if masked == 0 else "mixed"
    negatives = np.concatenate(neg)
    if negatives.shape[0] > MAX_NEGATIVES:
        negatives = negatives[np.sort(rng.choice(negatives.shape[0], MAX_NEGATIVES, replace=False))]
    positives = np.concatenate(pos)
    x = np.concatenate([negatives, positives]).astype(np.float32)
    y = np.concatenate([np.zeros(len(negatives)), np.ones(len(positives))]).astype(np.float32)
    return x, y, mode


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Class-balanced, L2-regularised logistic regression by Newton's method.

    Returns ``(mean, scale, weight, bias)`` in the original feature space: features are
    standardised, and above :data:`MAX_DIM` projected on their principal axes first; the
    projection is folded into ``weight`` so inspection stays one dot product.
    """
    mean = x.mean(0)
    scale = x.std(0) + 1e-6
    z = (x - mean) / scale
    proj = None
    if z.shape[1] > MAX_DIM:
        _, _, vt = np.linalg.svd(z[:: max(1, len(z) // 4096)], full_matrices=False)
        proj = vt[:MAX_DIM].T  # (C, MAX_DIM)
        z = z @ proj
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise HeadError("the defect head needs both defect and good patches")
    sw = np.where(y > 0, 0.5 / n_pos, 0.5 / n_neg)  # each class weighs half; weights sum to 1
    a = np.concatenate([z, np.ones((len(z), 1), np.float32)], 1).astype(np.float64)
    w = np.zeros(a.shape[1])
    reg = np.full(a.shape[1], l2)
    reg[-1] = 0.0  # the bias is not penalised
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        grad = a.T @ (sw * (p - y)) + reg * w
        hess = (a * (sw * p * (1 - p))[:, None]).T @ a + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    weight, bias = w[:-1], float(w[-1])
    if proj is not None:
        weight = proj @ weight
    return mean.astype(np.float32), scale.astype(np.float32), weight.astype(np.float32), bias


def robust_stats(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation, the latter floored so a degenerate set cannot blow z-scores up."""
    v = np.asarray(values, np.float64).ravel()
    mu = float(v.mean())
    sd = float(v.std())
    return mu, max(sd, 1e-6 * max(1.0, abs(mu)), 1e-9)
