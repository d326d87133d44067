"""PartialConv2d against an independent transcription of NVIDIA/partialconv's formula."""

import pytest
import torch
import torch.nn.functional as F

from convs import PartialConv2d
from convs.partial import Strips

SHAPE = (2, 13, 11)  # batch, height, width: odd and non-square on purpose


def nvidia_partial(layer, x, mask=None):
    """NVIDIA's PartialConv2d forward written out plainly: full-size ratio maps, no separability, no cache."""
    n, c, h, w = x.shape
    kh, kw = layer.kernel_size
    if layer.multi_channel:
        updater = torch.ones(layer.out_channels, c, kh, kw)
        m = torch.ones(n, c, h, w) if mask is None else mask.expand(n, c, h, w)
    else:
        updater = torch.ones(1, 1, kh, kw)
        m = torch.ones(1, 1, h, w) if mask is None else mask
    window = updater.shape[1] * kh * kw
    with torch.no_grad():
        update = F.conv2d(m, updater, None, layer.stride, layer.padding, layer.dilation, 1)
        ratio = window / (update + 1e-8)
        update = torch.clamp(update, 0, 1)
        ratio = ratio * update
    raw = F.conv2d(
        x if mask is None else x * m,
        layer.weight,
        layer.bias,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
    )
    if layer.bias is not None:
        b = layer.bias.view(1, -1, 1, 1)
        out = ((raw - b) * ratio + b) * update
    else:
        out = raw * ratio
    return out, update


def random_mask(n, c, h, w, p=0.35):
    return (torch.rand(n, c, h, w) > p).float()


