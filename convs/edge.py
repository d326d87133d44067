"""Edge convolution (Innamorati et al. 2019): separate filters for the interior, 4 edges and 4 corners."""

from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple, Self

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import SizeCache, check_padding_mode, conv_kwargs, conv_plans, copy_conv_params, side_padding
from .policy import ConvReplacement, check_start

# Order of the 8 border filters in `region_weight` (and biases in `region_bias`); the interior filter is the layer's
# ordinary `weight` and `bias`.
REGIONS = ("top_left", "top", "top_right", "left", "right", "bottom_left", "bottom", "bottom_right")
INTERIOR = -1  # filter index of the interior box in a plan: `weight` and `bias`

# How "auto" picks a plan per input size, by the share of output positions in the border (measured on a 2-core
# Xeon VM, oneDNN and MKL, ResNet50 and DeepLabV3+ layer shapes, forward+backward against a plain conv).
# "strips" (the plain conv over the whole map, border strips recomputed) wastes the border share of its work and
# only pays off for a very thin frame (56 x 56 maps and larger). "boxes" (one conv per box) suits a thin border:
# its cost per box is a conv call. Where the border is a tenth of the map or more (28 x 28 maps and smaller, the
# segmentation demo's 16 x 32 and 8 x 16 maps, dilated layers), the border boxes are gathered as im2col rows and
# multiplied by their filters, one matrix product per box ("columns"): 1.4-2x faster than "boxes" there, but it
# copies the whole padded input, which costs more than it saves on large maps. Each border box's rows and product
# leave out the taps that read only padding for all its positions (`Columns.spans`): on ResNet50's 7 x 7 layers,
# whose border products are bound by reading the 9.4 MB region filters, that halves them (31 -> 16 ms forward and
# backward, the layer 54 -> 45 ms against 27 ms plain). Its im2col rows hold up to 9 times the input (kernel area
# times), so it is left to layers whose rows stay small: the thesis model's ASPP branches
# (2048 channels, dilation 12-36 on a 64 x 128 map) would gather over a gigabyte and keep "boxes" on the CPU.
#
# On a GPU (measured on an H200, cuDNN, bf16 autocast, channels_last; `benchmarks.edge_layers --device cuda`) a
# layer's time is mostly its kernel launches, so "columns" (a fixed handful of them) beats "boxes" (a conv per
# box) at any border share while its rows stay small. Large rows go to "boxes" (1024-channel layers on 64 x 128
# maps: 1.2x faster than "columns"), except where the border is a large share of a dilated map: there cuDNN
# computes the thin, dilated box convs 100 times slower than the plain conv (the thesis model's ASPP at dilation
# 12 and 24: 300 ms a layer against 18-20 ms for "columns", which gathers up to 300 MB per image in bf16).
STRIPS_MAX_BORDER_SHARE = 0.03
COLUMNS_MIN_BORDER_SHARE = 0.1
COLUMNS_MAX_ELEMENTS = 2**22  # im2col elements of one image's border boxes (16 MB in fp32)
# On a GPU, rows over COLUMNS_MAX_ELEMENTS still take "columns" from this border share on, up to the cap below.
GPU_COLUMNS_MIN_BORDER_SHARE = 0.4
GPU_COLUMNS_MAX_ELEMENTS = 2**28  # im2col elements of one image's border boxes (512 MB in bf16)
# "columns" keeps the gathered rows for backward (the region filters' gradients read them) up to this many elements
# per image, rather than gathering them again: on the CPU the gather and its padded copy of the input cost more
# than the border's matrix products on the segmentation demo's maps. In ResNet50 the kept rows add about 4% to what
# autograd saves; the thesis model's large ASPP rows are gathered again.
KEEP_ROWS_MAX_ELEMENTS = COLUMNS_MAX_ELEMENTS
# The region filters' gradients at the taps a box leaves out are zeros, written in one indexed write; on the CPU
# filters of over this many values per tap (out x in channels) get a fill per slice instead (a 256 x 256 layer:
# 0.2 ms against 0.48; 64 x 64: 0.1 ms against 0.06, where calls cost more than memory).
ZERO_FILL_MIN_VALUES = 2**14


class Box(NamedTuple):
    """One output box of a plan and how it is computed.

    `index`: position in `REGIONS`, or `INTERIOR`. `out`: output rows and columns [r0, r1) x [c0, c1).
    `window`: the input slice [ilo, ihi) x [jlo, jhi) and its zero padding (left, right, top, bottom) that give
    the computed box with a padding-0 conv. `keep`: columns [k0, k1) of the computed box that are the output box
    (all of them, except where a CPU workaround computes one column more, see `EdgeConv2d.regions`).
    """

    index: int
    out: tuple[int, int, int, int]
    window: tuple[int, int, int, int, int, int, int, int]
    keep: tuple[int, int]


