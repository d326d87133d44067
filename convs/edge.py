"""Edge convolution (Innamorati et al. 2019): separate filters for the interior, 4 edges and 4 corners."""

from __future__ import annotations

import math
from typing import Literal, Self

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import SizeCache, check_padding_mode, conv_kwargs, conv_plans, copy_conv_params, side_padding
from .policy import ConvReplacement, check_start

# Order of the 8 border filters in `region_weight` (and biases in `region_bias`); the interior filter is the layer's
# ordinary `weight` and `bias`.
REGIONS = ("top_left", "top", "top_right", "left", "right", "bottom_left", "bottom", "bottom_right")


class EdgeConv2d(ConvReplacement, nn.Conv2d):
    """Edge convolution: one filter per region (interior, 4 edges, 4 corners), whatever the kernel size.

    An output position belongs to a border region when its window reaches into the padding on that side (the
    thesis' scalable design: one filter per region rather than per distance to the border). Each region has its
    own filter and, when the layer has a bias, its own bias (thesis eq. 3.1): `region_weight` and `region_bias`
    stack the 8 border regions along the output channels, in `REGIONS` order. The interior
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
            factory = {"device": self.weight.device, "dtype": self.weight.dtype}
            self.region_weight = nn.Parameter(torch.empty(shape, **factory))
            if bias:  # eq. 3.1: every region has its own bias, region i at [i * out_channels, (i + 1) * out_channels)
                self.region_bias = nn.Parameter(torch.empty(len(REGIONS) * out_channels, **factory))
            else:
                self.register_parameter("region_bias", None)
            self._reset_regions()
        else:  # without padding no window ever leaves the image: the layer is a plain conv
            self.register_parameter("region_weight", None)
            self.register_parameter("region_bias", None)
        self._region_cache: SizeCache[list] = SizeCache()

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
        biases = [None] * len(REGIONS) if self.region_bias is None else self.region_bias.split(self.out_channels)
        boxes = self.regions(x.shape[-2], x.shape[-1], cpu=x.device.type == "cpu")
        for index, (r0, r1, c0, c1), (ilo, ihi, jlo, jhi, pl, pr, pt, pb), (k0, k1) in boxes:
            patch = F.pad(x[:, :, ilo:ihi, jlo:jhi], (pl, pr, pt, pb))
            region = F.conv2d(patch, filters[index], biases[index], self.stride, 0, self.dilation, self.groups)
            # The interior conv's backward does not need its output, so overwriting the strips is autograd-safe.
            out[:, :, r0:r1, c0:c1] = region[..., k0:k1]
        return out
