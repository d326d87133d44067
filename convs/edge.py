"""Edge convolution (Innamorati et al. 2019): separate filters for the interior, 4 edges and 4 corners."""

from __future__ import annotations

import math
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import SizeCache, check_padding_mode, conv_kwargs, conv_plans, copy_conv_params, side_padding
from .policy import ConvReplacement

# Order of the 8 border filters in `region_weight`; the interior filter is the layer's ordinary `weight`.
REGIONS = ("top_left", "top", "top_right", "left", "right", "bottom_left", "bottom", "bottom_right")


class EdgeConv2d(ConvReplacement, nn.Conv2d):
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
        self._region_cache: SizeCache[list] = SizeCache()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "region_weight", None) is not None:
            self._reset_regions()

    def _reset_regions(self) -> None:
        for i in range(len(REGIONS)):  # independent default init per region filter, as for any conv
            nn.init.kaiming_uniform_(self.region_filter(i), a=math.sqrt(5))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> Self:
        """Same geometry as `conv`, every region filter a copy of its weight: exactly the same function.

        Args:
            conv: the source convolution (zero padding); it is not modified.

        Returns:
            A layer on `conv`'s device and dtype, in its train/eval mode, that computes `conv(x)` until training
            moves the region filters apart.

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
            >>> layer.region_weight.shape  # the 8 border filters, stacked along the output channels
            torch.Size([64, 3, 3, 3])
        """
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

    def regions(self, height: int, width: int, *, cpu: bool = False) -> list[tuple]:
        """Border regions for an input size: (filter index, output box r0, r1, c0, c1, input window and padding,
        columns of the computed box to keep). `cpu`: never compute a strip 1 output column wide (see below)."""
        return self._region_cache.lookup((height, width, cpu), lambda: self._find_regions(height, width, cpu))

    def _find_regions(self, height: int, width: int, cpu: bool) -> list[tuple]:
        rows, cols = conv_plans(self, height, width)
        row_spans, col_spans = rows.spans, cols.spans
        boxes = []
        cells = [(v, h) for v in range(3) for h in range(3) if (v, h) != (1, 1)]  # REGIONS order; (1, 1) = interior
        for index, (v, h) in enumerate(cells):
            (r0, r1), (c0, c1) = row_spans[v], col_spans[h]
            if r1 > r0 and c1 > c0:
                # oneDNN's CPU bf16/fp16 convolution (torch 2.14, seen on Intel Xeon) returns garbage for a stride > 1
                # and an output one column wide and 5+ rows high: exactly a left/right strip of a strided layer. Such
                # a strip is computed one column wider (into the neighbouring region) and the extra column dropped.
                b0, b1 = c0, c1
                if cpu and c1 - c0 == 1 and cols.stride > 1 and cols.out > 1:
                    b0, b1 = (c0, c1 + 1) if c1 < cols.out else (c0 - 1, c1)
                ilo, ihi, pt, pb = rows.window(r0, r1)
                jlo, jhi, pl, pr = cols.window(b0, b1)
                boxes.append((index, (r0, r1, c0, c1), (ilo, ihi, jlo, jhi, pl, pr, pt, pb), (c0 - b0, c1 - b0)))
        return boxes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        if self.region_weight is None:
            return out
        # One split, not one narrow per region: the backward of split assembles a single gradient for region_weight.
        filters = self.region_weight.split(self.out_channels)
        boxes = self.regions(x.shape[-2], x.shape[-1], cpu=x.device.type == "cpu")
        for index, (r0, r1, c0, c1), (ilo, ihi, jlo, jhi, pl, pr, pt, pb), (k0, k1) in boxes:
            patch = F.pad(x[:, :, ilo:ihi, jlo:jhi], (pl, pr, pt, pb))
            region = F.conv2d(patch, filters[index], self.bias, self.stride, 0, self.dilation, self.groups)
            # The interior conv's backward does not need its output, so overwriting the strips is autograd-safe.
            out[:, :, r0:r1, c0:c1] = region[..., k0:k1]
        return out