class Columns(NamedTuple):
    """The border boxes of a "columns" plan, computed from one gather of their im2col rows (ungrouped convs).

    `first`: the plan's boxes from this index on are the border boxes it computes (those before are the interior
    box, a oneDNN/cuDNN conv). `rows`, `cols`: output row and column of every border position, box after box (row
    major within a box). `starts`: the first position of each border box in `rows`, then their count. `spans`: for
    each border box, the kernel taps it multiplies, rows [a0, a1) x columns [b0, b1): the taps that read only
    padding for every position of the box are left out of its rows and its product (a top strip's top kernel row,
    a corner's two outer ones; on a GPU only where the rest stays one product, see `_chunks`). `cells`: the first
    (position, tap) pair of each border box, then their count: box k has (starts[k + 1] - starts[k]) positions
    times its taps. `taps`: for every border position and each tap of its box (row major within the span), the
    flat index of the input pixel it reads in the zero-padded map (`padded` height x width, `padding` left, right,
    top, bottom). `left_out`: (filter index, kernel tap as row * kw + column) of every tap left out of a border
    box, one pair per column: their gradient is zero. `groups`: the border boxes in pairs of equal size and equal
    span shape (each with the next box like it; on a 16 x 32 map top and bottom, left and right, the corners two by
    two), or alone, each box as (its position among the border boxes, its filter index): a pair's two products are
    one batched product. `rows`, `cols`, `taps` and `left_out` are CPU tensors; `on(device)` gives the ones the
    layer reads on the input's device, copied there once (a copy per call would make the host wait), and
    `pixels` the rows the border rows gather.
    """

    first: int
    rows: torch.Tensor
    cols: torch.Tensor
    taps: torch.Tensor
    starts: tuple[int, ...]
    spans: tuple[tuple[int, int, int, int], ...]
    cells: tuple[int, ...]
    groups: tuple[tuple[tuple[int, int], ...], ...]
    padded: tuple[int, int]
    padding: tuple[int, int, int, int]
    left_out: torch.Tensor
    moved: dict[torch.device, tuple[torch.Tensor, ...]]
    pixel_rows: dict[tuple[int, torch.device], torch.Tensor]

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`rows`, `cols` and `left_out` on `device`."""
        tensors = (self.rows, self.cols, self.left_out)
        if device.type == "cpu":
            return tensors
        if torch.compiler.is_compiling():  # the graph holds them as constants; no cache to guard on
            return tuple(t.to(device) for t in tensors)
        if device not in self.moved:
            self.moved[device] = tuple(t.to(device) for t in tensors)
        return self.moved[device]

    def pixels(self, images: int, device: torch.device) -> torch.Tensor:
        """For every row of the border rows of `images` images (box after box, then position, image and tap of the
        box's span; see `_border_columns`), the row of the pixel it reads in the zero-padded input seen as (images
        * padded height * padded width, C): the border rows are one gather of those rows, and the input's gradient
        one scatter-add into them. Built once per batch size and device."""
        if torch.compiler.is_compiling():
            return self._pixels(images).to(device)
        key = (images, device)
        if key not in self.pixel_rows:
            self.pixel_rows[key] = self._pixels(images).to(device)
        return self.pixel_rows[key]

    def _pixels(self, images: int) -> torch.Tensor:
        image = torch.arange(images).view(1, images, 1) * self.padded[0] * self.padded[1]
        parts = []
        for k, (a0, a1, b0, b1) in enumerate(self.spans):
            positions = self.starts[k + 1] - self.starts[k]
            taps = self.taps[self.cells[k] : self.cells[k + 1]].view(positions, 1, (a1 - a0) * (b1 - b0))
            parts.append((taps + image).flatten())
        return torch.cat(parts)


class EdgePlan(NamedTuple):
    """How a layer computes one input size.

    "strips": the interior filter runs over the whole map (`boxes[0]`, the plain conv), then the border boxes
    are computed with their own filters and overwrite their part of it: best when the border is a thin frame.
    The other strategies compute every output position exactly once, each box with its own filter (the interior
    box without any padding), which is what small or heavily dilated maps need (their border strips overlap or
    cover the whole map): "boxes" with one conv per box; "columns" with the interior box a conv and the border
    boxes matrix products of their im2col rows (`columns` says where they are; None in the other strategies).
    """

    strategy: Literal["strips", "boxes", "columns"]
    boxes: tuple[Box, ...]
    out_size: tuple[int, int]
    columns: Columns | None = None


class EdgeConv2d(ConvReplacement, nn.Conv2d):
    """Edge convolution: one filter per region (interior, 4 edges, 4 corners), whatever the kernel size.

    An output position belongs to a border region when its window reaches into the padding on that side (the
    thesis' scalable design: one filter per region rather than per distance to the border). Each region has its
    own filter and, when the layer has a bias, its own bias (thesis eq. 3.1): `region_weight` and `region_bias`
    stack the 8 border regions along the output channels, in `REGIONS` order. Each input size gets a plan
    (`plan`, `EdgePlan`): on very large maps the interior filter runs over the whole image, as a plain conv would,
    and only the thin border strips are recomputed with their own filters; otherwise every output box is computed
    once with its own filter, so the layer does the multiply-adds of a plain conv. Forward and backward are one
    autograd node that saves the input and the filters, as a plain conv does, and under "columns" the border's
    gathered im2col rows where they are small (`KEEP_ROWS_MAX_ELEMENTS`). Strided, dilated, grouped and
    rectangular kernels all work (the thesis could not apply edge conv to dilated convolutions). With all region
    filters equal to `weight` the layer is exactly `nn.Conv2d` (the unified view, thesis section 3.4), which is how
    `from_conv` starts.
    """

    # "auto" picks per input size and filter bank (see STRIPS_MAX_BORDER_SHARE); a strategy name forces it on every
    # size (tests, benchmarks); set it on an instance or on the class.
    strategy: ClassVar[Literal["auto", "strips", "boxes", "columns"]] = "auto"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_padding_mode(padding_mode, type(self).__name__)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        if any(sum(side_padding(self), ())):
            # 4-d like any conv weight (so .to(memory_format=torch.channels_last) works): region i is rows
            # [i * out_channels, (i + 1) * out_channels).
            shape = (len(REGIONS) * out_channels, *self.weight.shape[1:])
            factory = {"device": self.weight.device, "dtype": self.weight.dtype}
            # channels_last: the border's matrix products read each filter tap-major, as the rows they multiply
            self.region_weight = nn.Parameter(torch.empty(shape, **factory).to(memory_format=torch.channels_last))
            if bias:  # eq. 3.1: every region has its own bias, region i at [i * out_channels, (i + 1) * out_channels)
                self.region_bias = nn.Parameter(torch.empty(len(REGIONS) * out_channels, **factory))
            else:
                self.register_parameter("region_bias", None)
            self._reset_regions()
        else:  # without padding no window ever leaves the image: the layer is a plain conv
            self.register_parameter("region_weight", None)
            self.register_parameter("region_bias", None)
        self._region_cache: SizeCache[list] = SizeCache()
        self._plan_cache: SizeCache[EdgePlan] = SizeCache()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "region_weight", None) is not None:
            self._reset_regions()

    def _reset_regions(self) -> None:
        # Independent default init per region filter and bias, exactly as nn.Conv2d.reset_parameters does for one.
        for i in range(len(REGIONS)):
            nn.init.kaiming_uniform_(self.region_filter(i), a=math.sqrt(5))
        if self.region_bias is not None:
            fan_in = self.weight[0].numel()  # in_channels / groups * kernel area
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            nn.init.uniform_(self.region_bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, start: Literal["copy", "random"] = "copy") -> Self:
        """Same geometry as `conv` and a copy of its weight and bias as the interior filter.

        Args:
            conv: the source convolution (zero padding); it is not modified.
            start: "copy" (default): every region filter and region bias is a copy of `conv`'s, so the layer
                computes exactly `conv(x)` until training moves them apart (the unified view, thesis section 3.4).
                "random": each region filter and bias gets its own default init, as in a fresh conv.

        Returns:
            A layer on `conv`'s device and dtype, in its train/eval mode.

        Raises:
            ValueError: `start` is neither "copy" nor "random".

        Example:
            >>> import torch
            >>> from torch import nn
            >>> import convs
            >>> _ = torch.manual_seed(0)
            >>> conv = nn.Conv2d(3, 8, 3, padding=1)
            >>> layer = convs.EdgeConv2d.from_conv(conv)
            >>> x = torch.randn(2, 3, 10, 10)
            >>> torch.allclose(layer(x), conv(x), atol=1e-6)
            True
            >>> layer.region_weight.shape, layer.region_bias.shape  # the 8 border regions, along the output channels
            (torch.Size([64, 3, 3, 3]), torch.Size([64]))
            >>> fresh = convs.EdgeConv2d.from_conv(conv, start="random")  # region filters of their own
            >>> torch.equal(fresh.weight, conv.weight), torch.allclose(fresh(x), conv(x))
            (True, False)
        """
        check_start(start, cls.__name__)
        # The constructor already gives every region filter and bias its own fresh init: "random" keeps it.
        layer = cls(**conv_kwargs(conv), device=conv.weight.device, dtype=conv.weight.dtype)
        copy_conv_params(conv, layer)
        if layer.region_weight is not None:
            if start == "copy":
                with torch.no_grad():
                    layer.region_weight.copy_(conv.weight.repeat(len(REGIONS), 1, 1, 1))
                    if layer.region_bias is not None:
                        layer.region_bias.copy_(conv.bias.repeat(len(REGIONS)))
            layer.region_weight.requires_grad_(conv.weight.requires_grad)
            if layer.region_bias is not None:
                layer.region_bias.requires_grad_(conv.bias.requires_grad)
        return layer

    def region_filter(self, index: int) -> torch.Tensor:
        """The filter of region `REGIONS[index]`, shaped like `weight` (a view into `region_weight`)."""
        return self.region_weight.narrow(0, index * self.out_channels, self.out_channels)

    def region_bias_of(self, index: int) -> torch.Tensor | None:
        """The bias of region `REGIONS[index]`, shaped like `bias` (a view into `region_bias`); None without bias."""
        if self.region_bias is None:
            return None
        return self.region_bias.narrow(0, index * self.out_channels, self.out_channels)

    def regions(self, height: int, width: int, *, cpu: bool = False) -> list[Box]:
        """Border regions for an input size, as `Box`es (filter index, output box r0, r1, c0, c1, input window and
        padding, columns of the computed box to keep), in `REGIONS` order; regions the map lacks are left out.
        `cpu`: never compute a box 1 output column wide with a stride > 1 (see `_boxes`)."""
        return self._region_cache.lookup((height, width, cpu), lambda: self._boxes(height, width, cpu, False))

    def plan(self, height: int, width: int, *, cpu: bool = False) -> EdgePlan:
        """How the layer computes an input of this size (cached per size, device kind and `strategy`)."""
        key = (height, width, cpu, self.strategy)
        return self._plan_cache.lookup(key, lambda: self._find_plan(height, width, cpu))

    def border_share(self, height: int, width: int) -> float:
        """The share of the outputs for an input of this size whose window reaches into the padding."""
        rows, cols = conv_plans(self, height, width)
        (h0, h1), (w0, w1) = rows.spans[1], cols.spans[1]
        return 1 - (h1 - h0) * (w1 - w0) / (rows.out * cols.out)

    def _find_plan(self, height: int, width: int, cpu: bool) -> EdgePlan:
        rows, cols = conv_plans(self, height, width)
        share = self.border_share(height, width)
        strategy = self.strategy
        if strategy == "auto":
            strategy = "strips" if share <= STRIPS_MAX_BORDER_SHARE else "boxes"
            elements = share * rows.out * cols.out * self.weight[0].numel() * self.groups
            if cpu:
                if share >= COLUMNS_MIN_BORDER_SHARE and elements <= COLUMNS_MAX_ELEMENTS:
                    strategy = "columns"
            elif elements <= COLUMNS_MAX_ELEMENTS or (
                share >= GPU_COLUMNS_MIN_BORDER_SHARE and elements <= GPU_COLUMNS_MAX_ELEMENTS
            ):
                strategy = "columns"
        if strategy == "columns" and self.groups != 1:
            strategy = "boxes"  # a grouped conv's border boxes stay convs (one matrix product per group is slower)
        if strategy == "strips":
            # The plain conv over the whole map, with the layer's own padding, then the border boxes over it.
            ilo, ihi, pt, pb = rows.window(0, rows.out)
            jlo, jhi, pl, pr = cols.window(0, cols.out)
            whole = Box(INTERIOR, (0, rows.out, 0, cols.out), (ilo, ihi, jlo, jhi, pl, pr, pt, pb), (0, cols.out))
            return EdgePlan(strategy, (whole, *self._boxes(height, width, cpu, False)), (rows.out, cols.out))
        # The interior box first: it is the largest, and the output takes its memory format.
        interior = self._boxes(height, width, cpu, True)
        if strategy == "boxes":
            return EdgePlan(strategy, (*interior, *self._boxes(height, width, cpu, False)), (rows.out, cols.out))
        # Border boxes computed as matrix products run no oneDNN convolution and need no CPU workaround.
        boxes = (*interior, *self._boxes(height, width, False, False))
        columns = self._columns_of(boxes, len(interior), height, width, cpu)
        return EdgePlan(strategy, boxes, (rows.out, cols.out), columns)

    def _columns_of(self, boxes: tuple[Box, ...], first: int, height: int, width: int, cpu: bool) -> Columns:
        """Where the border boxes `boxes[first:]` read and write (see `Columns`)."""
        (pt, pb), (pl, pr) = side_padding(self)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        row_plan, col_plan = conv_plans(self, height, width)
        padded = (height + pt + pb, width + pl + pr)
        rows, cols, taps, spans, starts, cells, left_out = [], [], [], [], [0], [0], []
        for box in boxes[first:]:
            r0, r1, c0, c1 = box.out
            span = (*row_plan.taps(r0, r1), *col_plan.taps(c0, c1))
            a0, a1, b0, b1 = span
            if not cpu and not _one_product(span, kw):  # on a GPU every tap row more is a kernel launch more
                span = (0, kh, 0, kw)
                a0, a1, b0, b1 = span
            r, c = torch.meshgrid(torch.arange(r0, r1), torch.arange(c0, c1), indexing="ij")
            r, c = r.flatten(), c.flatten()
            tap_rows = r[:, None] * sh + torch.arange(a0, a1) * dh  # padded input row of each position's tap rows
            tap_cols = c[:, None] * sw + torch.arange(b0, b1) * dw
            taps.append((tap_rows[:, :, None] * padded[1] + tap_cols[:, None, :]).flatten())
            rows.append(r)
            cols.append(c)
            spans.append(span)
            left_out += [
                (box.index, i * kw + j) for i in range(kh) for j in range(kw) if not (a0 <= i < a1 and b0 <= j < b1)
            ]
            starts.append(starts[-1] + r.numel())
            cells.append(cells[-1] + r.numel() * (a1 - a0) * (b1 - b0))
        border = [
            (k, box.index, (starts[k + 1] - starts[k], spans[k][1] - spans[k][0], spans[k][3] - spans[k][2]))
            for k, box in enumerate(boxes[first:])
        ]
        groups, paired = [], set()
        for k, index, shape in border:  # each box with the next box of its size and span shape, if any
            if k not in paired:
                twin = next((b for b in border if b[0] > k and b[0] not in paired and b[2] == shape), None)
                groups.append(((k, index),) if twin is None else ((k, index), twin[:2]))
                paired.update(k for k, _ in groups[-1])
        return Columns(
            first,
            torch.cat(rows),
            torch.cat(cols),
            torch.cat(taps),
            tuple(starts),
            tuple(spans),
            tuple(cells),
            tuple(groups),
            padded,
            (pl, pr, pt, pb),
            torch.tensor(left_out, dtype=torch.long).view(-1, 2).T.contiguous(),
            {},
            {},
        )

    def _boxes(self, height: int, width: int, cpu: bool, interior: bool) -> tuple[Box, ...]:
        """The border boxes in `REGIONS` order, or (`interior`) the interior box alone (if the map has one)."""
        rows, cols = conv_plans(self, height, width)
        row_spans, col_spans = rows.spans, cols.spans
        boxes = []
        # REGIONS order; (1, 1) = interior
        cells = [(1, 1)] if interior else [(v, h) for v in range(3) for h in range(3) if (v, h) != (1, 1)]
        for index, (v, h) in enumerate(cells):
            (r0, r1), (c0, c1) = row_spans[v], col_spans[h]
            if r1 > r0 and c1 > c0:
                # oneDNN's CPU bf16/fp16 convolution (torch 2.14, seen on Intel Xeon) returns garbage for a stride > 1
                # and an output one column wide and 5+ rows high: exactly a left/right strip of a strided layer. Such
                # a box is computed one column wider (into the neighbouring region) and the extra column dropped.
                b0, b1 = c0, c1
                if cpu and c1 - c0 == 1 and cols.stride > 1 and cols.out > 1:
                    b0, b1 = (c0, c1 + 1) if c1 < cols.out else (c0 - 1, c1)
                ilo, ihi, pt, pb = rows.window(r0, r1)
                jlo, jhi, pl, pr = cols.window(b0, b1)
                boxes.append(
                    Box(
                        INTERIOR if interior else index,
                        (r0, r1, c0, c1),
                        (ilo, ihi, jlo, jhi, pl, pr, pt, pb),
                        (c0 - b0, c1 - b0),
                    )
                )
        return tuple(boxes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region_weight is None:
            return self._conv_forward(x, self.weight, self.bias)
        plan = self.plan(x.shape[-2], x.shape[-1], cpu=x.device.type == "cpu")
        tensors = (x, self.weight, self.bias, self.region_weight, self.region_bias)
        geometry = (self.stride, self.dilation, self.groups, sum(side_padding(self), ()))
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Autocast does not reach into an autograd.Function: the node casts its arguments itself, as autocast
            # casts a conv's, and runs without it.
            with torch.autocast(device, enabled=False):
                return _EdgeConv.apply(*tensors, plan, geometry, torch.get_autocast_dtype(device))
        return _EdgeConv.apply(*tensors, plan, geometry, None)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """`t` in `dtype` where autocast would cast it (fp32, fp16 and bf16 tensors; not fp64 ones)."""
    if dtype is None or t is None or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return t
    return t.to(dtype)


def _box_input(x: torch.Tensor, window: tuple) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int, int, int]]:
    """The input of a box's conv: the slice of `x`, the conv's own (symmetric) padding, and the rest of the padding
    (left, right, top, bottom) applied with F.pad (a copy, but of a thin strip, or of nothing at all)."""
    ilo, ihi, jlo, jhi, pl, pr, pt, pb = window
    inp = x[:, :, ilo:ihi, jlo:jhi]
    sym_h, sym_w = min(pt, pb), min(pl, pr)
    extra = (pl - sym_w, pr - sym_w, pt - sym_h, pb - sym_h)
    if any(extra):
        inp = F.pad(inp, extra)
    return inp, (sym_h, sym_w), extra


def _filter(index: int, weight: torch.Tensor, region: torch.Tensor | None, channels: int) -> torch.Tensor | None:
    if index == INTERIOR or region is None:
        return weight if index == INTERIOR else None
    return region.narrow(0, index * channels, channels)


def _box_filter(index: int, weight: torch.Tensor, region: torch.Tensor, channels: int, x: torch.Tensor):
    """The filter of a box's conv, in the input's memory format: a region filter (channels_last, as
    `region_weight` is made) is copied for a contiguous input, which oneDNN would otherwise convert to
    channels_last, and its output with it."""
    w = _filter(index, weight, region, channels)
    if index != INTERIOR and (x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last)):
        return w.contiguous()
    return w


def _conv_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format of a plain conv's output: channels_last when the input or the weight is (as oneDNN and
    cuDNN choose)."""
    cl = torch.channels_last
    if any(t.is_contiguous(memory_format=cl) and not t.is_contiguous() for t in (x, weight)):
        return cl
    return torch.contiguous_format


class _EdgeConv(torch.autograd.Function):
    """All boxes of a plan as one autograd node: it saves the input and the filters (as a plain conv does), plus a
    "columns" plan's small border rows, and its backward adds every box's input gradient into one buffer instead
    of a full-size gradient per slice."""

    @staticmethod
    def forward(ctx, x, weight, bias, region_weight, region_bias, plan: EdgePlan, geometry: tuple, dtype):
        # Under autocast the node keeps the parameters themselves and casts them again in backward: saving the
        # casts would keep a low-precision copy of all 9 filters per layer until backward.
        saved = (_cast(x, dtype), weight, region_weight)
        ctx.plan, ctx.geometry, ctx.has_bias, ctx.dtype = plan, geometry, bias is not None, dtype
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, weight, bias, region_weight, region_bias)]
        x, weight, bias, region_weight, region_bias = (
            _cast(t, dtype) for t in (x, weight, bias, region_weight, region_bias)
        )
        stride, dilation, groups, _ = geometry
        channels = weight.shape[0]
        out = None
        columns = plan.columns
        first = len(plan.boxes) if columns is None else columns.first
        for box in plan.boxes[:first]:
            inp, padding, _ = _box_input(x, box.window)
            w = _box_filter(box.index, weight, region_weight, channels, x)
            b = _filter(box.index, bias, region_bias, channels) if bias is not None else None
            y = F.conv2d(inp, w, b, stride, padding, dilation, groups)
            r0, r1, c0, c1 = box.out
            k0, k1 = box.keep
            if out is None:
                if plan.strategy == "strips":
                    out = y  # the plain conv over the whole map; the border boxes overwrite their part of it
                    continue
                shape = (y.shape[0], y.shape[1], *plan.out_size)
                out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=_conv_format(x, weight))
            out[:, :, r0:r1, c0:c1] = y[..., k0:k1]
        if columns is not None:
            if out is None:  # no interior: every output is a border one
                shape = (x.shape[0], channels, *plan.out_size)
                out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_conv_format(x, weight))
            border_rows = _columns_forward(out, x, weight, region_weight, region_bias, plan)
            # The region filters' gradients read the rows again: kept where small (see KEEP_ROWS_MAX_ELEMENTS).
            if ctx.needs_input_grad[3] and border_rows.numel() <= KEEP_ROWS_MAX_ELEMENTS * x.shape[0]:
                saved = (*saved, border_rows)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, region_weight, *kept = ctx.saved_tensors  # `kept`: a "columns" plan's border rows, if any
        x, weight, region_weight = (_cast(t, ctx.dtype) for t in (x, weight, region_weight))
        grad_out = _cast(grad_out, ctx.dtype)
        plan, (stride, dilation, groups, _) = ctx.plan, ctx.geometry
        need_x, need_w, need_b, need_rw, need_rb = ctx.needs_input_grad[:5]
        channels = weight.shape[0]
        gx = gw = gb = None
        grw, grb = _region_grads(plan, region_weight, grad_out, need_rw, need_rb)
        boxes = plan.boxes
        grad_whole = None
        if plan.strategy == "strips":
            # The whole-map conv's outputs on the border were overwritten: their gradient is zero.
            grad_whole = grad_out.clone()
            for box in boxes[1:]:
                r0, r1, c0, c1 = box.out
                grad_whole[:, :, r0:r1, c0:c1] = 0
        columns = plan.columns
        first = len(boxes) if columns is None else columns.first
        for i, box in enumerate(boxes[:first]):
            interior = box.index == INTERIOR
            inp, padding, (el, er, et, eb) = _box_input(x, box.window)
            if grad_whole is not None and i == 0:
                grad = grad_whole
            else:
                r0, r1, c0, c1 = box.out
                k0, k1 = box.keep
                grad = grad_out[:, :, r0:r1, c0:c1]
                computed = _computed_width(box, stride[1], dilation[1], weight.shape[3])
                if (k0, k1) != (0, computed):  # the CPU workaround's extra column: its gradient is zero
                    grad = F.pad(grad, (k0, computed - k1))
            w = _box_filter(box.index, weight, region_weight, channels, x)
            mask = [need_x, need_w if interior else need_rw, (need_b if interior else need_rb) and ctx.has_bias]
            if not any(mask):
                continue
            bias_sizes = [channels] if mask[2] else None
            gi, gwi, gbi = torch.ops.aten.convolution_backward(
                grad, inp, w, bias_sizes, stride, padding, dilation, False, (0, 0), groups, mask
            )
            if need_x:
                ilo, ihi, jlo, jhi = box.window[:4]
                gi = gi[:, :, et : gi.shape[2] - eb, el : gi.shape[3] - er]
                if gx is None and (ilo, ihi, jlo, jhi) == (0, x.shape[2], 0, x.shape[3]):
                    gx = gi
                else:
                    if gx is None:
                        gx = torch.zeros_like(x)
                    gx[:, :, ilo:ihi, jlo:jhi] += gi
            if interior:
                gw, gb = gwi, gbi
            else:
                rows = slice(box.index * channels, (box.index + 1) * channels)
                if gwi is not None:
                    grw[rows] = gwi
                if gbi is not None:
                    grb[rows] = gbi
        if columns is not None and (need_x or need_rw or need_rb):
            gx = _columns_backward(grad_out, x, region_weight, plan, gx, grw, grb, need_x, *kept)
        if need_x and gx is None:
            gx = torch.zeros_like(x)
        # A map without interior leaves `weight` and `bias` unused: their gradients are zero.
        if need_w and gw is None:
            gw = torch.zeros_like(weight)
        if need_b and gb is None:
            gb = grad_out.new_zeros(channels)
        grads = (gx, gw, gb, grw, grb)
        grads = tuple(g if g is None or g.dtype == d else g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True))
        return (*grads, None, None, None)


