"""The few-shot memory-bank matcher as a torch module, exported to ONNX for every bundle.

AnomalyGPT's few-shot path (``openllama.py`` 627-636): per tapped layer, cosine similarity of
every query patch to every bank patch, max over the bank, mean over layers, ``1 - sim``, then a
bilinear (align_corners) upsample of the patch grid to the map size. The bank is a graph *input*
with a dynamic length, so enrolling more golden parts never rebuilds a graph.

``metric="l2"`` (PatchCore's nearest-neighbour distance) is offered for encoders whose features
are not trained for cosine similarity; the manifest records which metric a bundle uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalygpt_edge.engines.manifest import MATCH_METRICS as METRICS


class BankMatcher(nn.Module):
    """``forward(q_0..q_{L-1}, bank_0..bank_{L-1}) -> (anomaly_map, patch_scores)``.

    q_l: (B, N, C_l) query patch tokens; bank_l: (M, C_l) golden patch tokens (raw, as the
    encoder emits them). anomaly_map: (B, 1, H, W); patch_scores: (B, N) before upsampling.
    """

    def __init__(self, n_layers: int, grid: tuple[int, int], map_size: tuple[int, int], metric: str = "cosine"):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
        self.n_layers = n_layers
        self.grid = grid
        self.map_size = map_size
        self.metric = metric

    def _layer_score(self, q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            qn = F.normalize(q, dim=-1)
            bn = F.normalize(bank, dim=-1)
            sim = torch.matmul(qn, bn.transpose(0, 1))  # (B, N, M)
            return sim.max(dim=-1).values  # (B, N)
        # Squared L2 via the expansion, clamped: exact up to rounding, and one matmul like cosine.
        d2 = (q * q).sum(-1, keepdim=True) - 2.0 * torch.matmul(q, bank.transpose(0, 1)) + (bank * bank).sum(-1)
        return d2.min(dim=-1).values.clamp_min(0.0).sqrt()

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries, banks = tensors[: self.n_layers], tensors[self.n_layers :]
        scores = torch.stack([self._layer_score(q, b) for q, b in zip(queries, banks)]).mean(0)
        patch_scores = 1.0 - scores if self.metric == "cosine" else scores
        b = patch_scores.shape[0]
        grid = patch_scores.reshape(b, 1, self.grid[0], self.grid[1])
        anomaly_map = F.interpolate(grid, size=self.map_size, mode="bilinear", align_corners=True)
        return anomaly_map, patch_scores

    def io_names(self) -> tuple[list[str], list[str]]:
        inputs = [f"q_{i}" for i in range(self.n_layers)] + [f"bank_{i}" for i in range(self.n_layers)]
        return inputs, ["anomaly_map", "patch_scores"]

    def example_inputs(self, dims: list[int], batch: int = 1, bank: int = 64) -> dict[str, torch.Tensor]:
        n = self.grid[0] * self.grid[1]
        names, _ = self.io_names()
        tensors = [torch.randn(batch, n, d) for d in dims] + [torch.randn(bank, d) for d in dims]
        return dict(zip(names, tensors))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {f"q_{i}": {0: "batch"} for i in range(self.n_layers)}
        axes.update({f"bank_{i}": {0: "bank"} for i in range(self.n_layers)})
        axes.update({"anomaly_map": {0: "batch"}, "patch_scores": {0: "batch"}})
        return axes
