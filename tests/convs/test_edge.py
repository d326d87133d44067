"""EdgeConv2d against a brute-force reference: nine full convolutions selected by an independent region map."""

import copy

import pytest
import torch
import torch.nn.functional as F

from convs import REGIONS, EdgeConv2d, edge
from convs.edge import GPU_COLUMNS_MAX_ELEMENTS, GPU_COLUMNS_MIN_BORDER_SHARE, INTERIOR
from convs.geometry import side_padding

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


def per_position_reference(layer, x):
    """Edge conv one output position at a time: the region is read off the position's own window (a window that
    leaves both sides counts as leaving the first), and that region's filter and bias take the zero-padded window."""
    (pt, pb), (pl, pr) = side_padding(layer)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    h, w = x.shape[-2:]
    xp = F.pad(x, (pl, pr, pt, pb))
    out_h = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(out_h):
        top, bottom = i * sh - pt, i * sh - pt + (kh - 1) * dh
        vertical = "top" if top < 0 else "bottom" if bottom >= h else ""
        cols = []
        for j in range(out_w):
            left, right = j * sw - pl, j * sw - pl + (kw - 1) * dw
            horizontal = "left" if left < 0 else "right" if right >= w else ""
            name = "_".join(part for part in (vertical, horizontal) if part)
            if name:
                weight, bias = layer.region_filter(REGIONS.index(name)), layer.region_bias_of(REGIONS.index(name))
            else:
                weight, bias = layer.weight, layer.bias
            window = xp[:, :, i * sh : i * sh + (kh - 1) * dh + 1, j * sw : j * sw + (kw - 1) * dw + 1]
            cols.append(F.conv2d(window, weight, bias, 1, 0, (dh, dw), layer.groups))
        rows.append(torch.cat(cols, dim=3))
    return torch.cat(rows, dim=2)


def assert_matches_per_position(layer, x):
    """Output and the gradients of input, weight, bias, region_weight and region_bias, in float64."""
    x = x.double().requires_grad_(True)
    layer = layer.double()
    out = layer(x)
    ref = per_position_reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(ref)  # a loss that weighs every output differently
    params = [x] + [p for p in layer.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), params)
    # A map without interior (or without some region) leaves that filter unused: its gradient is zero.
    grads_ref = torch.autograd.grad((ref * weights).sum(), params, materialize_grads=True)
    names = ["input"] + [name for name, _ in layer.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("strategy", ["auto", "strips", "boxes", "columns"])
def test_every_strategy_matches_the_per_position_reference(geometry, strategy):
    layer = EdgeConv2d(**geometry)
    layer.strategy = strategy
    assert_matches_per_position(layer, torch.randn(SHAPE[0], geometry["in_channels"], *SHAPE[1:]))


# (kernel, stride, padding, dilation, groups, input height, width): maps smaller than the dilation (every output is
# a border one), maps with only some regions (one output row or column, no interior), rectangular kernels and
# maps, strides that skip the last pixels, and padding wider than the kernel reach.
SMALL_MAPS = [
    (3, 1, 4, 4, 1, 3, 2),  # all outputs in the border, strips overlap
    (3, 1, 6, 6, 1, 4, 8),  # ASPP on a 4 x 8 map: as the segmentation model's rate 6
    (3, 1, 2, 2, 1, 4, 8),
    (3, 2, 2, 2, 1, 7, 9),
    (3, 1, 1, 1, 1, 1, 5),  # one output row: top regions only
    (3, 1, 1, 1, 1, 5, 1),  # one output column: left regions only
    (3, 1, 1, 1, 1, 2, 2),  # corners only
    (3, 2, 1, 1, 1, 2, 6),
    ((5, 3), 1, (2, 1), 1, 1, 3, 4),
    ((3, 5), 2, (1, 2), (2, 1), 2, 6, 5),
    (3, 2, 1, 1, 1, 15, 16),  # stride 2: one-column border boxes (the CPU workaround), no bottom or right strip
    (7, 2, 3, 1, 1, 12, 10),
    (3, 1, 3, 1, 1, 4, 5),  # padding wider than the kernel reach: windows entirely in the padding
]


@pytest.mark.parametrize("strategy", ["auto", "strips", "boxes", "columns"])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "groups", "height", "width"), SMALL_MAPS)
def test_small_dilated_and_partial_maps_match_the_per_position_reference(
    kernel, stride, padding, dilation, groups, height, width, strategy
):
    layer = EdgeConv2d(4, 6, kernel, stride, padding, dilation, groups)
    layer.strategy = strategy
    assert_matches_per_position(layer, torch.randn(2, 4, height, width))


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "groups", "height", "width"), SMALL_MAPS)
def test_large_filters_zero_their_left_out_taps_slice_by_slice(
    kernel, stride, padding, dilation, groups, height, width, monkeypatch
):
    """The taps a box leaves out get zero gradients either way: one indexed write (small filters, GPUs) or, for
    large filters on the CPU, a fill per slice (forced here by a limit of 0)."""
    monkeypatch.setattr(edge, "ZERO_FILL_MIN_VALUES", 0)
    layer = EdgeConv2d(4, 6, kernel, stride, padding, dilation, groups)
    layer.strategy = "columns"
    assert_matches_per_position(layer, torch.randn(2, 4, height, width))


