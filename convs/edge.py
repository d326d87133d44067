"""Edge convolution (Innamorati et al. 2019): separate filters for the interior, 4 edges and 4 corners."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import AxisPlan, check_padding_mode, conv_kwargs, conv_plans, copy_conv_params, side_padding

# Order of the 8 border filters in `region_weight`; the interior filter is the layer's ordinary `weight`.
REGIONS = ("top_left", "top", "top_right", "left", "right", "bottom_left", "bottom", "bottom_right")
_CACHE_SIZE = 64


def _spans(plan: AxisPlan) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(before, middle, after) output ranges of one axis; a window leaving both sides counts as 'before'."""
    head = min(plan.low, plan.out)
    tail = max(plan.out - plan.high, head)
    return (0, head), (head, tail), (tail, plan.out)


class EdgeConv2d(nn.Conv2d):
    """Edge convolution: one filter per region (interior, 4 edges, 4 corners), whatever the kernel size.

    An output position belongs to a border region when its window reaches into the padding on that side (the
    thesis' scalable design: one filter per region rather than per distance to the border). The interior
    filter runs once over the whole image, as a plain conv would; only the thin border strips are recomputed
    with their own filters. Strided, dilated, grouped and rectangular kernels all work (the thesis could not
    apply edge conv to dilated convolutions). With all region filters equal to `weight` the layer is exactly
    `nn.Conv2d` (the unified view, thesis section 3.4), which is how `from_conv` starts.
    """

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
            self.region_weight = nn.Parameter(torch.empty(shape, device=self.weight.device, dtype=self.weight.dtype))
            self._reset_regions()
        else:  # without padding no window ever leaves the image: the layer is a plain conv
            self.register_parameter("region_weight", None)
        self._region_cache: OrderedDict[tuple[int, int], list] = OrderedDict()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "region_weight", None) is not None:
            self._reset_regions()

    def _reset_regions(self) -> None:
        for i in range(len(REGIONS)):  # independent default init per region filter, as for any conv
            nn.init.kaiming_uniform_(self.region_filter(i), a=math.sqrt(5))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> Self:
        """Same geometry as `conv`, every region filter a copy of its weight: exactly the same function."""
        layer = cls(**conv_kwargs(conv), device=conv.weight.device, dtype=conv.weight.dtype)
        copy_conv_params(conv, layer)
        if layer.region_weight is not None:
            with torch.no_grad():
                layer.region_weight.copy_(conv.weight.repeat(len(REGIONS), 1, 1, 1))
            layer.region_weight.requires_grad_(conv.weight.requires_grad)
        return layer

    def region_filter(self, index: int) -> torch.Tensor:
        """The filter of region `REGIONS[index]`, shaped like `weight` (a view into `region_weight`)."""
        return self.region_weight.narrow(0, index * self.out_channels, self.out_channels)

    def regions(self, height: int, width: int) -> list[tuple[int, tuple[int, int, int, int], tuple[int, ...]]]:
        """Border regions for an input size: (filter index, output box r0, r1, c0, c1, input window and padding)."""
        key = (height, width)
        compiling = torch.compiler.is_compiling()
        if not compiling and key in self._region_cache:
            self._region_cache.move_to_end(key)
            return self._region_cache[key]
        rows, cols = conv_plans(self, height, width)
        boxes = []
        cells = [(v, h) for v in range(3) for h in range(3) if (v, h) != (1, 1)]  # REGIONS order; (1, 1) = interior
        row_spans, col_spans = _spans(rows), _spans(cols)
        for index, (v, h) in enumerate(cells):
            (r0, r1), (c0, c1) = row_spans[v], col_spans[h]
            if r1 > r0 and c1 > c0:
                ilo, ihi, pt, pb = rows.window(r0, r1)
                jlo, jhi, pl, pr = cols.window(c0, c1)
                boxes.append((index, (r0, r1, c0, c1), (ilo, ihi, jlo, jhi, pl, pr, pt, pb)))
        if not compiling:
            self._region_cache[key] = boxes
            if len(self._region_cache) > _CACHE_SIZE:
                self._region_cache.popitem(last=False)
        return boxes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        if self.region_weight is None:
            return out
        # One split, not one narrow per region: the backward of split assembles a single gradient for region_weight.
        filters = self.region_weight.split(self.out_channels)
        for index, (r0, r1, c0, c1), (ilo, ihi, jlo, jhi, pl, pr, pt, pb) in self.regions(x.shape[-2], x.shape[-1]):
            patch = F.pad(x[:, :, ilo:ihi, jlo:jhi], (pl, pr, pt, pb))
            region = F.conv2d(patch, filters[index], self.bias, self.stride, 0, self.dilation, self.groups)
            # The interior conv's backward does not need its output, so overwriting the strips is autograd-safe.
            out[:, :, r0:r1, c0:c1] = region
        return out
