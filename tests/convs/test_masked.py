"""convs.Masked: masks that flow through whole torchvision networks, unchanged model code."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convs
from tests.convs.test_surgery import MODELS, output


def occlusion(n: int, size: int, *, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """A mask with two rectangular holes, one of them crossing the image border."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, channels, size, size)
    for i in range(n):
        a, b = (torch.randint(0, size // 2, (2,), generator=g)).tolist()
        mask[i, :, a : a + size // 3, b : b + size // 4] = 0
        mask[i, :, size - size // 5 :, : size // 2] = 0  # touches the bottom edge
    return mask


def unpack(out):
    return out["out"] if isinstance(out, dict) else out


def converted(name: str, variant: str, **options) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    convs.convert(model, variant, **options)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_partial_output_ignores_pixels_under_the_mask(model_name):
    size = MODELS[model_name][1]
    masked = convs.Masked(converted(model_name, "partial"))
    x, mask = torch.randn(2, 3, size, size), occlusion(2, size)
    other = torch.where(mask.bool(), x, 10 * torch.randn_like(x))  # different values under the holes
    with torch.no_grad():
        out, out_other = (unpack(masked(t, mask)) for t in (x, other))
        plain, plain_other = output(masked, x), output(masked, other)
    torch.testing.assert_close(out, out_other, rtol=1e-5, atol=1e-5 * out.abs().max().item())
    assert not torch.allclose(plain, plain_other, rtol=1e-3, atol=0), "control: without the mask the holes matter"


@pytest.mark.parametrize("model_name", ["resnet50", "deeplabv3_resnet50"])
def test_multi_channel_partial_ignores_masked_channels(model_name):
    size = MODELS[model_name][1]
    masked = convs.Masked(converted(model_name, "partial", multi_channel=True))
    x = torch.randn(1, 3, size, size)
    mask = occlusion(1, size, channels=3)
    mask[:, 0, :8] = 0  # only the red channel of the top rows is missing
    other = torch.where(mask.bool(), x, torch.randn_like(x))
    with torch.no_grad():
        a, b = unpack(masked(x, mask)), unpack(masked(other, mask))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("variant", ["partial", "gated", "affine"])
@pytest.mark.parametrize("model_name", ["resnet50", "deeplabv3_resnet50"])
def test_all_ones_mask_is_padding_only(model_name, variant):
    size = MODELS[model_name][1]
    masked = convs.Masked(converted(model_name, variant))
    if variant != "partial":  # from_conv starts with zero mask weights: give them a say
        for m in masked.modules():
            if isinstance(m, convs.GatedConv2d) and m.mask_weight is not None:
                nn.init.normal_(m.mask_weight, std=0.1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        plain = output(masked, x)
        ones = unpack(masked(x, torch.ones(2, 1, size, size)))
        holes = unpack(masked(x, occlusion(2, size)))
    torch.testing.assert_close(ones, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    assert not torch.allclose(holes, plain, rtol=1e-3, atol=1e-3), "the mask must reach the layers"


def test_mask_has_each_stage_resolution_and_holes_shrink():
    model = converted("resnet50", "partial")
    sizes = {}
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, o.shape[-2:]))
    x, mask = torch.randn(1, 3, 128, 128), occlusion(1, 128)
    with torch.no_grad():
        _, masks = convs.Masked(model)(x, mask, return_masks=True)
    for name, size in sizes.items():
        assert tuple(size) in masks, f"no mask at the resolution of {name} ({tuple(size)})"
    hole_fraction = [1 - masks[tuple(sizes[n])].mean().item() for n in ("conv1", "layer1", "layer2", "layer3")]
    assert hole_fraction == sorted(hole_fraction, reverse=True) and hole_fraction[0] > hole_fraction[-1]
    for size, m in masks.items():  # a stage's holes never exceed the input's holes pooled to its size
        assert (m >= F.adaptive_max_pool2d(mask, size)).all()


def test_holes_shrink_exactly_by_the_update_rule():
    torch.manual_seed(0)
    chain = nn.Sequential(*(nn.Conv2d(2, 2, 3, padding=1) for _ in range(3)), nn.Conv2d(2, 2, 3, stride=2, padding=1))
    convs.convert(chain, "partial")
    mask = torch.ones(1, 1, 24, 24)
    mask[:, :, 5:14, 8:17] = 0  # a 9x9 hole
    with torch.no_grad():
        _, masks = convs.Masked(chain)(torch.randn(1, 2, 24, 24), mask, return_masks=True)
    # update rule: valid where the window holds any valid pixel, i.e. a 3x3 max-pool of the mask per layer
    expected = mask
    for _ in range(3):
        expected = F.max_pool2d(expected, 3, 1, 1)
    torch.testing.assert_close(masks[(24, 24)], expected)
    assert (masks[(24, 24)] == 0).sum() == 3 * 3  # 9x9 hole, three 3x3 layers: 9 - 2 * 3 = 3
    torch.testing.assert_close(masks[(12, 12)], F.max_pool2d(F.pad(expected, (1, 1, 1, 1), value=0), 3, 2))


@pytest.mark.parametrize("autocast", [False, True])
def test_fully_masked_windows_stay_finite(autocast):
    masked = convs.Masked(converted("resnet50", "partial"))
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[1, :, :8, :8] = 1  # one image fully masked, the other 98% masked
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, masks = masked(x, mask, return_masks=True)
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(m).all() for m in masks.values())


def test_bad_masks_say_what_was_expected():
    masked = convs.Masked(converted("resnet50", "partial"))
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"expected \(2, 1, 32, 32\) or \(2, 3, 32, 32\), values in \[0, 1\]"):
        masked(x, torch.ones(2, 1, 32, 31))
    with pytest.raises(ValueError, match=r"expected \(2, 1, 32, 32\)"):
        masked(x, torch.ones(2, 2, 32, 32))
    with pytest.raises(TypeError, match=r"float tensor with values in \[0, 1\] or a bool tensor, got torch.int64"):
        masked(x, torch.ones(2, 1, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*max 255"):
        masked(x, torch.full((2, 1, 32, 32), 255.0))
    with pytest.raises(ValueError, match="convert it first"):
        convs.Masked(nn.Sequential(nn.Conv2d(3, 3, 3)))(x, torch.ones(2, 1, 32, 32))


def test_threads_and_models_do_not_mix():
    model = converted("resnet50", "partial")
    masked = convs.Masked(model)
    x = torch.randn(1, 3, 64, 64)
    masks = [occlusion(1, 64, seed=s) for s in range(3)]
    with torch.no_grad():
        expected = [masked(x, m) for m in masks] + [model(x)]
    results: dict[int, list[torch.Tensor]] = {}
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        barrier.wait()
        with torch.no_grad():
            results[i] = [masked(x, masks[i]) if i < 3 else model(x) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        for out in outs:
            torch.testing.assert_close(out, expected[i])


def test_ddp_wrapped_masked_model(tmp_path):
    import torch.distributed as dist

    model = converted("resnet50", "partial")
    x, mask = torch.randn(2, 3, 64, 64), occlusion(2, 64)
    with torch.no_grad():
        expected = convs.Masked(model)(x, mask)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(convs.Masked(model))
        out = ddp(x, mask)
        out.sum().backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(out.detach(), expected)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["partial", "affine"])
def test_compiled_masked_model_matches_eager(variant):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Upsample(scale_factor=4),
        nn.Conv2d(8, 4, 1),
    ).eval()
    convs.convert(net, variant)
    masked = convs.Masked(net)
    x, mask = torch.randn(2, 3, 32, 32), occlusion(2, 32)
    with torch.no_grad():
        eager = masked(x, mask)
        torch._dynamo.reset()
        compiled = torch.compile(masked, fullgraph=True)
        torch.testing.assert_close(compiled(x, mask), eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            compiled(x, occlusion(2, 32, seed=1)), masked(x, occlusion(2, 32, seed=1)), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("copy_with", ["pickle", "deepcopy"])
def test_a_copied_masked_model_still_hands_the_mask_to_its_layers(copy_with, tmp_path):
    """An MLflow model or a saved module is a pickled copy: its own (new) layers must still get the mask."""
    import copy

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    convs.convert(model, "partial")
    masked = convs.Masked(model).eval()
    if copy_with == "pickle":
        torch.save(masked, tmp_path / "masked.pt")
        copied = torch.load(tmp_path / "masked.pt", weights_only=False)
    else:
        copied = copy.deepcopy(masked)
    x, mask = torch.randn(2, 3, 12, 12), occlusion(2, 12)
    with torch.no_grad():
        assert not torch.allclose(masked(x, mask), masked(x))  # the mask matters here
        torch.testing.assert_close(copied(x, mask), masked(x, mask), rtol=0, atol=0)