def _padded_channels_last(x: torch.Tensor, columns: Columns) -> torch.Tensor:
    """`x` zero-padded by the layer's padding, as (N, padded height, padded width, C): channels innermost, so that
    gathering a window copies runs of channels (and of the taps of a kernel row, for an undilated kernel)."""
    pl, _, pt, _ = columns.padding
    n, c, h, w = x.shape
    padded = x.new_zeros(n, *columns.padded, c)
    padded[:, pt : pt + h, pl : pl + w] = x.permute(0, 2, 3, 1)
    return padded


def _tap_major(filters: torch.Tensor) -> torch.Tensor:
    """(out channels, C, kh, kw) filters as (out channels, kh, kw, C), the order of the border rows: a view of
    channels_last filters (as `region_weight` is made), a copy of others."""
    return filters.permute(0, 2, 3, 1).contiguous()


def _block(t: torch.Tensor, columns: Columns, k: int, images: int) -> torch.Tensor:
    """Border box k's part of a buffer laid out like the border rows (see `_border_columns`), as (rows, tap rows,
    tap columns * C)."""
    (a0, a1, b0, b1), cells = columns.spans[k], columns.cells
    part = t[cells[k] * images : cells[k + 1] * images]
    return part.view((columns.starts[k + 1] - columns.starts[k]) * images, a1 - a0, (b1 - b0) * t.shape[-1])