def test_auto_plan_per_border_share():
    """Auto plans on the CPU: strips for a thin frame, a conv per box for a thin border, im2col products where the
    border is a tenth of the map or more; every output once in the latter two."""
    layer = EdgeConv2d(2, 2, 3, padding=1)
    thin = layer.plan(256, 256, cpu=True)  # 1.6% of the outputs are border ones
    assert thin.strategy == "strips" and thin.boxes[0].out == (0, 256, 0, 256)  # the plain conv, then 8 strips
    assert [box.index for box in thin.boxes[1:]] == list(range(len(REGIONS))) and thin.columns is None
    medium = layer.plan(56, 56, cpu=True)  # 7% border: one conv per box
    assert medium.strategy == "boxes" and medium.columns is None and len(medium.boxes) == 9
    assert layer.border_share(7, 7) == 24 / 49 and layer.border_share(256, 256) == 1 - 254**2 / 256**2
    small = layer.plan(7, 7, cpu=True)  # 24 of 49 outputs are border ones: the interior a conv, the border products
    assert small.strategy == "columns" and small.boxes[0].index == INTERIOR and small.columns.first == 1
    assert sorted((r1 - r0) * (c1 - c0) for _, (r0, r1, c0, c1), _, _ in small.boxes) == [1] * 4 + [5] * 4 + [25]
    assert small.columns.starts == (0, 1, 6, 7, 12, 17, 18, 23, 24)  # the 8 border boxes' positions, in order
    # Each box multiplies only the taps that read a pixel for some of its positions: a top strip the lower two
    # kernel rows, a left strip the right two columns, the top-left corner its lower right 2 x 2 taps.
    top, middle, bottom, left, centre, right = (1, 3), (0, 3), (0, 2), (1, 3), (0, 3), (0, 2)  # taps [a, b)
    rows_and_cols = [(top, left), (top, centre), (top, right), (middle, left), (middle, right)]
    rows_and_cols += [(bottom, left), (bottom, centre), (bottom, right)]
    assert small.columns.spans == tuple((*r, *c) for r, c in rows_and_cols)
    assert small.columns.cells == (0, 4, 34, 38, 68, 98, 102, 132, 136)  # positions x their box's taps, box after box
    assert len(small.columns.taps) == 4 * 4 + 4 * 5 * 6
    left_out = small.columns.left_out.T.tolist()  # (filter, tap): 3 taps of each strip, 5 of each corner
    assert len(left_out) == 4 * 3 + 4 * 5 and [t for f, t in left_out if f == 1] == [0, 1, 2]  # top: kernel row 0
    # One batched product per pair of boxes of equal size and span shape (each with the next one like it):
    # (position, filter).
    assert small.columns.groups == (((0, 0), (2, 2)), ((1, 1), (6, 6)), ((3, 3), (4, 4)), ((5, 5), (7, 7)))
    wide = layer.plan(5, 8, cpu=True).columns  # top and bottom 6 outputs, left and right 3
    assert wide.groups == (((0, 0), (2, 2)), ((1, 1), (6, 6)), ((3, 3), (4, 4)), ((5, 5), (7, 7)))
    dilated = EdgeConv2d(2, 2, 3, padding=6, dilation=6).plan(4, 8, cpu=True)  # ASPP: no interior, each output once
    assert dilated.strategy == "columns" and dilated.columns.first == 0
    assert sum((r1 - r0) * (c1 - c0) for _, (r0, r1, c0, c1), _, _ in dilated.boxes) == 4 * 8
    grouped = EdgeConv2d(4, 4, 3, padding=1, groups=2).plan(7, 7, cpu=True)  # grouped: border boxes stay convs
    assert grouped.strategy == "boxes" and grouped.columns is None
    # A wide input with a wide border (as the thesis' ASPP): its im2col rows would be big, so a conv per box.
    wide = EdgeConv2d(512, 2, 3, padding=12, dilation=12).plan(64, 128, cpu=True)
    assert wide.strategy == "boxes" and wide.columns is None
    assert layer.plan(256, 256, cpu=True) is thin