def grads(layer, x, out):
    gx, gw, *gb = torch.autograd.grad(
        out.pow(2).sum(), [x, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    )
    return [gx, gw, *gb]


@pytest.mark.parametrize("bias", [True, False])
def test_padding_mode_matches_nvidia(geometry, bias):
    layer = PartialConv2d(**geometry, bias=bias)
    x = torch.randn(SHAPE[0], geometry["in_channels"], *SHAPE[1:], requires_grad=True)
    out = layer(x)
    ref, _ = nvidia_partial(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads(layer, x, out), grads(layer, x, ref), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("multi_channel", [False, True])
def test_hole_mode_matches_nvidia(geometry, multi_channel):
    layer = PartialConv2d(**geometry, multi_channel=multi_channel)
    n, (h, w), c = SHAPE[0], SHAPE[1:], geometry["in_channels"]
    x = torch.randn(n, c, h, w, requires_grad=True)
    mask = random_mask(n, c if multi_channel else 1, h, w)
    out, updated = layer(x, mask)
    ref, ref_updated = nvidia_partial(layer, x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert updated.shape == ref_updated.shape
    torch.testing.assert_close(updated, ref_updated)
    for g, g_ref in zip(grads(layer, x, out), grads(layer, x, ref), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_soft_mask_matches_nvidia():
    layer = PartialConv2d(3, 5, 3, padding=1)
    x, mask = torch.randn(2, 3, 9, 9), torch.rand(2, 1, 9, 9)
    out, updated = layer(x, mask)
    ref, ref_updated = nvidia_partial(layer, x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(updated, ref_updated)


def test_unified_view_ratio_one_is_conv(geometry):
    """Thesis section 3.4: with the ratio forced to 1, partial conv is nn.Conv2d (no padding -> always 1)."""
    layer = PartialConv2d(**geometry)
    x = torch.randn(SHAPE[0], geometry["in_channels"], *SHAPE[1:])
    plain = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    ones = torch.ones(1, 1, *SHAPE[1:])
    _, update = nvidia_partial(layer, x, ones)
    # Where every window is full the ratio is 1 and partial conv equals the plain conv.
    interior = update.expand_as(plain).bool()
    ratio_is_one = (
        F.conv2d(ones, torch.ones(1, 1, *layer.kernel_size), None, layer.stride, layer.padding, layer.dilation)
        == layer.kernel_size[0] * layer.kernel_size[1]
    )
    sel = ratio_is_one.expand_as(plain) & interior
    torch.testing.assert_close(layer(x)[sel], plain[sel], rtol=1e-6, atol=1e-6)
    # Forcing the ratio to 1 everywhere turns the whole layer into the plain conv.
    identity = torch.ones(*layer(x).shape[-2:])
    layer._strips = lambda *args: Strips([], [], [], [], identity)
    torch.testing.assert_close(layer(x), plain)


def test_padding_ratio_only_touches_border_strips():
    layer = PartialConv2d(2, 2, 3, padding=1)
    row_strips, col_strips, dead_rows, dead_cols, ratio = layer._strips(32, 40, torch.device("cpu"), torch.float32)
    assert [(a, b) for a, b, _ in row_strips] == [(0, 1), (31, 32)]
    assert [(a, b) for a, b, _ in col_strips] == [(0, 1), (39, 40)]
    assert ratio[1:-1, 1:-1].eq(1).all() and ratio[0, 0].item() == 2.25  # the whole map, for backward
    assert dead_rows == dead_cols == []
    assert row_strips[0][2].flatten().tolist() == [1.5]


def test_padding_mode_backward_is_one_node_that_leaves_the_incoming_gradient_alone():
    # One node re-weights the border strips (autograd's own record of the in-place strip edits copied the whole
    # output gradient once per strip); the gradient handed to it can be shared with another branch, as a residual
    # sum shares it, so it must come out unchanged.
    layer = PartialConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 9, 7, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_PaddingRatioBackward"
    inputs = [type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None]
    assert inputs == ["ConvolutionBackward0", "AccumulateGrad"]  # the conv, and the bias's share on the strips
    g = torch.randn_like(out)
    kept = g.clone()
    torch.autograd.grad(out, [x, layer.weight, layer.bias], g)
    assert torch.equal(g, kept)


def test_cache_never_serves_a_stale_ratio():
    layer = PartialConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 10, 10)
    first = layer(x)
    mask = random_mask(2, 1, 10, 10)
    layer(x, mask)  # a masked call of the same shape must not leak into padding mode (NVIDIA's last_size bug)
    torch.testing.assert_close(layer(x), first)
    torch.testing.assert_close(layer(x), nvidia_partial(layer, x)[0], rtol=1e-5, atol=1e-5)
    # another size, then back
    layer(torch.randn(1, 3, 7, 12))
    torch.testing.assert_close(layer(x), first)


def test_cache_is_keyed_by_dtype_under_autocast():
    layer = PartialConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 10, 10)
    layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    keys = {k[3] for k in layer._strip_cache}
    assert keys == {torch.float32, torch.bfloat16}
    torch.testing.assert_close(out.float(), nvidia_partial(layer, x)[0], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fully_masked_windows_stay_finite(dtype):
    layer = PartialConv2d(3, 4, 3, padding=1, multi_channel=True)
    x = torch.randn(1, 3, 12, 12)
    mask = torch.ones(1, 3, 12, 12)
    mask[:, :, 2:9, 2:9] = 0  # windows in the middle see no valid pixel at all
    half = layer.to(dtype)
    out, updated = half(x.to(dtype), mask.to(dtype))
    assert torch.isfinite(out).all() and torch.isfinite(updated).all()
    assert (out[:, :, 4:7, 4:7] == 0).all() and (updated[:, :, 4:7, 4:7] == 0).all()
    assert torch.isfinite(half(x.to(dtype))).all()


def test_bf16_autocast_hole_mode_finite():
    layer = PartialConv2d(3, 4, 3, padding=1)
    x, mask = torch.randn(1, 3, 12, 12), torch.zeros(1, 1, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, updated = layer(x, mask)
    assert torch.isfinite(out.float()).all() and (updated == 0).all() and (out == 0).all()


def test_mask_errors_name_the_expected_shape():
    layer = PartialConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"expected \(2, 1, 8, 8\)"):
        layer(x, torch.ones(2, 1, 8, 9))
    with pytest.raises(ValueError, match="multi_channel"):
        layer(x, torch.ones(2, 3, 8, 8))
    with pytest.raises(TypeError, match="float tensor"):
        layer(x, torch.ones(2, 1, 8, 8, dtype=torch.long))
    multi = PartialConv2d(3, 4, 3, padding=1, multi_channel=True)
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\) or \(2, 3, 8, 8\)"):
        multi(x, torch.ones(2, 2, 8, 8))


def test_bool_and_single_channel_masks_on_multi_channel_layer():
    layer = PartialConv2d(3, 4, 3, padding=1, multi_channel=True)
    x = torch.randn(2, 3, 8, 8)
    mask = torch.rand(2, 1, 8, 8) > 0.3
    out, updated = layer(x, mask)
    ref, ref_updated = nvidia_partial(layer, x, mask.float().expand(2, 3, 8, 8))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert updated.dtype == torch.float32 and updated.shape == (2, 4, 8, 8)
