"""DeepLabV3+ (Chen et al. 2018) on a dilated torchvision ResNet: the thesis' segmentation network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.segmentation.deeplabv3 import ASPP

from .data import TRAIN_CLASSES


def dilation_flags(output_stride: int) -> list[bool]:
    """torchvision's `replace_stride_with_dilation` for layer2..layer4 at `output_stride` 8, 16 or 32."""
    return [False, output_stride == 8, output_stride <= 16]


def dilate_basic_blocks(net: ResNet, flags: list[bool]) -> None:
    """Dilate a BasicBlock ResNet (resnet18/34, which torchvision refuses to dilate) by torchvision's own rule.

    As `ResNet._make_layer` with `replace_stride_with_dilation`: a dilated stage's strides become 1 and its
    dilation doubles; its first block keeps the previous dilation, the later blocks take the new one; every 3x3
    conv's padding equals its dilation.
    """
    dilation = 1
    for layer, dilate in zip((net.layer2, net.layer3, net.layer4), flags, strict=True):
        previous = dilation
        if dilate:
            dilation *= 2
        for index, block in enumerate(layer):
            if not isinstance(block, BasicBlock):
                raise TypeError(f"dilate_basic_blocks: expected BasicBlock, got {type(block).__name__}")
            if dilate and index == 0:
                block.conv1.stride = (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)
            d = previous if index == 0 else dilation
            for conv in (block.conv1, block.conv2):
                conv.dilation, conv.padding = (d, d), (d, d)


def _out_channels(layer: nn.Sequential) -> int:
    """Channels a ResNet stage puts out (its last block's last conv: conv3 in a Bottleneck, conv2 in a BasicBlock)."""
    block = layer[-1]
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


def build_backbone(name: str, output_stride: int) -> ResNet:
    """An untrained torchvision ResNet whose last stages trade stride for dilation (DeepLab's output stride).

    Bottleneck backbones (resnet50, wide_resnet50_2, resnext...) are built by torchvision with
    `replace_stride_with_dilation`; BasicBlock ones (resnet18/34) follow the same rule by `dilate_basic_blocks`.
    """
    builder = getattr(torchvision.models, name, None)
    if builder is None or not name.startswith(("resnet", "wide_resnet", "resnext")):
        raise ValueError(
            f"Unknown backbone {name!r}: expected a torchvision ResNet, e.g. resnet18, resnet50, wide_resnet50_2"
        )
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    flags = dilation_flags(output_stride)
    net = builder(weights=None)
    if not any(flags):
        return net
    if isinstance(net.layer1[0], BasicBlock):
        dilate_basic_blocks(net, flags)
        return net
    return builder(weights=None, replace_stride_with_dilation=flags)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al. 2018): a dilated torchvision ResNet encoder, ASPP, and a decoder that merges the
    stride-4 low-level features. `output_stride` 8 dilates the last two stages, 16 the last one (`build_backbone`).

    `stages` 3 or 2 ends the encoder after layer3 or layer2 (ASPP on that stage's features): for a laptop demo,
    where layer3 and layer4 hold 94% of a ResNet18's weights and, converted to edge convolutions (nine filter
    banks each), most of the training time and of the checkpoint size. Layer2 puts out stride 8, so `stages` 2
    needs `output_stride` 8; `stages` 3 keeps the output stride (16 or 8).
    """

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
        stages: int = 4,
    ) -> None:
        super().__init__()
        if stages not in (2, 3, 4):
            raise ValueError(
                f"stages must be 2, 3 (end after layer2 or layer3) or 4 (the whole ResNet), got {stages!r}"
            )
        if stages == 2 and output_stride != 8:
            raise ValueError(
                f"stages=2 ends at layer2, whose output stride is 8: set output_stride=8, not {output_stride}"
            )
        net = build_backbone(backbone, output_stride)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        kept = [net.layer1, net.layer2, net.layer3, net.layer4][:stages]
        # A stage left out is an Identity: no weights, so the state dict has none of its keys.
        self.layer1, self.layer2, self.layer3, self.layer4 = kept + [nn.Identity()] * (4 - stages)
        low_in, high_in = _out_channels(net.layer1), _out_channels(kept[-1])
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
