"""DINOv2 ViT-S/14 and ViT-B/14 in the key layout of facebookresearch/dinov2's hub checkpoints.

Written out because torch.hub cannot reach GitHub from an export machine without network (and
the hub code pulls in xformers-specific layers). The ``state_dict`` keys and shapes are exactly
those of ``dinov2_vits14_pretrain.pth`` / ``dinov2_vitb14_pretrain.pth`` (plain models, no
register tokens): ``cls_token``, ``pos_embed`` (1, 1 + 37·37, D) for the 518-px pretraining grid,
``mask_token``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
mlp.fc1,mlp.fc2,ls2.gamma}`` and ``norm``. Blocks are pre-norm with LayerScale; LayerNorm ε = 1e-6,
exact GELU. At another input size the positional embedding of the 37×37 grid is resized bicubically
exactly as DINOv2 does (``scale_factor = (grid + 0.1) / 37``, no antialiasing).

AnomalyDINO (Damm et al., WACV 2025): the last layer's patch tokens after the final norm, at 448 px
(a 32×32 grid), matched by cosine distance to the nearest golden patch (k = 1); the image score is
the mean of the top 1 % patch scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 14
#: Pretraining resolution of the hub models: 518 px = 37 × 14, so ``pos_embed`` holds 37×37 + 1 rows.
PRETRAIN_GRID = 37
DEFAULT_IMAGE_SIZE = 448
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class ViTConfig:
    """One DINOv2 backbone: width, depth, heads, and where its official weights live."""

    name: str
    dim: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    parameters: int = 0  # expected total, checked by the tests

    @property
    def weights_url(self) -> str:
        """The hub's download URL (``dinov2/hub/backbones.py``: base/<name>/<name>_pretrain.pth)."""
        return f"{_BASE_URL}/{self.name}/{self.name}_pretrain.pth"


VITS14 = ViTConfig("dinov2_vits14", dim=384, depth=12, heads=6, parameters=22_056_576)
VITB14 = ViTConfig("dinov2_vitb14", dim=768, depth=12, heads=12, parameters=86_580_480)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (DINOv2's ``Attention``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        # Written out rather than scaled_dot_product_attention: plain MatMul/Softmax nodes, which the
        # FP16 variant keeps in FP32 where it must.
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major


class DinoVisionTransformer(nn.Module):
    """DINOv2's ``DinoVisionTransformer`` (patch 14, LayerScale, no registers, identity head)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embed = PatchEmbed(d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAIN_GRID * PRETRAIN_GRID, d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # used by DINOv2 training only
        self._init_like_dinov2()

    def _init_like_dinov2(self) -> None:
        # DINOv2's init (trunc-normal 0.02 for pos_embed and Linear weights), so random-weight
        # activations have the published model's scales.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolated_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """``pos_embed`` for a ``grid`` (rows, cols) of patches: (1, 1 + rows·cols, D).

        DINOv2's ``interpolate_pos_encoding``: unchanged for the 37×37 grid, otherwise a bicubic
        resize of the patch part with the scale factor ``(grid + 0.1) / 37`` (the 0.1 avoids a
        floating-point off-by-one in the output size; it also sets the sampling positions).
        """
        m = PRETRAIN_GRID
        if grid == (m, m):
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        dim = pos.shape[-1]
        patch_pos = F.interpolate(
            patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2),
            scale_factor=((grid[0] + 0.1) / m, (grid[1] + 0.1) / m),
            mode="bicubic",
            align_corners=False,
        )
        if tuple(patch_pos.shape[-2:]) != tuple(grid):
            raise ValueError(f"positional embedding resized to {tuple(patch_pos.shape[-2:])}, wanted {grid}")
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def forward_features(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, (B, 1 + N, D); ``pos_embed`` overrides the resize."""
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + (self.interpolated_pos_embed(grid) if pos_embed is None else pos_embed)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised patch tokens of the last layer (``x_norm_patchtokens``), (B, N, D)."""
        return self.forward_features(x)[:, 1:]


def expected_parameters(cfg: ViTConfig) -> int:
    """Closed-form parameter count of ``cfg`` (the hub models: 22,056,576 and 86,580,480)."""
    d, h = cfg.dim, cfg.dim * cfg.mlp_ratio
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    embed = 3 * PATCH * PATCH * d + d
    tokens = d + (1 + PRETRAIN_GRID**2) * d + d  # cls, pos, mask
    return embed + tokens + cfg.depth * block + 2 * d


class DinoPatchEncoder(nn.Module):
    """``pixel_values (B,3,H,W) -> patches_0 (B, (H/14)·(W/14), D)`` at a fixed input size.

    The resized positional embedding is computed once here (the same torch op as the eager model)
    and stored as a constant, so the graph carries no Resize node whose cubic kernel ONNX Runtime
    might place differently from PyTorch.
    """

    #: The resized positional embedding, a registered buffer: declared so its type is known.
    pos_embed: torch.Tensor

    def __init__(self, vit: DinoVisionTransformer, image_size: tuple[int, int]):
        super().__init__()
        if image_size[0] % PATCH or image_size[1] % PATCH:
            raise ValueError(f"DINOv2 input must be a multiple of {PATCH} px, got {image_size}")
        self.vit = vit
        self.grid = (image_size[0] // PATCH, image_size[1] // PATCH)
        with torch.no_grad():
            self.register_buffer("pos_embed", vit.interpolated_pos_embed(self.grid).detach().clone())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(pixel_values, pos_embed=self.pos_embed)[:, 1:]

    def channels(self) -> int:
        """Feature width of a patch token."""
        return self.vit.cfg.dim


def grid_for(image_size: tuple[int, int]) -> tuple[int, int]:
    """Patch grid (rows, cols) for an input of ``image_size`` (H, W)."""
    return (image_size[0] // PATCH, image_size[1] // PATCH)


def top_fraction_count(n_patches: int, fraction: float = 0.01) -> int:
    """How many patches "the top 1 %" averages: at least one (32×32 grid → 10)."""
    return max(1, math.floor(n_patches * fraction))
