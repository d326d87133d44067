"""Partial convolution (Liu et al. 2018): re-weight each window by window size / valid pixels."""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import AxisPlan, SizeCache, check_padding_mode, conv_kwargs, conv_plans, copy_conv_params
from .masks import active_flow, check_mask
from .policy import ConvReplacement


def _ratio_strips(plan: AxisPlan) -> tuple[list[tuple[int, int, list[float]]], list[tuple[int, int]]]:
    """Border strips of one axis where the ratio differs from 1, and the runs of positions with no valid tap."""
    ratio = [plan.kernel / v if v else 0.0 for v in plan.valid]
    before, _, after = plan.spans
    strips = [(a, b, ratio[a:b]) for a, b in (before, after) if b > a]
    dead: list[tuple[int, int]] = []
    for i, v in enumerate(plan.valid):
        if v == 0:
            if dead and dead[-1][1] == i:
                dead[-1] = (dead[-1][0], i + 1)
            else:
                dead.append((i, i + 1))
    return strips, dead


class PartialConv2d(ConvReplacement, nn.Conv2d):
    """Partial convolution (Liu et al. 2018): re-weight each window by window size / valid pixels.

    `forward(x)` is the padding mode of "Partial Convolution based Padding" (2018): zero padding counts as
    invalid, `out = conv(x, W) * r + b` with `r = window / valid` (eq. 3.6 of the thesis). `r` depends only on
    the position, is separable per axis and differs from 1 only in thin border strips, so only those strips
    are touched after one ordinary convolution; the strips are cached per (H, W, device, dtype).

    `forward(x, mask)` is the hole mode of the inpainting paper: `mask` is (N, 1, H, W), or (N, in_channels,
    H, W) with `multi_channel=True`, 1 = valid. It returns `(out, updated_mask)` exactly as NVIDIA's
    `PartialConv2d`: the input is masked, bias handled as `(raw - b) * ratio + b`, windows with no valid pixel
    give 0 and a 0 mask. Mask arithmetic runs in fp32 whatever the autocast dtype, so fp16/bf16 stay finite.
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
        *,
        multi_channel: bool = False,
    ) -> None:
        check_padding_mode(padding_mode, type(self).__name__)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.multi_channel = multi_channel
        self._strip_cache: SizeCache[tuple] = SizeCache()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, multi_channel: bool = False) -> Self:
        """Same geometry as `conv` and a copy of its weights.

        Args:
            conv: the source convolution (zero padding); it is not modified.
            multi_channel: take per-channel masks (N, in_channels, H, W) in hole mode (NVIDIA's `multi_channel`).

        Returns:
            A layer on `conv`'s device and dtype, in its train/eval mode. It equals `conv` wherever the window lies
            inside the image and re-weights the border windows by window / valid (eq. 3.6).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> import convs
            >>> _ = torch.manual_seed(0)
            >>> conv = nn.Conv2d(3, 8, 3, padding=1)
            >>> layer = convs.PartialConv2d.from_conv(conv)
            >>> x = torch.randn(2, 3, 10, 10)
            >>> out = layer(x)
            >>> torch.allclose(out[..., 1:-1, 1:-1], conv(x)[..., 1:-1, 1:-1], atol=1e-6)  # the interior
            True
            >>> torch.allclose(out, conv(x), atol=1e-6)  # the border windows are re-weighted
            False
            >>> out, updated = layer(x, torch.ones(2, 1, 10, 10))  # hole mode: also the updated mask
            >>> updated.shape
            torch.Size([2, 1, 10, 10])
        """
        layer = cls(
            **conv_kwargs(conv), device=conv.weight.device, dtype=conv.weight.dtype, multi_channel=multi_channel
        )
        copy_conv_params(conv, layer)
        return layer

    def extra_repr(self) -> str:
        return super().extra_repr() + (", multi_channel=True" if self.multi_channel else "")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Padding mode without `mask` (returns a tensor); hole mode with it (returns `(out, updated_mask)`).

        Inside a running `convs.Masked` model the layer takes its mask from the pass's `MaskFlow`, stores the
        updated one there and returns just the tensor, so the model's own code needs no change.
        """
        if mask is not None:
            return self._forward_holes(x, mask)
        flow = active_flow(self)
        if flow is None:
            return self._forward_padding(x)
        mask = flow.mask_at(x.shape[-2], x.shape[-1])
        if mask.shape[1] not in (1, self.in_channels) or (mask.shape[1] > 1 and not self.multi_channel):
            mask = mask.mean(1, keepdim=True)  # a per-channel mask seen by a 1-channel layer: fraction valid
        out, updated = self._forward_holes(x, mask)
        flow.update(updated[:, :1])  # the update is the same for every output channel
        return out

    # padding mode -----------------------------------------------------------------------------------------------

    def _strips(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> tuple:
        """(row strips, column strips, dead rows, dead columns) with ratio tensors ready to broadcast."""
        key = (height, width, device, dtype)
        return self._strip_cache.lookup(key, lambda: self._build_strips(height, width, device, dtype))

    def _build_strips(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> tuple:
        rows, cols = conv_plans(self, height, width)
        row_strips, dead_rows = _ratio_strips(rows)
        col_strips, dead_cols = _ratio_strips(cols)
        return (
            [(a, b, torch.tensor(r, device=device, dtype=dtype).view(1, 1, -1, 1)) for a, b, r in row_strips],
            [(a, b, torch.tensor(r, device=device, dtype=dtype).view(1, 1, 1, -1)) for a, b, r in col_strips],
            dead_rows,
            dead_cols,
        )

    def _forward_padding(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        row_strips, col_strips, dead_rows, dead_cols = self._strips(x.shape[-2], x.shape[-1], out.device, out.dtype)
        bias = None if self.bias is None else self.bias.view(1, -1, 1, 1)
        # r is separable, r = r_h * r_w, so re-weighting rows then columns gives (raw - b) * r + b in the corners too.
        # The conv's backward does not need its output, so in-place edits of the strips are safe for autograd.
        for a, b, r in row_strips:
            strip = out[:, :, a:b]
            strip.mul_(r) if bias is None else strip.mul_(r).add_(bias * (1 - r))
        for a, b, r in col_strips:
            strip = out[:, :, :, a:b]
            strip.mul_(r) if bias is None else strip.mul_(r).add_(bias * (1 - r))
        # Windows entirely in the padding (padding >= kernel extent) have no valid pixel: NVIDIA gives 0 there.
        for a, b in dead_rows:
            out[:, :, a:b].zero_()
        for a, b in dead_cols:
            out[:, :, :, a:b].zero_()
        return out

    # hole mode --------------------------------------------------------------------------------------------------

    def mask_update(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 `(ratio, updated_mask)` of NVIDIA's rule, each (N, 1, H_out, W_out), for a validated mask."""
        kh, kw = self.kernel_size
        with torch.no_grad(), torch.autocast(mask.device.type, enabled=False):
            m = mask.float()
            channels = m.shape[1]
            window = channels * kh * kw
            ones = torch.ones(1, channels, kh, kw, device=m.device, dtype=torch.float32)
            count = F.conv2d(m, ones, None, self.stride, self.padding, self.dilation)
            updated = count.clamp(0, 1)
            ratio = window / (count + 1e-8) * updated  # eq. 3.6 with NVIDIA's eps, exact in fp32
        return ratio, updated

    def _forward_holes(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels = (1, self.in_channels) if self.multi_channel else (1,)
        hint = "" if self.multi_channel else "; for a per-channel mask build the layer with multi_channel=True"
        check_mask(x, mask, channels=channels, owner=type(self).__name__, hint=hint)
        if self.multi_channel and mask.shape[1] == 1:
            mask = mask.expand(-1, self.in_channels, -1, -1)
        ratio, updated = self.mask_update(mask)
        raw = self._conv_forward(x * mask.to(x.dtype), self.weight, None)
        out = raw * ratio.to(raw.dtype)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(raw.dtype)
        out = out * updated.to(raw.dtype)
        if self.multi_channel:
            updated = updated.expand(-1, self.out_channels, -1, -1)
        return out, updated.to(mask.dtype if mask.dtype.is_floating_point else torch.float32)