def test_auto_plan_on_a_gpu():
    """Auto plans off the CPU: im2col products whenever their rows are small, whatever the border share (a GPU
    layer's time is its launches); large rows a conv per box, except a dilated map mostly border (the thesis'
    ASPP, where cuDNN's thin dilated box convs are slow), up to a cap; grouped convs stay convs."""
    layer = EdgeConv2d(2, 2, 3, padding=1)
    assert layer.plan(256, 256).strategy == "columns"  # 1.6% border, tiny rows
    assert layer.plan(256, 256, cpu=True).strategy == "strips"  # the same size has its own plan on the CPU
    # Taps left out only where the box stays one product (a launch each): the strips' outer kernel row
    assert layer.plan(7, 7).columns.spans == ((0, 3, 0, 3), (1, 3, 0, 3), (0, 3, 0, 3)) + ((0, 3, 0, 3),) * 3 + (
        (0, 2, 0, 3),
        (0, 3, 0, 3),
    )
    assert EdgeConv2d(4, 4, 3, padding=1, groups=2).plan(7, 7).strategy == "boxes"
    # 1024 channels, dilation 4 on a 64 x 128 map (thesis layer4): 18% border, 13.6M elements per image
    layer4 = EdgeConv2d(1024, 2, 3, padding=4, dilation=4)
    assert layer4.border_share(64, 128) < GPU_COLUMNS_MIN_BORDER_SHARE and layer4.plan(64, 128).strategy == "boxes"
    # 2048 channels, dilation 12 and 36 (thesis ASPP): 49% and 100% border, under the cap
    for dilation in (12, 36):
        aspp = EdgeConv2d(2048, 2, 3, padding=dilation, dilation=dilation)
        assert aspp.border_share(64, 128) >= GPU_COLUMNS_MIN_BORDER_SHARE
        assert aspp.plan(64, 128).strategy == "columns" and aspp.plan(64, 128, cpu=True).strategy == "boxes"
    # the same layer on a map twice as large each way would gather over the cap: boxes
    huge = EdgeConv2d(2048, 2, 3, padding=36, dilation=36)
    share = huge.border_share(128, 256)
    assert share >= GPU_COLUMNS_MIN_BORDER_SHARE and share * 128 * 256 * 2048 * 9 > GPU_COLUMNS_MAX_ELEMENTS
    assert huge.plan(128, 256).strategy == "boxes"


def test_columns_index_tensors_move_to_a_device_once():
    """A "columns" plan's index tensors go to the input's device once and are reused (a copy from the host on
    every call would make the host wait for the device); on the CPU they are the plan's own. The rows of the
    padded input that the border rows gather are built once per batch size and device."""
    columns = EdgeConv2d(2, 2, 3, padding=1).plan(7, 7).columns
    on_cpu = columns.on(torch.device("cpu"))
    assert all(a is b for a, b in zip(on_cpu, (columns.rows, columns.cols, columns.left_out), strict=True))
    meta = torch.device("meta")  # a device other than the CPU that needs no hardware
    moved = columns.on(meta)
    assert all(t.device == meta for t in moved) and columns.on(meta) is moved
    assert [t.shape for t in moved] == [columns.rows.shape, columns.cols.shape, columns.left_out.shape]
    cpu, columns = torch.device("cpu"), EdgeConv2d(2, 2, 3, padding=1).plan(7, 7, cpu=True).columns
    pixels = columns.pixels(3, cpu)
    assert columns.pixels(3, cpu) is pixels and columns.pixels(3, meta).device == meta
    assert len(pixels) == columns.cells[-1] * 3 and len(columns.pixels(2, cpu)) == columns.cells[-1] * 2
    # Box after box, then position, image and tap: the top-left corner's one position, image 1, the first of its
    # 4 taps (kernel row 1, column 1: the input's first pixel, row 1 and column 1 of the 9 x 9 padded map).
    assert pixels[4].item() == 1 * 81 + 1 * 9 + 1


@pytest.mark.parametrize("strategy", ["strips", "boxes", "columns"])
def test_output_memory_format_is_a_plain_convs(strategy):
    layer = EdgeConv2d(4, 6, 3, padding=1).to(memory_format=torch.channels_last)
    layer.strategy = strategy
    x = torch.randn(2, 4, 9, 10).to(memory_format=torch.channels_last)
    plain = F.conv2d(x, layer.weight, layer.bias, 1, 1)
    out = layer(x)
    assert out.is_contiguous(memory_format=torch.channels_last) == plain.is_contiguous(
        memory_format=torch.channels_last
    )
    assert out.is_contiguous() == plain.is_contiguous()
    layer = layer.to(memory_format=torch.contiguous_format)
    assert layer(x.contiguous()).is_contiguous()


