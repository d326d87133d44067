"""EdgeConv2d against a brute-force reference: nine full convolutions selected by an independent region map."""

import pytest
import torch
import torch.nn.functional as F

from convs import REGIONS, EdgeConv2d

SHAPE = (2, 13, 11)


def touches(layer, h, w, side):
    """1 where the window of an output position reaches into the padding on `side`, from a padded indicator."""
    (ph, pw) = layer.padding if not isinstance(layer.padding, str) else (0, 0)
    if layer.padding == "same":
        kh, kw = layer.kernel_size
        dh, dw = layer.dilation
        top, left = dh * (kh - 1) // 2, dw * (kw - 1) // 2
        bottom, right = dh * (kh - 1) - top, dw * (kw - 1) - left
    else:
        top = bottom = ph
        left = right = pw
    ind = torch.zeros(1, 1, h + top + bottom, w + left + right)
    if side == "top":
        ind[..., :top, :] = 1
    elif side == "bottom":
        ind[..., h + top :, :] = 1
    elif side == "left":
        ind[..., :, :left] = 1
    else:
        ind[..., :, w + left :] = 1
    hits = F.conv2d(ind, torch.ones(1, 1, *layer.kernel_size), None, layer.stride, 0, layer.dilation)
    return hits[0, 0] > 0


def reference(layer, x):
    """Eq. 3.1: each region's output is its own filter and its own bias (the interior: `weight` and `bias`)."""
    h, w = x.shape[-2:]

    def conv(weight, bias=layer.bias):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    out = conv(layer.weight)
    if layer.region_weight is None:
        return out
    top, bottom = touches(layer, h, w, "top"), touches(layer, h, w, "bottom")
    left, right = touches(layer, h, w, "left"), touches(layer, h, w, "right")
    vertical = {"top": top, "": ~top & ~bottom, "bottom": ~top & bottom}
    horizontal = {"left": left, "": ~left & ~right, "right": ~left & right}
    result = out * (vertical[""] & horizontal[""])
    for index, name in enumerate(REGIONS):
        v = next((k for k in ("top", "bottom") if name.startswith(k)), "")
        hz = next((k for k in ("left", "right") if name.endswith(k)), "")
        result = result + conv(layer.region_filter(index), layer.region_bias_of(index)) * (vertical[v] & horizontal[hz])
    return result


def test_matches_bruteforce_reference(geometry):
    layer = EdgeConv2d(**geometry)
    x = torch.randn(SHAPE[0], geometry["in_channels"], *SHAPE[1:], requires_grad=True)
    out = layer(x)
    ref = reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [x] + [p for p in layer.parameters()]
    for g, g_ref in zip(
        torch.autograd.grad(out.pow(2).sum(), params), torch.autograd.grad(ref.pow(2).sum(), params), strict=True
    ):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_unified_view_equal_filters_is_conv(geometry):
    """Thesis section 3.4: with all region filters equal to the interior one, edge conv is nn.Conv2d."""
    layer = EdgeConv2d(**geometry)
    if layer.region_weight is not None:
        with torch.no_grad():
            layer.region_weight.copy_(layer.weight.repeat(len(REGIONS), 1, 1, 1))
            layer.region_bias.copy_(layer.bias.repeat(len(REGIONS)))  # eq. 3.1: the regions' biases too
    x = torch.randn(SHAPE[0], geometry["in_channels"], *SHAPE[1:])
    plain = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-5)


def test_every_region_has_its_own_filter():
    layer = EdgeConv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0)
        for i in range(len(REGIONS)):
            layer.region_filter(i).fill_(0)
            layer.region_filter(i)[0, 0, 1, 1] = i + 1  # centre tap = region number
    out = layer(torch.ones(1, 1, 5, 6))[0, 0]
    expected = torch.zeros(5, 6)
    expected[0, 0], expected[0, 1:-1], expected[0, -1] = 1, 2, 3
    expected[1:-1, 0], expected[1:-1, -1] = 4, 5
    expected[-1, 0], expected[-1, 1:-1], expected[-1, -1] = 6, 7, 8
    torch.testing.assert_close(out, expected)


