"""DeepLabV3+: every conv variant converts all of it (dilated ASPP included); output stride and backbones."""

import pytest
import torch
from torch import nn

import convs
from tasks.segmentation import DeepLabV3Plus


@pytest.mark.parametrize("variant", ["zero", "partial", "gated", "edge", "affine"])
def test_every_variant_converts_the_whole_deeplab_including_dilated_aspp(variant):
    model = DeepLabV3Plus("resnet18", output_stride=8, aspp_rates=(3, 6, 9), aspp_channels=32, decoder_channels=32)
    total = sum(type(m) is nn.Conv2d for m in model.modules())
    dilated = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.dilation != (1, 1)]
    assert any(n.startswith("aspp") for n in dilated) and any(n.startswith("layer4") for n in dilated)
    if variant != "zero":
        convs.convert(model, variant)
        assert sum(type(m) is nn.Conv2d for m in model.modules()) == 0  # no plain conv left, ASPP included
        assert sum(isinstance(m, convs.get(variant)) for m in model.modules()) == total
    out = model(torch.randn(2, 3, 32, 64))
    assert out.shape == (2, 19, 32, 64)
    out.mean().backward()


def test_deeplab_output_stride_and_wide_backbone():
    model = DeepLabV3Plus("wide_resnet50_2", output_stride=16, aspp_channels=32, decoder_channels=32)
    features = model.layer4(model.layer3(model.layer2(model.layer1(model.stem(torch.randn(1, 3, 64, 64))))))
    assert features.shape[-2:] == (4, 4) and features.shape[1] == 2048
    with pytest.raises(ValueError, match="torchvision ResNet"):
        DeepLabV3Plus("vgg16")
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabV3Plus("resnet18", output_stride=4)
