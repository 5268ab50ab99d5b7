"""PyTorch reference models of AnomalyGPT's inference path, for export to ONNX.

Faithful to ``shared/research/anomalygpt-architecture.md`` (AnomalyGPT commit f21c51b):

* :class:`ImageBindVision` — the ImageBind-Huge vision branch: Conv3d stem over the image repeated
  into 2 frames, CLS token, learnable (1, 1+N, D) positional embedding, pre-trunk LayerNorm,
  sequence-first pre-norm blocks (``nn.MultiheadAttention`` with bias, MLP 4x with exact GELU,
  LayerNorm eps 1e-6), taps after blocks 7/15/23/31 (raw residual stream) and the CLS head
  LayerNorm -> Linear (no bias) -> L2-normalise. Parameter names mirror ``imagebind_huge.pth``.
* :class:`AnomalyGPTEncoder` — the export form of the encoder: the Conv3d stem folded into a
  stride-14 Conv2d (weights summed over time), taps with CLS dropped, and ``llama_proj`` folded
  in as the ``img_llm`` output.
* :class:`TextMatchingDecoder` — ``LinearLayer(1280, 1024, 4)`` plus the text-matching map.
* :class:`PromptLearner` — the conv pyramid that turns the anomaly map into 9 prompts, after 9
  learned base prompts.

Every width, depth and grid comes from :class:`AnomalyGPTConfig`, so tests build the very same
architecture tiny.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AnomalyGPTConfig:
    """Sizes of every AnomalyGPT inference module. Defaults are the real (full-size) model."""

    image_size: int = 224
    patch_size: int = 14
    #: Frames the image is repeated into before the Conv3d stem (ImageBind's PadIm2Video, ntimes=2).
    frames: int = 2
    width: int = 1280
    depth: int = 32
    heads: int = 16
    mlp_ratio: int = 4
    ln_eps: float = 1e-6
    #: 0-based block indices whose outputs are tapped.
    taps: tuple[int, ...] = (7, 15, 23, 31)
    #: ImageBind joint-embedding width (CLS head output, decoder projection width, text features).
    embed_dim: int = 1024
    #: LLM hidden width (Vicuna-7B): llama_proj output and prompt width.
    llm_width: int = 4096
    map_size: int = 224
    #: Output channels of the prompt learner's five 3x3 conv stages (the last conv is 5x5 to llm_width).
    prompt_channels: tuple[int, ...] = (4, 16, 64, 256, 1024)
    n_base_prompts: int = 9
    #: The fixed temperature of the text-matching logits (op:607).
    logit_scale: float = 100.0
    #: Normal/abnormal text-feature pairs per class: 2 (the decoder's softmax is over these).
    n_states: int = 2
    #: ImageBind-Huge text tower (export side only: it precomputes the per-class text features).
    text_width: int = 1024
    text_depth: int = 24
    text_heads: int = 16
    text_context: int = 77
    text_vocab: int = 49408

    @property
    def grid(self) -> int:
        """Patch-grid side: 224 / 14 = 16."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def n_map_prompts(self) -> int:
        """Map-derived prompts: the pyramid halves the map 5 times, then a 5x5 valid conv (224 -> 3x3)."""
        side = self.map_size // 2 ** len(self.prompt_channels) - 4
        return side * side

    @property
    def n_prompts(self) -> int:
        return self.n_base_prompts + self.n_map_prompts

    def validate(self) -> None:
        """Raise ``ValueError`` for sizes the architecture cannot take."""
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not self.taps or max(self.taps) >= self.depth or min(self.taps) < 0:
            raise ValueError(f"taps {self.taps} must be block indices below depth {self.depth}")
        if self.map_size // 2 ** len(self.prompt_channels) < 5:
            raise ValueError(f"map_size {self.map_size} is too small for the prompt learner's 5x5 conv")


#: The real model (ImageBind-Huge + Vicuna-7B widths).
FULL = AnomalyGPTConfig()
#: A tiny model of the same architecture for tests: same 224 input, 16x16 grid, 224 map and 3x3
#: map prompts; narrow and shallow everywhere else.
TINY = AnomalyGPTConfig(
    width=32,
    depth=4,
    heads=4,
    taps=(0, 1, 2, 3),
    embed_dim=24,
    llm_width=40,
    prompt_channels=(2, 4, 4, 8, 8),
    text_width=16,
    text_depth=2,
    text_heads=2,
    text_context=16,
    text_vocab=530,
)
PRESETS = {"full": FULL, "tiny": TINY}