def _border_columns(x: torch.Tensor, columns: Columns) -> torch.Tensor:
    """im2col rows of every border position, box after box, in one gather: box k is (its positions * N, its taps *
    C), position-major (the images of one position are consecutive rows), each row tap-major (the taps of its
    span in row-major order, channels innermost); returned as (rows * taps, C)."""
    padded = _padded_channels_last(x, columns)
    return padded.view(-1, padded.shape[-1]).index_select(0, columns.pixels(x.shape[0], x.device))


def _stack(views: list[torch.Tensor]) -> torch.Tensor:
    """Views into one storage of equal shapes and strides, in storage order, as one view with a leading dimension
    (a pair: the second's offset from the first as its stride)."""
    first = views[0]
    if len(views) == 1:
        return first.unsqueeze(0)
    step = views[1].storage_offset() - first.storage_offset()
    return first.as_strided((2, *first.shape), (step, *first.stride()), first.storage_offset())


def _groups(columns: Columns) -> tuple:
    """`columns.groups`, or under torch.compile every box alone: inductor cannot write through the strided view of
    a pair (an as_strided view), nor dynamo into a non-contiguous `out=`."""
    if torch.compiler.is_compiling():
        return tuple((box,) for group in columns.groups for box in group)
    return columns.groups


def _one_product(span: tuple[int, int, int, int], kernel_width: int) -> bool:
    """Whether a box's taps `span` are one run of each tap-major filter (whole kernel rows, or one row), so that the
    box is one matrix product; else it takes one per tap row (a left strip's two right taps of each kernel row)."""
    a0, a1, b0, b1 = span
    return b1 - b0 == kernel_width or a1 - a0 <= 1


