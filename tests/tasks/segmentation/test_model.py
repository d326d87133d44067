"""DeepLabV3+: every conv variant converts all of it (dilated ASPP included); output stride, backbones and their
dilation, against torchvision's own `replace_stride_with_dilation`."""

import pytest
import torch
import torchvision
from torch import nn

import convs
from tasks import get_task
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


def _geometry(model: nn.Module) -> dict[str, tuple]:
    """(stride, dilation, padding) of every conv of the four ResNet stages, by module name."""
    return {
        name: (m.stride, m.dilation, m.padding)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and name.startswith(("layer1", "layer2", "layer3", "layer4"))
    }


@pytest.mark.parametrize("output_stride, flags", [(8, [False, True, True]), (16, [False, False, True]), (32, None)])
def test_bottleneck_backbones_are_dilated_as_torchvision_dilates_them(output_stride, flags):
    model = DeepLabV3Plus("resnet50", output_stride=output_stride, aspp_channels=16, decoder_channels=16)
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=flags)
    assert _geometry(model) == _geometry(reference)
    if output_stride == 8:  # torchvision's rule: a dilated stage's first block keeps the previous dilation
        assert model.layer3[0].conv2.dilation == (1, 1) and model.layer3[1].conv2.dilation == (2, 2)
        assert model.layer4[0].conv2.dilation == (2, 2) and model.layer4[1].conv2.dilation == (4, 4)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_basic_block_backbones_follow_the_same_rule(output_stride):
    """resnet18 (which torchvision refuses to dilate): per block, the dilation resnet50 gets at the same place."""
    model = DeepLabV3Plus("resnet18", output_stride=output_stride, aspp_channels=16, decoder_channels=16)
    flags = [False, output_stride == 8, output_stride <= 16]
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=flags)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(model, stage)):
            bottleneck = getattr(reference, stage)[index]
            d = bottleneck.conv2.dilation
            assert block.conv1.dilation == block.conv2.dilation == block.conv1.padding == block.conv2.padding == d
            assert block.conv1.stride == bottleneck.conv2.stride and block.conv2.stride == (1, 1)
            if block.downsample is not None:
                assert block.downsample[0].stride == bottleneck.downsample[0].stride
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.layer4(model.layer3(model.layer2(model.layer1(model.stem(x)))))
    assert features.shape[-2:] == (64 // output_stride, 64 // output_stride)


@pytest.mark.parametrize(
    "backbone, stages, output_stride, high_channels, left_out",
    [
        ("resnet18", 3, 16, 256, {"layer4"}),
        ("resnet50", 3, 16, 1024, {"layer4"}),
        ("resnet18", 2, 8, 128, {"layer3", "layer4"}),
    ],
)
def test_fewer_stages_end_the_encoder_early(backbone, stages, output_stride, high_channels, left_out):
    """The cpu preset's lighter encoder: no weights of the stages left out, ASPP on the last kept stage's channels
    at the output stride, the whole image out; pretrained backbone weights still load, the rest reported."""
    options = dict(output_stride=output_stride, aspp_channels=16, decoder_channels=16)
    full = DeepLabV3Plus(backbone, **options)
    model = DeepLabV3Plus(backbone, **options, stages=stages)
    state = model.state_dict()
    assert not any(k.split(".")[0] in left_out for k in state)
    assert {k for k in full.state_dict() if k.split(".")[0] not in left_out | {"aspp"}} <= set(state)
    assert model.aspp.convs[0][0].in_channels == high_channels
    with torch.no_grad():
        high = model.layer4(model.layer3(model.layer2(model.layer1(model.stem(torch.randn(1, 3, 64, 128))))))
        assert high.shape[1:] == (high_channels, 64 // output_stride, 128 // output_stride)
        assert model(torch.randn(2, 3, 64, 128)).shape == (2, 19, 64, 128)
    reference = getattr(torchvision.models, backbone)(weights=None).state_dict()
    missing = get_task("segmentation").load_pretrained(model, reference)
    assert {m.split(".")[0] for m in missing} == left_out | {"fc"}
    assert torch.equal(model.layer2[0].conv1.weight, reference["layer2.0.conv1.weight"])


def test_stages_are_checked():
    with pytest.raises(ValueError, match="stages must be 2, 3"):
        DeepLabV3Plus("resnet18", stages=1)
    with pytest.raises(ValueError, match="set output_stride=8, not 16"):
        DeepLabV3Plus("resnet18", stages=2, output_stride=16)