class VisionBlock(nn.Module):
    """ImageBind ``BlockWithMasking`` without layer scale or drop-path: pre-norm attention + MLP.

    Works sequence-first (L, B, D) like the original, so ``nn.MultiheadAttention`` takes the same
    (non-batch-first) path and the weights load unchanged. Also the text tower's block (with a mask).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, bias=True)
        self.norm_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(width, width * mlp_ratio))
        self.mlp.add_module("act", nn.GELU())  # exact (erf) GELU, as nn.GELU's default
        self.mlp.add_module("fc2", nn.Linear(width * mlp_ratio, width))
        self.norm_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.norm_2(x))


class ImageBindVision(nn.Module):
    """ImageBind-Huge vision branch (reference form, Conv3d stem), returning the embedding and taps.

    ``forward(pixel_values) -> (image_embed (B, E), [tap (L, B, D) for each tapped block])`` exactly
    as ``embeddings['vision'][0]`` and ``[1]`` in AnomalyGPT's ImageBind (sequence-first taps with
    CLS at index 0).
    """

    def __init__(self, cfg: AnomalyGPTConfig = FULL):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, p = cfg.width, cfg.patch_size
        self.stem = nn.Conv3d(3, d, kernel_size=(cfg.frames, p, p), stride=(cfg.frames, p, p), bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.n_patches, d))
        self.pre_norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList(VisionBlock(d, cfg.heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.depth))
        self.head_norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.head_proj = nn.Linear(d, cfg.embed_dim, bias=False)
        # Random init at ImageBind's scale (openclip style), so random-weight exports have sane ranges.
        with torch.no_grad():
            nn.init.normal_(self.cls_token, std=d**-0.5)
            nn.init.normal_(self.pos_embed, std=d**-0.5)

    def tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch tokens -> (L, B, D) trunk input: CLS prepended, pos-embed added, pre-LN."""
        b = patch_tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), patch_tokens], dim=1) + self.pos_embed
        return self.pre_norm(x).transpose(0, 1)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks on (L, B, D); return the final stream and the tapped ones (no LayerNorm)."""
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.cfg.taps:
                taps.append(x)
        return x, taps

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(L, B, D) final stream -> (B, E) unit-norm CLS embedding."""
        cls = self.head_norm(x[0])
        return F.normalize(self.head_proj(cls), dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        video = pixel_values.unsqueeze(2).repeat(1, 1, self.cfg.frames, 1, 1)  # PadIm2Video "repeat"
        patches = self.stem(video).flatten(2).transpose(1, 2)  # (B, T'·H'·W' = N, D), row-major
        x, taps = self.trunk(self.tokens(patches))
        return self.head(x), taps


class AnomalyGPTEncoder(nn.Module):
    """Export form of the encoder: ``pixel_values -> image_embed, img_llm, tap_0..tap_3``.

    The Conv3d stem over a repeated image equals a Conv2d with the Conv3d kernel summed over time;
    folding it halves the stem's work and gives TensorRT a plain 2-D convolution. Taps come out
    batch-first with CLS dropped, (B, N, D), as AnomalyGPT's decoder and few-shot bank use them.
    ``img_llm`` is ``llama_proj(image_embed)``, (B, 1, llm_width): the LLM's image token.
    """

    def __init__(self, vision: ImageBindVision, llama_proj: nn.Linear):
        super().__init__()
        cfg = vision.cfg
        self.cfg = cfg
        self.vision = vision
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        with torch.no_grad():
            self.patch_embed.weight.copy_(vision.stem.weight.sum(dim=2))
        self.llama_proj = llama_proj

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v = self.vision
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x, taps = v.trunk(v.tokens(patches))
        embed = v.head(x)
        img_llm = self.llama_proj(embed).unsqueeze(1)
        return (embed, img_llm, *[t.transpose(0, 1)[:, 1:, :] for t in taps])

    def output_names(self) -> list[str]:
        return ["image_embed", "img_llm", *tap_names(self.cfg)]


def tap_names(cfg: AnomalyGPTConfig) -> list[str]:
    """Encoder output names of the tapped layers: ``tap7``, ``tap15``, ``tap23``, ``tap31``."""
    return [f"tap{i}" for i in cfg.taps]


class TextMatchingDecoder(nn.Module):
    """AnomalyGPT's unsupervised map: per tap, project, L2-normalise, match against text features.

    ``forward(tap_0..tap_{k-1} (B, N, D), text_feats (B, 2, E)) -> anomaly_map (B, 1, S, S)``.
    Per layer: ``logits = 100 · p̂ · t̂ᵀ`` (B, N, 2) -> (B, 2, g, g) -> bilinear (align_corners) to
    S on the *logits* -> softmax over the 2 states -> abnormal channel; mean over the layers.
    ``fc`` holds ``image_decoder.fc.{i}`` (4 separate Linear(D -> E) with bias).
    """

    def __init__(self, cfg: AnomalyGPTConfig = FULL):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.ModuleList(nn.Linear(cfg.width, cfg.embed_dim) for _ in cfg.taps)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        taps, text = tensors[:-1], tensors[-1]
        g, s = self.cfg.grid, self.cfg.map_size
        maps = []
        for fc, tap in zip(self.fc, taps, strict=True):
            p = F.normalize(fc(tap), dim=-1)
            logits = self.cfg.logit_scale * torch.matmul(p, text.transpose(-2, -1))  # (B, N, 2)
            b = logits.shape[0]
            grid = logits.transpose(1, 2).reshape(b, self.cfg.n_states, g, g)
            up = F.interpolate(grid, size=(s, s), mode="bilinear", align_corners=True)
            maps.append(torch.softmax(up, dim=1)[:, 1:2])
        return torch.stack(maps).mean(dim=0)

    def input_names(self) -> list[str]:
        return [*tap_names(self.cfg), "text_feats"]


class PromptLearner(nn.Module):
    """``anomaly_map (B, 1, S, S) -> prompt_embeds (B, n_base + n_map, llm_width)``.

    ``meta_net`` indices match the checkpoint (0, 3, 6, 9, 12: 3x3 conv, pad 1; ReLU; max-pool 2;
    15: 5x5 valid conv to llm_width, no activation). Output: the 9 learned ``base_prompts`` then
    the 3x3 conv output in row-major order.
    """

    def __init__(self, cfg: AnomalyGPTConfig = FULL):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in cfg.prompt_channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, cfg.llm_width, 5))
        self.meta_net = nn.Sequential(*layers)
        self.base_prompts = nn.Parameter(torch.randn(cfg.n_base_prompts, cfg.llm_width))

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        b = anomaly_map.shape[0]
        img = self.meta_net(anomaly_map)
        img = img.reshape(b, self.cfg.llm_width, -1).transpose(1, 2)
        return torch.cat([self.base_prompts.unsqueeze(0).expand(b, -1, -1), img], dim=1)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (the spec's counts: vision 632.8 M, decoder 5,246,976, ...)."""
    return sum(p.numel() for p in module.parameters())


#: Parameter counts of the full-size modules, from the architecture spec.
SPEC_PARAMS = {
    "vision": 632_829_440,
    "decoder": 5_246_976,
    "prompt_learner": 107_416_504,
    "llama_proj": 4_198_400,
}


def expected_parameters(cfg: AnomalyGPTConfig) -> dict[str, int]:
    """Closed-form parameter counts for ``cfg`` (checked against :data:`SPEC_PARAMS` at full size)."""
    d, e, m = cfg.width, cfg.embed_dim, cfg.mlp_ratio
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * m * d + m * d) + (m * d * d + d) + 4 * d
    vision = (
        3 * d * cfg.frames * cfg.patch_size**2  # Conv3d stem
        + d  # CLS
        + (1 + cfg.n_patches) * d  # pos-embed
        + 2 * d  # pre-LN
        + cfg.depth * block
        + 2 * d  # head LN
        + d * e  # head Linear
    )
    decoder = len(cfg.taps) * (d * e + e)
    pl, c_in = 0, 1
    for c_out in cfg.prompt_channels:
        pl += c_in * c_out * 9 + c_out
        c_in = c_out
    pl += c_in * cfg.llm_width * 25 + cfg.llm_width + cfg.n_base_prompts * cfg.llm_width
    return {
        "vision": vision,
        "decoder": decoder,
        "prompt_learner": pl,
        "llama_proj": e * cfg.llm_width + cfg.llm_width,
    }