def _chunks(columns: Columns, k: int, kernel_width: int) -> list[tuple[int, int]]:
    """The products of border box k, as ranges of its span's tap rows (relative to the span)."""
    a0, a1, _, _ = columns.spans[k]
    if _one_product(columns.spans[k], kernel_width):
        return [(0, a1 - a0)]
    return [(i, i + 1) for i in range(a1 - a0)]


def _rows(t: torch.Tensor, columns: Columns, group: tuple, images: int) -> torch.Tensor:
    """The rows of 2-d `t` (one per border position and image) of the boxes of `group`, as (boxes, rows, width)."""
    starts = columns.starts
    return _stack([t[starts[k] * images : starts[k + 1] * images] for k, _ in group])


def _taps(t: torch.Tensor, columns: Columns, group: tuple, images: int, chunk: tuple[int, int]) -> torch.Tensor:
    """Tap rows `chunk` of the boxes of `group` in a (contiguous) buffer laid out like the border rows, as (boxes,
    rows, taps * C)."""
    if torch.compiler.is_compiling():  # plain slices: inductor cannot write through an as_strided view
        return _stack([_block(t, columns, k, images)[:, chunk[0] : chunk[1]].flatten(1) for k, _ in group])
    # One view, its strides worked out here: slicing each box costs more than its product on small maps.
    c, cells, (k0, _), (k1, _) = t.shape[-1], columns.cells, group[0], group[-1]
    a0, a1, b0, b1 = columns.spans[k0]
    run = (b1 - b0) * c  # one tap row of a box's row
    rows = (columns.starts[k0 + 1] - columns.starts[k0]) * images
    return t.as_strided(
        (len(group), rows, (chunk[1] - chunk[0]) * run),
        ((cells[k1] - cells[k0]) * images * c or 1, (a1 - a0) * run, 1),
        t.storage_offset() + cells[k0] * images * c + chunk[0] * run,
    )


