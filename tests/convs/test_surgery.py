"""convert() on torchvision models and its contract: counts, idempotence, skips, DDP refusal, clear errors."""

import logging
import warnings

import pytest
import torch
import torchvision.models as tvm
import torchvision.models.segmentation as tvs
from torch import nn

import convs

# name -> (builder, input size, number of plain nn.Conv2d in the model)
MODELS = {
    "resnet50": (tvm.resnet50, 64, 53),
    "wide_resnet50_2": (tvm.wide_resnet50_2, 64, 53),
    "vgg16_bn": (tvm.vgg16_bn, 32, 13),
    "mobilenet_v3_large": (tvm.mobilenet_v3_large, 64, 62),
    "deeplabv3_resnet50": (lambda: tvs.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False), 64, 61),
    "lraspp_mobilenet_v3_large": (lambda: tvs.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None), 64, 66),
}
NON_BASELINE = sorted(v for v in convs.VARIANTS if v != "zero")


def output(model, x):
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


@pytest.mark.slow
@pytest.mark.parametrize("variant", NON_BASELINE)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_convert_torchvision_model(model_name, variant):
    builder, size, n_convs = MODELS[model_name]
    torch.manual_seed(0)
    model = builder().eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = output(model, x)
    assert convs.convert(model, variant) == n_convs
    assert not any(type(m) is nn.Conv2d for m in model.modules())
    assert sum(isinstance(m, convs.get(variant)) for m in model.modules()) == n_convs
    after = output(model, x)
    assert after.shape == before.shape
    if variant != "partial":  # all but partial start from the source's function (README)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    after.float().pow(2).mean().backward()
    layers = [m for m in model.modules() if isinstance(m, convs.get(variant))]
    assert all(m.weight.grad is not None for m in layers)
    assert torch.isfinite(torch.stack([m.weight.grad.abs().sum() for m in layers])).all()


def test_second_call_replaces_nothing_and_warns():
    model = tvm.resnet18()
    assert convs.convert(model, "partial") == 20
    with pytest.warns(UserWarning, match="replaced nothing"):
        assert convs.convert(model, "edge") == 0
    assert not any(isinstance(m, convs.EdgeConv2d) for m in model.modules())


def test_zero_is_the_unchanged_baseline():
    model = tvm.resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convs.convert(model, "zero") == 0
    assert sum(type(m) is nn.Conv2d for m in model.modules()) == 20


def test_skip_by_predicate_and_by_name():
    model = tvm.resnet18()
    no7 = convs.convert(model, "edge", skip=lambda name, conv: conv.kernel_size == (7, 7))  # the thesis' edge_no7
    assert no7 == 19 and type(model.conv1) is nn.Conv2d
    model = tvm.resnet18()
    assert convs.convert(model, "partial", skip={"conv1", "layer1.0.conv2"}) == 18
    assert type(model.layer1[0].conv2) is nn.Conv2d and isinstance(model.layer1[0].conv1, convs.PartialConv2d)


def test_shared_conv_stays_shared():
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert convs.convert(model, "edge") == 1
    assert model[0] is model[2] and isinstance(model[0], convs.EdgeConv2d)


def test_subclasses_of_conv2d_are_left_alone():
    class SameConv(nn.Conv2d):
        pass

    model = nn.Sequential(SameConv(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1))
    assert convs.convert(model, "partial") == 1
    assert type(model[0]) is SameConv


def test_gated_mask_channel_goes_to_the_first_layer_only():
    model = tvm.resnet18()
    convs.convert(model, "gated")
    gated = [m for m in model.modules() if isinstance(m, convs.GatedConv2d)]
    assert gated[0] is model.conv1 and model.conv1.mask_channel
    assert not any(m.mask_channel for m in gated[1:])
    model = tvm.resnet18()
    convs.convert(model, "gated", mask_channel=False)
    assert not model.conv1.mask_channel


def test_gated_inside_absorbs_following_batchnorm():
    torch.manual_seed(0)
    model = tvm.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    convs.convert(model, "gated", norm="inside")
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.conv1.bn, nn.BatchNorm2d)
    assert isinstance(model.layer1[0].bn2, nn.Identity)
    out = model(x)
    assert out.shape == before.shape and torch.isfinite(out).all()


def test_refuses_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 3, 3)))
        with pytest.raises(TypeError, match="Convert the bare model first"):
            convs.convert(ddp, "partial")
    finally:
        dist.destroy_process_group()


