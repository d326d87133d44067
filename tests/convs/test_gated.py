"""GatedConv2d and AffineGatedConv2d: the two normalisation placements, the mask channel, the unified view."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convs
from convs import AffineGatedConv2d, GatedConv2d

GATED = [GatedConv2d, AffineGatedConv2d]

SHAPE = (2, 13, 11)


def force_open(layer):
    """Gate forced open (sigmoid(+inf) = 1 exactly), no shift, and mask channel removed (its weights zeroed)."""
    with torch.no_grad():
        layer.gate_weight.zero_()
        layer.gate_bias.fill_(float("inf"))
        if hasattr(layer, "shift_weight"):
            layer.shift_weight.zero_()
            layer.shift_bias.zero_()
        if layer.mask_weight is not None:
            layer.mask_weight.zero_()


@pytest.mark.parametrize("cls", GATED)
@pytest.mark.parametrize("mask_channel", [False, True])
def test_unified_view_open_gate_is_conv(geometry, mask_channel, cls):
    """Thesis section 3.4: with the gate forced open and no mask channel, gated conv is nn.Conv2d (eq. 3.12)."""
    layer = cls(**geometry, mask_channel=mask_channel, norm="outside")
    force_open(layer)
    x = torch.randn(SHAPE[0], geometry["in_channels"], *SHAPE[1:])
    plain = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-5)


def test_feature_and_gate_pair_up_within_groups():
    """With groups, each output's gate must come from the same input group as its feature."""
    layer = GatedConv2d(4, 4, 3, padding=1, groups=4, bias=False)
    x = torch.randn(1, 4, 6, 6)
    conv = lambda w: F.conv2d(x, w, None, 1, 1, 1, 4)  # noqa: E731
    expected = conv(layer.weight) * torch.sigmoid(conv(layer.gate_weight) + layer.gate_bias.view(1, -1, 1, 1))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", GATED)
def test_from_conv_starts_from_the_source_function(geometry, cls):
    conv = nn.Conv2d(**geometry)
    x = torch.randn(SHAPE[0], geometry["in_channels"], *SHAPE[1:])
    for mask_channel in (False, True):
        layer = cls.from_conv(conv, mask_channel=mask_channel)
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        gate = torch.sigmoid(layer.gate_bias)
        assert torch.all((gate > 0.9) & (gate < 1)), "the gate starts open but not saturated"


@pytest.mark.parametrize("cls", GATED)
def test_inside_placement_eq_3_11_absorbs_bn(cls):
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    conv.eval(), bn.eval()
    layer = cls.from_conv(conv, norm="inside", bn=bn, mask_channel=False).eval()
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(layer(x), torch.relu(bn(conv(x))), rtol=1e-5, atol=1e-5)
    # eq. 3.11 literally: act(BN(feature)) * sigmoid(gate) (+ shift for affine)
    weight, bias = layer.fused_weight()
    feature, gate, *shift = F.conv2d(x, weight, bias, 1, 1).chunk(len(cls.BRANCHES), 1)
    expected = torch.relu(layer.bn(feature)) * torch.sigmoid(gate) + (shift[0] if shift else 0)
    torch.testing.assert_close(layer(x), expected)


def test_default_norm_is_outside_for_gated_and_inside_for_affine():
    assert GatedConv2d(3, 4, 3).norm == "outside" and GatedConv2d.from_conv(nn.Conv2d(3, 4, 3)).norm == "outside"
    assert AffineGatedConv2d(3, 4, 3).norm == "inside"
    assert AffineGatedConv2d.from_conv(nn.Conv2d(3, 4, 3)).norm == "inside"
    assert convs.parse_variant("affine:norm=outside").options == {"norm": "outside"}


