"""MemoryBank: golden-part patch features per encoder layer, bounded by greedy coreset subsampling.

Growth with k golden images (N patches per image, C channels, B the patch budget):
memory is k·N·C·4 bytes until k·N reaches B, then stays at B·C·4; matching one query costs
N·min(k·N, B)·C multiply-adds, so it grows linearly with k up to the budget and is flat after it.
Coreset selection itself costs O(k·N · B · d) with d the projection width (enrollment only).

Stored as ``.npz`` with ``allow_pickle=False``: arrays only, metadata as a JSON string.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt_edge.atomic_files import atomic_write_bytes

BANK_FORMAT = 1
#: Default patch budget per layer: 16384 patches keeps matching under ~20 ms for the default
#: encoder on a 2-core CPU and is about 21 golden images' worth at 28×28 patches.
DEFAULT_BUDGET = 16384
_PROJECTION_DIM = 64


class BankError(ValueError):
    """A memory bank that cannot be used: unreadable, of another bundle or format."""


@dataclass
class MemoryBank:
    """Per-layer bank arrays (M, C_l), all layers subsampled at the same patch indices."""

    layers: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return next(iter(self.layers.values())).shape[0]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.layers.values())

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = {**self.meta, "format": BANK_FORMAT, "layers": list(self.layers)}
        arrays = {f"layer_{i}": a for i, a in enumerate(self.layers.values())}
        # Named, not left to its default: load() refuses pickles, and numpy's stubs would otherwise
        # match **arrays against this bool keyword.
        np.savez(buf, allow_pickle=False, meta=np.array(json.dumps(meta)), **arrays)
        return buf.getvalue()

    def save(self, path: Path) -> None:
        """Crash-safe write (temp file, fsync, rename)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> MemoryBank:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BankError(f"{path}: unreadable memory bank: {exc}") from exc
        return cls.from_bytes(data, str(path))

    @classmethod
    def from_bytes(cls, raw: bytes, origin: str) -> MemoryBank:
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != BANK_FORMAT:
                    raise BankError(f"{origin}: bank format {meta.get('format')} is not {BANK_FORMAT}; re-enroll")
                layers = {name: data[f"layer_{i}"] for i, name in enumerate(meta["layers"])}
        except BankError:
            raise
        except Exception as exc:
            raise BankError(f"{origin}: unreadable memory bank: {exc}") from exc
        return cls(layers, meta)

    def check(self, widths: dict[str, int] | None, origin: str) -> None:
        """Refuse a bank that cannot score correctly: wrong layers or width, not float, empty or non-finite.

        A NaN in the bank makes every similarity NaN, and ``NaN > threshold`` is False: every part
        would pass. So this runs before a bank is ever used.
        """
        if widths is not None and list(self.layers) != list(widths):
            raise BankError(f"{origin}: bank layers {list(self.layers)} are not the bundle's {list(widths)}; re-enroll")
        rows = {a.shape[0] if a.ndim == 2 else -1 for a in self.layers.values()}
        for name, a in self.layers.items():
            if a.ndim != 2 or a.shape[0] == 0 or len(rows) != 1:
                raise BankError(f"{origin}: bank layer {name} has shape {a.shape}; expected (patches, width), aligned")
            if a.dtype not in (np.float32, np.float16):
                raise BankError(f"{origin}: bank layer {name} has dtype {a.dtype}; expected float32")
            if widths is not None and a.shape[1] != widths[name]:
                raise BankError(
                    f"{origin}: bank layer {name} has feature width {a.shape[1]}, the bundle's encoder gives "
                    f"{widths[name]}: this bank belongs to another encoder; re-enroll"
                )
            if not np.all(np.isfinite(a)):
                raise BankError(f"{origin}: bank layer {name} holds NaN or infinite values; re-enroll")


#: How many coreset picks between two ``on_progress`` calls (a call costs nothing next to a pick's pass).
CORESET_REPORT_EVERY = 512


def greedy_coreset(
    features: np.ndarray, budget: int, seed: int = 0, on_progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """Indices of ``budget`` rows chosen by greedy k-centre (PatchCore's coreset) on a projection.

    Each step adds the point farthest from the chosen set, so rare patches (edges, features that
    appear in few golden parts) survive subsampling, unlike random sampling. ``on_progress(picked,
    budget)`` hears of the picks (the longest step of a large enrollment; a command line shows it).
    """
    n = features.shape[0]
    if budget >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    x = features.astype(np.float32)
    if x.shape[1] > _PROJECTION_DIM:  # Johnson-Lindenstrauss: distances survive a random projection
        proj = rng.standard_normal((x.shape[1], _PROJECTION_DIM)).astype(np.float32) / np.sqrt(_PROJECTION_DIM)
        x = x @ proj
    sq = np.einsum("ij,ij->i", x, x)
    chosen = np.empty(budget, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    dist = np.full(n, np.inf, dtype=np.float32)
    if on_progress is not None:
        on_progress(0, budget)  # the step starts now: its ETA counts from here
    for i in range(1, budget + 1):
        c = chosen[i - 1]
        d = sq - 2.0 * (x @ x[c]) + sq[c]
        np.minimum(dist, d, out=dist)
        if on_progress is not None and (i % CORESET_REPORT_EVERY == 0 or i == budget):
            on_progress(i, budget)
        if i == budget:
            break
        chosen[i] = int(np.argmax(dist))
    return np.sort(chosen)


def build_bank(
    per_sample: list[dict[str, np.ndarray]],
    budget: int = DEFAULT_BUDGET,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Concatenate golden samples' patch features per layer; coreset-subsample above ``budget``.

    Selection runs on the concatenation of all layers (normalised per layer) so one index set
    keeps the layers aligned. ``on_progress``: the coreset's picks (see :func:`greedy_coreset`).
    """
    if not per_sample:
        raise BankError("a memory bank needs at least one golden sample")
    names = list(per_sample[0])
    full = {n: np.concatenate([s[n].reshape(-1, s[n].shape[-1]) for s in per_sample]).astype(np.float32) for n in names}
    total = full[names[0]].shape[0]
    if total <= budget:
        return full, {"budget": budget, "total_patches": total, "kept_patches": total, "subsampled": False}
    joint = np.concatenate([f / (np.linalg.norm(f, axis=1, keepdims=True).mean() + 1e-12) for f in full.values()], 1)
    idx = greedy_coreset(joint, budget, seed, on_progress)
    kept = {n: np.ascontiguousarray(f[idx]) for n, f in full.items()}
    return kept, {"budget": budget, "total_patches": total, "kept_patches": len(idx), "subsampled": True}
