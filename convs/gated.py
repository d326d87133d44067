"""Gated convolution (Yu et al. 2019, DeepFill v2): a learned soft gate in (0, 1) per pixel and channel."""

from __future__ import annotations

import copy
import math
from typing import Literal, Self

import torch
from torch import nn

from .geometry import check_padding_mode, conv_kwargs
from .masks import check_mask

NORM_PLACEMENTS = ("outside", "inside")


class _Gate(torch.autograd.Function):
    """`y[:, :c] * sigmoid(y[:, c:])` whose backward writes one gradient for the whole conv output `y`.

    Slicing `y` in autograd would give the conv two zero-filled full-size gradients to add; this keeps the
    backward to a single pass, and saves only `y` (the sigmoid is recomputed, an elementwise op).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, c: int) -> torch.Tensor:
        ctx.c = c
        ctx.save_for_backward(y)
        return y[:, :c] * torch.sigmoid(y[:, c:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        c = ctx.c
        feature, gate = y[:, :c], torch.sigmoid(y[:, c:])
        grad_y = torch.empty_like(y)
        torch.mul(grad, gate, out=grad_y[:, :c])
        torch.ops.aten.sigmoid_backward.grad_input(grad * feature, gate, grad_input=grad_y[:, c:])
        return grad_y, None


class GatedConv2d(nn.Conv2d):
    """Gated convolution: feature and gate come from one convolution with twice the output channels.

    norm="outside" (the default, thesis eq. 3.12): the layer returns `act(feature) * sigmoid(gate)` with `act`
    the identity, and the model's own BatchNorm and activation follow as before: `act(BN(feature * gate))`.
    norm="inside" (thesis eq. 3.11): the layer owns the normalisation and activation,
    `act(BN(feature)) * sigmoid(gate)`; `convert` moves the BatchNorm that follows the conv into the layer.

    With `mask_channel=True` the layer takes the validity mask as one extra input channel (DeepFill v2): a ones
    channel when called without a mask, so the zero padding around it reveals where the image ends.

    `weight` and `bias` hold the feature half, shaped like a plain conv's, so pretrained conv weights load into
    them; `gate_weight`, `gate_bias` and `mask_weight` hold the rest.
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
        norm: Literal["outside", "inside"] = "outside",
        activation: nn.Module | None = None,
        mask_channel: bool = False,
    ) -> None:
        check_padding_mode(padding_mode, type(self).__name__)
        if norm not in NORM_PLACEMENTS:
            raise ValueError(
                f"Invalid norm {norm!r} for GatedConv2d. Only 'outside' (thesis eq. 3.12, the default) and "
                "'inside' (eq. 3.11) are supported."
            )
        if mask_channel and groups != 1:
            raise ValueError(f"GatedConv2d: a mask input channel needs groups=1, got groups={groups}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.norm = norm
        self.gate_weight = nn.Parameter(torch.empty_like(self.weight))
        self.gate_bias = nn.Parameter(torch.zeros(out_channels, **factory))
        if mask_channel:
            self.mask_weight = nn.Parameter(torch.empty(2 * out_channels, 1, *self.kernel_size, **factory))
        else:
            self.register_parameter("mask_weight", None)
        self.bn = nn.BatchNorm2d(out_channels, **factory) if norm == "inside" else nn.Identity()
        self.act = activation if activation is not None else (nn.ReLU() if norm == "inside" else nn.Identity())
        self._reset_gate()

    @property
    def mask_channel(self) -> bool:
        return self.mask_weight is not None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "gate_weight"):
            self._reset_gate()

    def _reset_gate(self) -> None:
        # The gate gets the same default init as a conv; its bias starts at 0 (sigmoid 0.5), as in DeepFill v2.
        nn.init.kaiming_uniform_(self.gate_weight, a=math.sqrt(5))
        nn.init.zeros_(self.gate_bias)
        if self.mask_weight is not None:
            nn.init.kaiming_uniform_(self.mask_weight, a=math.sqrt(5))

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        norm: Literal["outside", "inside"] = "outside",
        activation: nn.Module | None = None,
        mask_channel: bool = False,
        bn: nn.BatchNorm2d | None = None,
        open_logit: float = 3.0,
    ) -> Self:
        """A gated layer that computes exactly what `conv` computed (and `bn`, for norm="inside").

        The gate starts input-independent and open at sigmoid(open_logit) (0.95 by default: open, yet with a
        healthy gradient); the feature half is scaled by 1 / sigmoid(open_logit) so that the product equals the
        source conv (for "inside", the BatchNorm's affine part is scaled instead, exact for ReLU-like
        activations, which are positively homogeneous). Mask-channel weights start at zero.
        """
        layer = cls(
            **conv_kwargs(conv),
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            norm=norm,
            activation=activation,
            mask_channel=mask_channel,
        )
        scale = 1.0 / torch.sigmoid(torch.tensor(open_logit, dtype=torch.float64)).item()
        with torch.no_grad():
            if norm == "outside" or bn is None:
                layer.weight.copy_(conv.weight * scale)
                if conv.bias is not None:
                    layer.bias.copy_(conv.bias * scale)
            else:
                layer.weight.copy_(conv.weight)
                if conv.bias is not None:
                    layer.bias.copy_(conv.bias)
            layer.gate_weight.zero_()
            layer.gate_bias.fill_(open_logit)
            if layer.mask_weight is not None:
                layer.mask_weight.zero_()
        if norm == "inside":
            layer.bn = _scaled_copy(bn, scale) if bn is not None else nn.Identity()
        layer.train(conv.training)
        return layer

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm={self.norm!r}" + (", mask_channel=True" if self.mask_channel else "")

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the one convolution that yields feature and gate, grouped as (groups, 2, out/groups)."""
        bias = self.bias if self.bias is not None else torch.zeros_like(self.gate_bias)
        if self.groups == 1:
            return torch.cat([self.weight, self.gate_weight]), torch.cat([bias, self.gate_bias])
        g = self.groups
        weight = torch.stack([self.weight.unflatten(0, (g, -1)), self.gate_weight.unflatten(0, (g, -1))], 1)
        bias = torch.stack([bias.unflatten(0, (g, -1)), self.gate_bias.unflatten(0, (g, -1))], 1)
        return weight.flatten(0, 2), bias.flatten(0, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`act(feature) * sigmoid(gate)`; `mask` (1 = valid) feeds the mask channel, which needs mask_channel=True."""
        weight, bias = self.fused_weight()
        if self.mask_weight is not None:
            if mask is None:
                m = x.new_ones(x.shape[0], 1, x.shape[2], x.shape[3])
            else:
                check_mask(x, mask, channels=(1, self.in_channels), owner=type(self).__name__)
                m = mask.to(x.dtype).mean(1, keepdim=True).expand(x.shape[0], -1, -1, -1)
            x = torch.cat([x, m], 1)
            weight = torch.cat([weight, self.mask_weight], 1)
        elif mask is not None:
            raise ValueError(
                "GatedConv2d without a mask channel got a mask; only the first layer of a gated network takes the "
                "mask (build it with mask_channel=True), later layers learn their gates from features"
            )
        out = self._conv_forward(x, weight, bias)
        c = self.out_channels
        if self.groups == 1 and self.norm == "outside" and isinstance(self.act, nn.Identity):
            if torch.compiler.is_compiling():  # inductor fuses the plain expression better than any hand-written one
                return out[:, :c] * torch.sigmoid(out[:, c:])
            return _Gate.apply(out, c)  # the common case, eq. 3.12, in one fused backward
        if self.groups == 1:
            feature, gate = out[:, :c], out[:, c:]
        else:
            grouped = out.unflatten(1, (self.groups, 2, c // self.groups))
            feature, gate = grouped[:, :, 0].flatten(1, 2), grouped[:, :, 1].flatten(1, 2)
        return self.act(self.bn(feature)) * torch.sigmoid(gate)


def _scaled_copy(bn: nn.BatchNorm2d, scale: float) -> nn.BatchNorm2d:
    """A copy of `bn` whose output is multiplied by `scale` (through its affine weight and bias)."""
    if not bn.affine:
        raise ValueError("GatedConv2d(norm='inside') can only absorb a BatchNorm2d with affine=True")
    out = copy.deepcopy(bn)
    with torch.no_grad():
        out.weight.mul_(scale)
        out.bias.mul_(scale)
    return out