def _shift_effect(norm: str) -> float:
    """How much a model's training-mode output moves when every affine layer's shift bias grows by 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    convs.convert(model, f"affine:norm={norm}")
    x = torch.randn(4, 3, 12, 12)
    before = model.train()(x)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, AffineGatedConv2d):
                layer.shift_bias.add_(1.0)
    return (model(x) - before).abs().max().item()


def test_affine_shift_acts_after_the_batch_norm_by_default():
    """SPADE-style: inside, the shift follows the BatchNorm and changes the output. Outside, the model's own
    BatchNorm comes after the shift and subtracts each channel's batch mean, so a constant shift cancels: the
    reason `inside` is the affine default."""
    assert _shift_effect("inside") > 0.5
    assert _shift_effect("outside") < 1e-5
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    convs.convert(model, "affine")
    assert isinstance(model[0], AffineGatedConv2d) and model[0].norm == "inside" and isinstance(model[1], nn.Identity)


@pytest.mark.parametrize("cls", GATED)
def test_mask_channel_sees_ones_inside_the_image(cls):
    layer = cls(3, 4, 3, padding=1, mask_channel=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(layer(x), layer(x, torch.ones(2, 1, 8, 8)))
    assert not torch.allclose(layer(x), layer(x, torch.zeros(2, 1, 8, 8)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="'outside'.*'inside'"):
        GatedConv2d(3, 4, 3, norm="middle")
    with pytest.raises(ValueError, match="mask_channel=True"):
        GatedConv2d(3, 4, 3, padding=1)(torch.randn(1, 3, 5, 5), torch.ones(1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"expected \(1, 1, 5, 5\)"):
        GatedConv2d(3, 4, 3, padding=1, mask_channel=True)(torch.randn(1, 3, 5, 5), torch.ones(1, 1, 4, 5))
    with pytest.raises(ValueError, match="padding_mode"):
        GatedConv2d(3, 4, 3, padding=1, padding_mode="circular")


@pytest.mark.parametrize("cls", GATED)
@pytest.mark.parametrize("norm", ["outside", "inside"])
@pytest.mark.parametrize("groups", [1, 2])
def test_gradients_match_plain_autograd(norm, groups, cls):
    """The fused backward of the common case equals autograd through the plain expression."""
    layer = cls(4, 6, 3, padding=1, groups=groups, norm=norm, mask_channel=True).double()
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64, requires_grad=True)
    params = [x] + [p for p in layer.parameters() if p.dim() > 0]
    n = len(cls.BRANCHES)
    weight, bias = layer.fused_weight()
    ones = torch.ones(1, 1, 7, 9, dtype=torch.float64)
    y = F.conv2d(x, weight, bias, 1, 1, 1, groups) + F.conv2d(ones, layer.mask_weight, None, 1, 1)
    y = y.unflatten(1, (groups, n, 6 // groups))
    feature, gate, *shift = [y[:, :, i].flatten(1, 2) for i in range(n)]
    result = layer.act(layer.bn(feature)) * torch.sigmoid(gate) + (shift[0] if shift else 0)
    expected = result.pow(2).sum()
    for g, g_ref in zip(
        torch.autograd.grad(layer(x).pow(2).sum(), params), torch.autograd.grad(expected, params), strict=True
    ):
        torch.testing.assert_close(g, g_ref)
    torch.autograd.gradcheck(lambda t: layer(t), (x[:1, :, :4, :5].detach().requires_grad_(),))


@pytest.mark.parametrize("cls", GATED)
@pytest.mark.parametrize("norm", ["outside", "inside"])
def test_from_conv_random_keeps_the_feature_and_starts_a_fresh_gate(cls, norm):
    conv, bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    layer = cls.from_conv(conv, norm=norm, bn=bn, mask_channel=True, start="random")
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)  # unscaled
    if norm == "inside":
        assert layer.bn is not bn and torch.equal(layer.bn.weight, bn.weight) and torch.equal(layer.bn.bias, bn.bias)
    bound = 1 / conv.weight[0].numel() ** 0.5  # kaiming_uniform(a=sqrt(5)), a fresh conv's range
    for branch in cls.BRANCHES[1:]:
        weight = getattr(layer, f"{branch}_weight")
        assert weight.abs().max() <= bound and not torch.allclose(weight, conv.weight)
        for i in range(1, conv.out_channels):  # each filter its own init
            assert not torch.allclose(weight[i], weight[0])
    assert layer.mask_weight.abs().min() > 0  # no longer zero: the mask channel has a say from the start
    assert all(torch.equal(getattr(layer, f"{b}_bias"), torch.zeros(8)) for b in cls.BRANCHES[1:])  # as a fresh layer
    x = torch.randn(2, 3, 9, 9)
    assert not torch.allclose(layer.eval()(x), cls.from_conv(conv, norm=norm, bn=bn).eval()(x), atol=1e-3)


@pytest.mark.parametrize("cls", GATED)
def test_from_conv_rejects_an_unknown_start(cls):
    with pytest.raises(ValueError, match=rf"Invalid start 'zeros' for {cls.__name__}.from_conv"):
        cls.from_conv(nn.Conv2d(3, 4, 3, padding=1), start="zeros")


@pytest.mark.parametrize("variant", ["gated", "affine", "edge"])
def test_convert_start_random_against_copy(variant):
    """start=copy keeps the source's function through convert; start=random does not (fresh filters)."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 10, 10)
    expected = source(x)
    copied, fresh = copy.deepcopy(source), copy.deepcopy(source)
    convs.convert(copied, f"{variant}:start=copy")
    convs.convert(fresh, variant, start="random")
    torch.testing.assert_close(copied(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fresh(x), expected, atol=1e-3)
    assert torch.equal(fresh[2].weight, source[2].weight)