def test_strips_are_thin_and_cached():
    layer = EdgeConv2d(2, 2, 3, padding=1)
    boxes = layer.regions(64, 48)
    assert len(boxes) == 8
    area = sum((r1 - r0) * (c1 - c0) for _, (r0, r1, c0, c1), _, _ in boxes)
    assert area == 2 * 48 + 2 * 62  # one row top and bottom, one column left and right
    assert layer.regions(64, 48) is boxes


def test_no_padding_means_no_region_filters():
    layer = EdgeConv2d(4, 8, 3, padding=0)
    assert layer.region_weight is None
    assert sum(p.numel() for p in layer.parameters()) == 4 * 8 * 9 + 8


def test_rejects_other_padding_modes():
    with pytest.raises(ValueError, match="only padding_mode='zeros'"):
        EdgeConv2d(3, 3, 3, padding=1, padding_mode="reflect")


def test_one_column_strips_of_strided_layers_are_computed_wider_on_cpu():
    """oneDNN's CPU bf16 conv is wrong for stride > 1 and a 1-column output: such strips get a neighbour column."""
    layer = EdgeConv2d(2, 2, 3, stride=2, padding=1)
    for _, (_, _, c0, c1), (_, _, jlo, jhi, pl, pr, _, _), (k0, k1) in layer.regions(32, 32, cpu=True):
        assert (k1 - k0) == (c1 - c0)
        computed = (jhi - jlo + pl + pr - 3) // 2 + 1  # output columns of the strip's convolution
        assert computed == (2 if c1 - c0 == 1 else c1 - c0)
    assert all(k == (0, c1 - c0) for _, (_, _, c0, c1), _, k in layer.regions(32, 32, cpu=False))


@pytest.mark.parametrize("bias", [True, False])
def test_from_conv_copy_is_the_source_function(geometry, bias):
    conv = torch.nn.Conv2d(**geometry, bias=bias)
    layer = EdgeConv2d.from_conv(conv)
    x = torch.randn(SHAPE[0], geometry["in_channels"], *SHAPE[1:])
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    if layer.region_weight is not None:
        assert (layer.region_bias is not None) == bias
        if bias:  # eq. 3.1: one bias per region, each a copy of the conv's at the start
            assert layer.region_bias.shape == (len(REGIONS) * conv.out_channels,)
            for i in range(len(REGIONS)):
                torch.testing.assert_close(layer.region_bias_of(i), conv.bias, rtol=0, atol=0)


def test_region_bias_is_used_only_in_its_region():
    layer = EdgeConv2d.from_conv(torch.nn.Conv2d(1, 1, 3, padding=1))
    x = torch.randn(1, 1, 5, 6)
    before = layer(x)
    with torch.no_grad():
        layer.region_bias_of(REGIONS.index("top"))[0] += 1.0
    diff = layer(x) - before
    expected = torch.zeros(1, 1, 5, 6)
    expected[..., 0, 1:-1] = 1.0  # the top edge without its corners
    torch.testing.assert_close(diff, expected)


def test_from_conv_random_gives_each_region_a_fresh_filter(geometry):
    conv = torch.nn.Conv2d(**geometry)
    layer = EdgeConv2d.from_conv(conv, start="random")
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)  # the interior is the source
    if layer.region_weight is None:
        return
    filters = [layer.region_filter(i) for i in range(len(REGIONS))]
    biases = [layer.region_bias_of(i) for i in range(len(REGIONS))]
    for i in range(len(REGIONS)):
        assert not torch.allclose(filters[i], conv.weight) and not torch.allclose(biases[i], conv.bias)
        for j in range(i):
            assert not torch.allclose(filters[i], filters[j]) and not torch.allclose(biases[i], biases[j])
    bound = 1 / conv.weight[0].numel() ** 0.5  # a fresh conv's init range
    assert layer.region_weight.abs().max() <= bound and layer.region_bias.abs().max() <= bound


def test_from_conv_rejects_an_unknown_start():
    with pytest.raises(ValueError, match=r"Invalid start 'fresh' for EdgeConv2d.from_conv. Only 'copy'.*'random'"):
        EdgeConv2d.from_conv(torch.nn.Conv2d(3, 3, 3, padding=1), start="fresh")