def _filters(banks: torch.Tensor, columns: Columns, group: tuple, chunk: tuple[int, int]) -> torch.Tensor:
    """Tap rows `chunk` of the spans of `group`'s filters in (contiguous) tap-major `banks` (regions * out
    channels, kh, kw, C), as (boxes, out channels, taps * C)."""
    channels, kh, kw, c = banks.shape[0] // len(REGIONS), *banks.shape[1:]
    if torch.compiler.is_compiling():  # plain slices: inductor cannot write through an as_strided view
        views = []
        for k, index in group:
            a0, _, b0, b1 = columns.spans[k]
            bank = banks[index * channels : (index + 1) * channels]
            views.append(bank[:, a0 + chunk[0] : a0 + chunk[1], b0:b1].flatten(1))
        return _stack(views)
    offsets = []
    for k, index in group:
        a0, _, b0, _ = columns.spans[k]
        offsets.append(index * channels * kh * kw * c + ((a0 + chunk[0]) * kw + b0) * c)
    _, _, b0, b1 = columns.spans[group[0][0]]
    return banks.as_strided(
        (len(group), channels, (chunk[1] - chunk[0]) * (b1 - b0) * c),
        (offsets[-1] - offsets[0] or 1, kh * kw * c, 1),
        banks.storage_offset() + offsets[0],
    )


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """`out` = a @ b, batched: straight into `out` where its rows are runs (MKL's fp32 products write rows any
    distance apart; oneDNN's bf16 ones only dense matrices; both a pair's matrices any distance apart), else, and
    under torch.compile (dynamo refuses a strided `out=`), through a new tensor."""
    dense = out.stride(-2) == out.shape[-1] or out.dtype == torch.float32
    if out.stride(-1) == 1 and dense and not torch.compiler.is_compiling():
        torch.bmm(a, b, out=out)
    else:
        out.copy_(torch.bmm(a, b))


