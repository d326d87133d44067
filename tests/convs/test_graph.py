"""Eq. 3.11's activation: the one the source applies right after each BatchNorm, found by torch.fx, so that a
converted model computes its source's function (ResNets included, whose residual branches end in no ReLU)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

import convs
from convs.graph import relu_after_bn


def randomise_batchnorms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every BatchNorm, so that each one matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.normal_(0, 0.5)
    return model.eval()


class FunctionalRelus(nn.Module):
    """ReLU written three ways, a BatchNorm used twice, and an addition: what the trace must tell apart."""

    def __init__(self) -> None:
        super().__init__()
        # conv and bn registered side by side, so that gated's norm="inside" absorbs each bn
        self.pairs = nn.ModuleList(
            nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3, padding=1), "bn": nn.BatchNorm2d(4)}) for _ in range(6)
        )

    def forward(self, x):
        p = [lambda t, pair=pair: pair["bn"](pair["conv"](t)) for pair in self.pairs]
        x = F.relu(p[0](x))
        x = torch.relu(p[1](x))
        x = p[2](x).relu_()
        y = p[3](x)
        x = F.relu(y) + y  # the BatchNorm's output has two users: no ReLU inside
        x = F.relu(p[4](x) + x)  # an addition first
        return torch.sigmoid(p[5](x))  # another activation

    @property
    def convs(self) -> list[nn.Module]:
        return [pair["conv"] for pair in self.pairs]

    @property
    def bns(self) -> list[nn.Module]:
        return [pair["bn"] for pair in self.pairs]


class DataDependent(nn.Module):
    """A forward torch.fx cannot trace: Python control flow on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if x.mean() > 0:
            x = x * 2
        return self.relu(self.bn2(self.conv2(x)) + x)


def test_relu_after_bn_tells_relu_from_addition_and_others():
    model = FunctionalRelus()
    found = relu_after_bn(model)
    assert {model.convs[i]: model.bns[i] for i in range(3)} == found


@pytest.mark.parametrize("builder", [tvm.resnet18, tvm.resnet50])
def test_relu_after_bn_in_torchvision_resnets(builder):
    model = builder()
    found = relu_after_bn(model)
    last = "conv2" if builder is tvm.resnet18 else "conv3"
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            ends_branch = name.endswith(last) or "downsample" in name
            assert (module in found) is not ends_branch, name


@pytest.mark.parametrize(
    ("builder", "variant"),
    [
        (tvm.resnet18, "gated_311"),
        (tvm.resnet18, "affine:norm=inside"),
        (tvm.resnet18, "gated_312"),
        (tvm.resnet50, "gated:norm=inside"),
        (tvm.resnet50, "affine:norm=inside"),
    ],
)
def test_converted_resnet_equals_its_source(builder, variant):
    torch.manual_seed(0)
    model = randomise_batchnorms(builder())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert convs.convert(model, variant) == (20 if builder is tvm.resnet18 else 53)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_a_relu_before_the_residual_addition_would_change_the_function():
    """Control for the test above: a ReLU inside every layer (the old eq. 3.11 default) is not the source."""
    torch.manual_seed(0)
    model = randomise_batchnorms(tvm.resnet18())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        convs.convert(model, "gated_311", activation=nn.ReLU())
        after = model(x)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3 * before.abs().max().item())


def test_eq_3_11_layers_take_the_activation_of_their_source():
    model = tvm.resnet50()
    convs.convert(model, "gated_311")
    block = model.layer1[0]
    assert isinstance(model.conv1.act, nn.ReLU) and isinstance(block.conv1.act, nn.ReLU)
    assert isinstance(block.conv2.act, nn.ReLU)
    assert isinstance(block.conv3.act, nn.Identity) and isinstance(block.downsample[0].act, nn.Identity)
    assert isinstance(block.relu, nn.ReLU), "the model keeps its own ReLU"


def test_eq_3_11_with_functional_relus_equals_its_source():
    torch.manual_seed(0)
    model = randomise_batchnorms(FunctionalRelus())
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        before = model(x)
        convs.convert(model, "gated:norm=inside")
        after = model(x)
    assert [type(c.act) for c in model.convs] == [nn.ReLU] * 3 + [nn.Identity] * 3
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_untraceable_model_gets_the_identity_with_a_warning():
    torch.manual_seed(0)
    model = randomise_batchnorms(DataDependent())
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        before = model(x)
        with pytest.warns(UserWarning, match=r"could not trace the model with torch.fx.*gets the identity"):
            assert convs.convert(model, "gated:norm=inside") == 2
        after = model(x)
    assert isinstance(model.conv1.act, nn.Identity) and isinstance(model.conv2.act, nn.Identity)
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.conv1.bn, nn.BatchNorm2d)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_explicit_activation_wins_and_needs_no_trace():
    model = DataDependent()
    convs.convert(model, "gated:norm=inside", activation=nn.ReLU())  # no warning: nothing to trace
    assert isinstance(model.conv1.act, nn.ReLU) and isinstance(model.conv2.act, nn.ReLU)
    assert convs.GatedConv2d.needs_activation_after_bn(norm="inside")
    assert not convs.GatedConv2d.needs_activation_after_bn(norm="inside", activation=nn.ReLU())
    assert not convs.GatedConv2d.needs_activation_after_bn(norm="outside")
    assert not convs.EdgeConv2d.needs_activation_after_bn()


def test_conv_without_a_batchnorm_keeps_no_activation():
    """norm="inside" on a conv with no BatchNorm to absorb: the layer must not add a ReLU the source lacks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    before = model(x)
    convs.convert(model, "gated:norm=inside")
    assert isinstance(model[0].act, nn.Identity) and isinstance(model[2].act, nn.Identity)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_partially_converted_model_still_traces():
    """Layers converted earlier stay single calls in the trace (they are leaves), so a second convert finds ReLUs."""
    model = tvm.resnet18()
    convs.convert(model, "edge", skip=lambda name, conv: name != "conv1")
    assert isinstance(model.conv1, convs.EdgeConv2d)
    convs.convert(model, "gated_311")
    assert isinstance(model.layer1[0].conv1.act, nn.ReLU) and isinstance(model.layer1[0].conv2.act, nn.Identity)