def test_bad_input_errors():
    model = tvm.resnet18()
    with pytest.raises(
        ValueError, match="Unknown conv variant 'partail'. Known variants: affine, edge, gated, partial, zero"
    ):
        convs.convert(model, "partail")
    with pytest.raises(ValueError, match="Known variants"):
        convs.get("nope")
    with pytest.raises(TypeError, match="unknown option.*multi_channel"):
        convs.convert(model, "edge", multi_channel=True)
    with pytest.raises(TypeError, match="skip must be"):
        convs.convert(model, "edge", skip="conv1")
    reflect = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode='reflect'.*only padding_mode='zeros'"):
        convs.convert(reflect, "partial")


def test_shared_conv_and_shared_block_in_two_parents():
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(nn.Sequential(shared), nn.ReLU(), nn.Sequential(nn.ReLU(), shared))
    assert convs.convert(model, "partial") == 1
    assert model[0][0] is model[2][1] and isinstance(model[0][0], convs.PartialConv2d)
    block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    model = nn.Sequential(block, block)
    assert convs.convert(model, "edge") == 1
    assert model[0] is model[1] and isinstance(model[0][0], convs.EdgeConv2d)


def test_first_is_the_first_in_registration_order_at_any_depth():
    model = nn.Sequential(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1)), nn.Conv2d(4, 4, 3, padding=1))
    convs.convert(model, "gated")
    assert model[0][1].mask_channel and not model[1].mask_channel


def test_convs_with_children_are_not_descended_into():
    class WrappedConv(nn.Conv2d):
        def __init__(self) -> None:
            super().__init__(3, 3, 3, padding=1)
            self.inner = nn.Conv2d(3, 3, 3, padding=1)

    model = nn.Sequential(WrappedConv())
    with pytest.warns(UserWarning, match="replaced nothing"):
        assert convs.convert(model, "partial") == 0
    assert type(model[0].inner) is nn.Conv2d


def test_gated_inside_absorbs_only_a_matching_batchnorm_right_after():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(8)
    )
    assert convs.convert(model, "gated", norm="inside") == 2
    assert isinstance(model[1], nn.Identity) and isinstance(model[0].bn, nn.BatchNorm2d)
    assert isinstance(model[3], nn.BatchNorm2d) and isinstance(model[2].bn, nn.Identity)  # 8 features, 4 channels


def test_bn_is_not_a_user_option():
    accepted = r"\['norm', 'activation', 'mask_channel', 'open_logit', 'start'\]"
    with pytest.raises(TypeError, match=rf"unknown option\(s\) \['bn'\]; gated accepts {accepted}"):
        convs.convert(tvm.resnet18(), "gated", bn=nn.BatchNorm2d(64))
    assert convs.get("affine").convert_options() == ["norm", "activation", "mask_channel", "open_logit", "start"]
    assert convs.get("edge").convert_options() == ["start"] and convs.get("partial").convert_options() == [
        "multi_channel"
    ]


class ReluFreeEdgeConv2d(convs.EdgeConv2d):
    """A policy beyond gated's: the ReLU registered after the conv is replaced too (by the identity)."""

    @classmethod
    def replacements(cls, site: convs.ConvSite, **options) -> dict[nn.Module, nn.Module]:
        changes = super().replacements(site, **options)
        if isinstance(site.following, nn.ReLU):
            changes[site.following] = nn.Identity()
        return changes


class StrayEdgeConv2d(convs.EdgeConv2d):
    """A broken policy: it claims to replace a module that is not at the site."""

    @classmethod
    def replacements(cls, site: convs.ConvSite, **options) -> dict[nn.Module, nn.Module]:
        return {**super().replacements(site, **options), nn.ReLU(): nn.Identity()}


def test_each_variant_owns_its_replacement_policy(monkeypatch):
    monkeypatch.setitem(convs.VARIANTS, "relu_free", ReluFreeEdgeConv2d)
    monkeypatch.setitem(convs.VARIANTS, "stray", StrayEdgeConv2d)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Sigmoid())
    assert convs.convert(model, "relu_free") == 2
    assert [type(m) for m in model] == [ReluFreeEdgeConv2d, nn.Identity, ReluFreeEdgeConv2d, nn.Sigmoid]
    with pytest.raises(ValueError, match=r"may replace only the conv '0' and the module right after it"):
        convs.convert(nn.Sequential(nn.Conv2d(3, 4, 3)), "stray")


def test_logs_what_it_replaced(caplog):
    with caplog.at_level(logging.INFO, logger="convs.surgery"):
        convs.convert(tvm.resnet18(), "gated", norm="inside")
    assert "replaced 20 nn.Conv2d by GatedConv2d and 20 following module(s)" in caplog.text