def _zero_outside(grads: torch.Tensor, span: tuple[int, int, int, int]) -> None:
    """Zero one region's tap-major filter gradient (out channels, kh, kw, C) outside `span`."""
    a0, a1, b0, b1 = span
    if a1 == a0 or b1 == b0:
        grads.zero_()
        return
    for part in (grads[:, :a0], grads[:, a1:], grads[:, a0:a1, :b0], grads[:, a0:a1, b1:]):
        if part.numel():
            part.zero_()


def _columns_forward(out, x, weight, region_weight, region_bias, plan: EdgePlan) -> torch.Tensor:
    """Write the border boxes of a "columns" plan into `out`: one gather of their im2col rows, one matrix product
    per box with its own filter (two boxes alike batched), one scatter into the output. Returns the rows (see
    `_border_columns`)."""
    columns, n, channels = plan.columns, x.shape[0], weight.shape[0]
    a = _border_columns(x, columns)
    y = a.new_empty(columns.starts[-1] * n, channels)
    banks = _tap_major(region_weight)
    for group in _groups(columns):
        ys = _rows(y, columns, group, n)
        for i, chunk in enumerate(_chunks(columns, group[0][0], weight.shape[3])):
            gathered = _taps(a, columns, group, n, chunk)
            filters = _filters(banks, columns, group, chunk).transpose(1, 2)
            if i:
                ys.baddbmm_(gathered, filters)
            elif region_bias is None:
                _bmm(gathered, filters, ys)
            else:
                biases = _stack([region_bias[index * channels : (index + 1) * channels][None] for _, index in group])
                torch.baddbmm(biases, gathered, filters, out=ys)
    rows, cols, _ = columns.on(x.device)
    out.permute(2, 3, 0, 1)[rows, cols] = y.view(-1, n, channels)
    return a


