"""DeepLabV3+ (Chen et al. 2018) on a dilated torchvision ResNet: the thesis' segmentation network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from .data import TRAIN_CLASSES


def _dilate(layer: nn.Module, dilation: int) -> None:
    """Turn a ResNet stage's stride into dilation (DeepLab's output-stride trick) for Basic and Bottleneck blocks."""
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride != (1, 1):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation, module.padding = (dilation, dilation), (dilation, dilation)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al. 2018): a dilated torchvision ResNet encoder, ASPP, and a decoder that merges the
    stride-4 low-level features. `output_stride` 8 dilates the last two stages, 16 the last one."""

    def __init__(
        self,
        backbone: str = "resnet50",
        *,
        num_classes: int = len(TRAIN_CLASSES),
        output_stride: int = 16,
        aspp_rates: tuple[int, ...] = (6, 12, 18),
        aspp_channels: int = 256,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        builder = getattr(torchvision.models, backbone, None)
        if builder is None or not backbone.startswith(("resnet", "wide_resnet", "resnext")):
            raise ValueError(
                f"Unknown backbone {backbone!r}: expected a torchvision ResNet, e.g. resnet18, "
                "resnet50, wide_resnet50_2"
            )
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        net = builder(weights=None)
        if output_stride <= 16:
            _dilate(net.layer4, 2 if output_stride == 16 else 4)
        if output_stride == 8:
            _dilate(net.layer3, 2)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        low_in = (
            net.layer1[-1].conv3.out_channels if hasattr(net.layer1[-1], "conv3") else net.layer1[-1].conv2.out_channels
        )
        high_in = net.fc.in_features
        self.aspp = ASPP(high_in, list(aspp_rates), aspp_channels)
        self.low_level = nn.Sequential(
            nn.Conv2d(low_in, low_level_channels, 1, bias=False), nn.BatchNorm2d(low_level_channels), nn.ReLU(True)
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(aspp_channels + low_level_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(True),
            nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(True),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits (N, num_classes, H, W) at the input's resolution."""
        size = x.shape[-2:]
        low = self.layer1(self.stem(x))
        high = self.aspp(self.layer4(self.layer3(self.layer2(low))))
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.classifier(self.decoder(torch.cat([high, self.low_level(low)], dim=1)))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)
