"""Partial convolution (Liu et al. 2018): re-weight each window by window size / valid pixels."""

from __future__ import annotations

from typing import NamedTuple, Self

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import AxisPlan, SizeCache, check_padding_mode, conv_kwargs, conv_plans, copy_conv_params
from .masks import active_flow, check_mask
from .policy import ConvReplacement


def _ratios(plan: AxisPlan) -> list[float]:
    """window / valid taps of every output position of one axis (0 where no tap is valid)."""
    return [plan.kernel / v if v else 0.0 for v in plan.valid]


def _ratio_strips(plan: AxisPlan) -> tuple[list[tuple[int, int, list[float]]], list[tuple[int, int]]]:
    """Border strips of one axis where the ratio differs from 1, and the runs of positions with no valid tap."""
    ratio = _ratios(plan)
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


class Strips(NamedTuple):
    """Padding mode's re-weighting of one output size, on the output's device and dtype.

    `rows`, `cols`: the border strips (start, stop, ratio shaped to broadcast along that axis) where r != 1.
    `dead_rows`, `dead_cols`: runs of positions whose windows have no valid tap (output 0). `ratio`: the whole
    (H_out, W_out) map r = r_h * r_w, 0 on dead positions (backward reads it).
    """

    rows: list[tuple[int, int, torch.Tensor]]
    cols: list[tuple[int, int, torch.Tensor]]
    dead_rows: list[tuple[int, int]]
    dead_cols: list[tuple[int, int]]
    ratio: torch.Tensor


def _reweight(out: torch.Tensor, bias: torch.Tensor | None, strips: Strips) -> torch.Tensor:
    """`out * r + b * (1 - r)` on the border strips of a conv's output `out` (which includes the bias `b`), in
    place, and 0 where a window has no valid pixel. r is separable, r = r_h * r_w, so re-weighting rows then
    columns gives (raw - b) * r + b in the corners too."""
    b = None if bias is None else bias.view(1, -1, 1, 1)
    for a, e, r in strips.rows:
        part = out[:, :, a:e]
        part.mul_(r) if b is None else part.mul_(r).add_(b * (1 - r))
    for a, e, r in strips.cols:
        part = out[:, :, :, a:e]
        part.mul_(r) if b is None else part.mul_(r).add_(b * (1 - r))
    # Windows entirely in the padding (padding >= kernel extent) have no valid pixel: NVIDIA gives 0 there.
    for a, e in strips.dead_rows:
        out[:, :, a:e].zero_()
    for a, e in strips.dead_cols:
        out[:, :, :, a:e].zero_()
    return out


class _PaddingRatio(torch.autograd.Function):
    """`_reweight` as one autograd node. Autograd would record each in-place strip edit as a node that copies the
    whole output gradient (four copies per layer, and four strided multiplications: 7% of a 64-channel 56 x 56
    layer's forward and backward on the CPU); this node's backward is one multiplication of the gradient by the
    whole ratio map. Eager mode only: dynamo does not trace `mark_dirty`, and under torch.compile inductor
    fuses the strip edits itself.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, bias: torch.Tensor | None, strips: Strips) -> torch.Tensor:
        _reweight(out, bias, strips)
        ctx.mark_dirty(out)
        ctx.strips = strips
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ratio = ctx.strips.ratio
        # One pass over the gradient with the whole ratio map (r, 1 inside, 0 where a window has no valid pixel):
        # the incoming gradient may be shared (a residual sum hands it to both branches), so it is not edited.
        g = grad * ratio
        gb = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:  # the bias's share b * (1 - r), 0 where dead
            wide = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype  # summed in fp32
            share = torch.where(ratio > 0, 1 - ratio, 0).to(wide)
            gb = torch.einsum("nchw,hw->c", grad.to(wide), share).to(ctx.bias_dtype)
        return g, gb, None


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

    def _strips(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Strips:
        """The re-weighting of an input of this size (`Strips`), cached per size, device and dtype."""
        key = (height, width, device, dtype)
        return self._strip_cache.lookup(key, lambda: self._build_strips(height, width, device, dtype))

    def _build_strips(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Strips:
        rows, cols = conv_plans(self, height, width)
        row_strips, dead_rows = _ratio_strips(rows)
        col_strips, dead_cols = _ratio_strips(cols)
        # The whole map for backward: r = r_h * r_w, 0 where a window has no valid pixel.
        ratio = torch.outer(*(torch.tensor(_ratios(axis), dtype=torch.float64) for axis in (rows, cols)))
        return Strips(
            [(a, b, torch.tensor(r, device=device, dtype=dtype).view(1, 1, -1, 1)) for a, b, r in row_strips],
            [(a, b, torch.tensor(r, device=device, dtype=dtype).view(1, 1, 1, -1)) for a, b, r in col_strips],
            dead_rows,
            dead_cols,
            ratio.to(device=device, dtype=dtype),
        )

    def _forward_padding(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        strips = self._strips(x.shape[-2], x.shape[-1], out.device, out.dtype)
        if not (strips.rows or strips.cols or strips.dead_rows or strips.dead_cols):
            return out  # no window reaches into the padding (a 1x1 conv, padding 0): the plain conv
        if torch.compiler.is_compiling():
            return _reweight(out, self.bias, strips)
        return _PaddingRatio.apply(out, self.bias, strips)

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
