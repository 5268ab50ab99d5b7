"""WideResNet-50-2 in torchvision's key layout, and PatchCore's patch encoder on top of it.

torchvision cannot be installed beside the pinned torch here, so the architecture is written out;
its ``state_dict`` keys and shapes are exactly those of ``torchvision.models.wide_resnet50_2``
(``conv1``, ``bn1``, ``layer1.0.conv1`` … ``layer4.2.bn3``, ``layer{1..4}.0.downsample.{0,1}``,
``fc``), so torchvision's ImageNet checkpoint loads key for key. ResNet v1.5: the stride of a
downsampling bottleneck sits on its 3×3 convolution. 68,883,240 parameters.

PatchCore (Roth et al., CVPR 2022) with this backbone: the outputs of ``layer2`` (stride 8, 512
channels) and ``layer3`` (stride 16, 1024 channels), each averaged over its 3×3 neighbourhood
(stride 1, zero padding counted as in PatchCore's unfold), ``layer3`` upsampled bilinearly to the
``layer2`` grid and concatenated: one 1536-d patch layer on an (H/8)×(W/8) grid, matched with the
L2 nearest-neighbour distance, image score = max patch score. The reference implementation also
projects each patch to 1024 d with adaptive 1-D average pooling; that projection only mixes
neighbouring values of the same vector and is left out (the bank stores 1536-d patches).
``layer4`` and ``fc`` are in the model (the checkpoint has them) but not in the exported graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: torchvision ``Wide_ResNet50_2_Weights.IMAGENET1K_V1``, the weights PatchCore was published with.
#: The 8 hex digits in the file name are the sha256 prefix torch.hub checks.
WEIGHTS_URL = "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"
EXPECTED_PARAMETERS = 68_883_240
LAYERS = (3, 4, 6, 3)
#: Bottleneck width multiplier: "wide" = 2 × ResNet-50's 64 channels per group.
WIDTH_PER_GROUP = 128
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
#: Strides of the tapped stages; the patch grid is the finer one.
TAP_STRIDES = {"layer2": 8, "layer3": 16}


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck``: 1×1 → 3×3 (stride) → 1×1 (×4 channels), plus the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes * WIDTH_PER_GROUP // 64
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class WideResNet50_2(nn.Module):  # noqa: N801 - torchvision's name
    """``wide_resnet50_2`` with torchvision's module names (and so its checkpoint keys)."""

    # The four stages are set in a loop (setattr, for torchvision's names); declared so their type is known.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), LAYERS)):
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            layer = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layer += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        self._init_like_torchvision()

    def _init_like_torchvision(self) -> None:
        # torchvision's initialisation, so --random-weights activations have realistic scales.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000); the patch encoder uses the stages directly."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def optional_keys(model: nn.Module) -> set[str]:
    """Keys a checkpoint may omit: BatchNorm's ``num_batches_tracked`` counters.

    torchvision's ResNet files predate the counter (PyTorch 0.4.1) and eval never reads it.
    """
    return {k for k in model.state_dict() if k.endswith("num_batches_tracked")}


class PatchCoreEncoder(nn.Module):
    """``pixel_values (B,3,H,W) -> patches_0 (B, (H/8)·(W/8), 1536)``: PatchCore's layer2 + layer3 patches."""

    def __init__(self, net: WideResNet50_2, pool: int = 3):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.pool = pool

    def _aggregate(self, x: torch.Tensor) -> torch.Tensor:
        # PatchCore unfolds 3×3 neighbourhoods with zero padding and averages them: count the pad.
        return F.avg_pool2d(x, self.pool, stride=1, padding=self.pool // 2, count_include_pad=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        f2 = self.layer2(self.layer1(self.stem(pixel_values)))
        f3 = self.layer3(f2)
        f2, f3 = self._aggregate(f2), self._aggregate(f3)
        f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f2, f3], 1).flatten(2).transpose(1, 2)  # (B, N, C), row-major patches

    @staticmethod
    def grid_for(image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (rows, cols) for an input of ``image_size`` (H, W): the layer2 grid."""
        s = TAP_STRIDES["layer2"]
        return (-(-image_size[0] // s), -(-image_size[1] // s))

    def channels(self) -> int:
        """Feature width of a patch: 512 (layer2) + 1024 (layer3)."""
        last2, last3 = self.layer2[-1], self.layer3[-1]
        # Indexing a Sequential is typed as any Module; every stage is built of Bottlenecks.
        assert isinstance(last2, Bottleneck) and isinstance(last3, Bottleneck)
        return last2.bn3.num_features + last3.bn3.num_features