def _columns_backward(
    grad_out, x, region_weight, plan: EdgePlan, gx, grw, grb, need_x: bool, a=None
) -> torch.Tensor | None:
    """Gradients of the border boxes of a "columns" plan: the region filters' and biases' written into their rows
    of `grw` and `grb` (taps outside a box's span zero), the input's added to `gx` (returned; created when None)
    through one scatter. `a`: the rows the forward gathered, if it kept them (gathered again here when the
    filters' gradients need them)."""
    columns, (n, c, h, w) = plan.columns, x.shape
    channels = region_weight.shape[0] // len(REGIONS)
    kernel = region_weight.shape[2:]
    if a is None and grw is not None:
        a = _border_columns(x, columns)
    rows, cols, left_out = columns.on(x.device)
    g = grad_out.permute(2, 3, 0, 1)[rows, cols].reshape(-1, channels)
    ga = g.new_empty(columns.cells[-1] * n, c) if need_x else None
    banks = _tap_major(region_weight)
    # The filters' gradients straight into `grw` where it is channels_last (as `region_weight` is made), else
    # through one copy at the end.
    in_place = grw is not None and grw.is_contiguous(memory_format=torch.channels_last)
    bank_grads = None if grw is None else grw.permute(0, 2, 3, 1) if in_place else torch.empty_like(banks)
    for group in _groups(columns):
        grads = _rows(g, columns, group, n)
        for chunk in _chunks(columns, group[0][0], kernel[1]):
            filters = _filters(banks, columns, group, chunk)
            if ga is not None:
                _bmm(grads, filters, _taps(ga, columns, group, n, chunk))
            if bank_grads is not None:
                gathered = _taps(a, columns, group, n, chunk)
                _bmm(grads.transpose(1, 2), gathered, _filters(bank_grads, columns, group, chunk))
        if grb is not None:
            torch.sum(grads, 1, out=_stack([grb[index * channels : (index + 1) * channels] for _, index in group]))
    if bank_grads is not None:
        # The taps that read only padding get zeros: in one indexed write, or on the CPU for filters of over 16K
        # values per tap (ResNet50's 256- and 512-channel layers) a fill per slice, where memory speed beats calls.
        if bank_grads.device.type == "cpu" and channels * c > ZERO_FILL_MIN_VALUES:
            for k, box in enumerate(plan.boxes[columns.first :]):
                _zero_outside(bank_grads[box.index * channels : (box.index + 1) * channels], columns.spans[k])
        elif left_out.shape[1]:
            bank_grads.view(len(REGIONS), channels, kernel[0] * kernel[1], c)[left_out[0], :, left_out[1]] = 0
        if not in_place:
            for box in plan.boxes[columns.first :]:
                rows_of = slice(box.index * channels, (box.index + 1) * channels)
                grw[rows_of] = bank_grads[rows_of].permute(0, 3, 1, 2)
    if ga is None:
        return gx
    # col2im: every (position, image, tap) adds its gradient row of channels into the padded input pixel it read.
    padded = x.new_zeros(n * columns.padded[0] * columns.padded[1], c)
    padded.index_add_(0, columns.pixels(n, x.device), ga)
    pl, _, pt, _ = columns.padding
    part = padded.view(n, *columns.padded, c).permute(0, 3, 1, 2)[:, :, pt : pt + h, pl : pl + w]
    return torch.empty_like(x).copy_(part) if gx is None else gx.add_(part)


def _computed_width(box: Box, stride: int, dilation: int, kernel: int) -> int:
    """Output columns of a box's conv (the CPU workaround computes one more than the box keeps)."""
    _, _, jlo, jhi, pl, pr, _, _ = box.window
    return (jhi - jlo + pl + pr - dilation * (kernel - 1) - 1) // stride + 1


def _region_grads(plan: EdgePlan, region_weight, grad_out, need_weight: bool, need_bias: bool) -> tuple:
    """Gradient buffers of `region_weight` and `region_bias`: every present region overwrites its own rows, so
    only the regions this map lacks are zero-filled (the buffer is 8 filters: filling it all would cost as much as
    writing it)."""
    present = {box.index for box in plan.boxes}
    missing = [i for i in range(len(REGIONS)) if i not in present]
    channels = region_weight.shape[0] // len(REGIONS)
    grw = grb = None
    if need_weight:
        grw = torch.empty_like(region_weight)
        for i in missing:
            grw[i * channels : (i + 1) * channels] = 0
    if need_bias:
        grb = grad_out.new_empty(region_weight.shape[0])
        for i in missing:
            grb[i * channels : (i + 1) * channels] = 0
    return grw, grb