@pytest.mark.parametrize("strategy", ["strips", "boxes", "columns"])
def test_filters_in_either_memory_format_get_the_same_gradients(strategy):
    """The region filters are made channels_last (the border's products read them tap-major); the layer computes
    and differentiates alike with every filter contiguous or every filter and the input channels_last, and each
    gradient takes its parameter's layout (no copy when it is accumulated, and DDP's buckets expect it)."""
    torch.manual_seed(0)
    layer = EdgeConv2d(4, 6, 3, padding=1, bias=True)
    layer.strategy = strategy
    assert layer.region_weight.is_contiguous(memory_format=torch.channels_last) and layer.weight.is_contiguous()
    contiguous = copy.deepcopy(layer).to(memory_format=torch.contiguous_format)
    cl = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    assert contiguous.region_weight.is_contiguous() and not cl.weight.is_contiguous()
    x = torch.randn(2, 4, 7, 9)
    grads = []
    for net, inp in ((layer, x), (contiguous, x), (cl, x.to(memory_format=torch.channels_last))):
        out = net(inp)
        out.backward(torch.ones_like(out))
        grads.append([p.grad for p in net.parameters()])
        for p in net.parameters():
            assert p.grad.stride() == p.stride()
    for g, g_other, g_cl in zip(*grads, strict=True):
        torch.testing.assert_close(g_other, g, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_cl, g, rtol=1e-5, atol=1e-5)
    # A checkpoint of contiguous filters (as earlier versions made them) loads into the channels_last layout.
    fresh = EdgeConv2d(4, 6, 3, padding=1, bias=True)
    fresh.load_state_dict(contiguous.state_dict())
    assert fresh.region_weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fresh(x), layer(x))


@pytest.mark.parametrize("strategy", ["strips", "boxes", "columns"])
def test_bf16_autocast_matches_fp32(strategy):
    layer = EdgeConv2d(8, 8, 3, stride=2, padding=2, dilation=2)
    layer.strategy = strategy
    x = torch.randn(2, 8, 20, 22, requires_grad=True)
    ref = layer(x)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    gx, gw = torch.autograd.grad(out.float().sum(), [x, layer.region_weight])
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gx, gx_ref, rtol=0.05, atol=0.05)


def saved_storages(layer, x) -> set[int]:
    """Storages of the tensors autograd keeps for the backward of `layer(x)`, parameters left out."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    return {t.untyped_storage().data_ptr() for t in saved} - params


@pytest.mark.parametrize("strategy", ["strips", "boxes", "columns"])
def test_saves_only_the_input_and_the_filters(strategy, monkeypatch):
    """One autograd node that keeps what a plain conv keeps: no strips, patches or padded copies (and "columns"
    no rows over its limit)."""
    monkeypatch.setattr(edge, "KEEP_ROWS_MAX_ELEMENTS", 0)
    layer = EdgeConv2d(4, 6, 3, padding=2, dilation=2)
    layer.strategy = strategy
    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    assert saved_storages(layer, x) == {x.untyped_storage().data_ptr()}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 input only: no bf16 copy of the 9 filters
        saved = saved_storages(layer, x)
    assert len(saved) == 1 and x.untyped_storage().data_ptr() not in saved


def test_columns_keeps_its_small_rows_for_backward(monkeypatch):
    """Under its limit "columns" keeps the border rows it gathered (the region filters' gradients read them), in
    the dtype it computed them in, and only while the region filters train; the gradients are the same as when
    backward gathers them again."""
    torch.manual_seed(0)
    layer = EdgeConv2d(4, 6, 3, padding=2, dilation=2)
    layer.strategy = "columns"
    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    plan = layer.plan(9, 10, cpu=True)
    positions = plan.columns.starts[-1]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    own = [x, *layer.parameters()]
    rows = [t for t in saved if not any(t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in own)]
    cells = plan.columns.cells[-1]  # border positions x the taps of their box
    assert [tuple(t.shape) for t in rows] == [(cells * 2, 4)]  # x images, C
    kept = torch.autograd.grad(out.square().sum(), [x, layer.weight, layer.region_weight, layer.region_bias])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = saved_storages(layer, x)
    assert len(saved) == 2 and x.untyped_storage().data_ptr() not in saved  # bf16 input and bf16 rows
    layer.region_weight.requires_grad_(False)
    assert saved_storages(layer, x) == {x.untyped_storage().data_ptr()}
    layer.region_weight.requires_grad_(True)
    assert positions * 9 > cells  # taps that read only padding are left out
    monkeypatch.setattr(edge, "KEEP_ROWS_MAX_ELEMENTS", cells * 4 - 1)  # one element short per image
    assert saved_storages(layer, x) == {x.untyped_storage().data_ptr()}
    again = torch.autograd.grad(layer(x).square().sum(), [x, layer.weight, layer.region_weight, layer.region_bias])
    for a, b in zip(kept, again, strict=True):
        torch.testing.assert_close(a, b)
