"""Gated convolution (Yu et al. 2019, DeepFill v2) and its affine extension: learned per-pixel modulation."""

from __future__ import annotations

import copy
import math
from typing import ClassVar, Literal, Self

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import check_padding_mode, conv_kwargs
from .masks import active_flow, check_mask
from .policy import ConvReplacement, ConvSite, check_start

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


class GatedConv2d(ConvReplacement, nn.Conv2d):
    """Gated convolution: feature and gate come from one convolution with twice the output channels.

    norm="outside" (gated conv's default, thesis eq. 3.12): the layer returns `act(feature) * sigmoid(gate)` with `act`
    the identity, and the model's own BatchNorm and activation follow as before: `act(BN(feature * gate))`.
    norm="inside" (thesis eq. 3.11): the layer owns the normalisation and activation,
    `act(BN(feature)) * sigmoid(gate)`; `convert` moves the BatchNorm that follows the conv into the layer, and
    makes `act` the activation the model applies right after that BatchNorm (ReLU, or the identity where the
    BatchNorm's output feeds a residual addition), so a converted model computes its source's function.

    With `mask_channel=True` (default: the class's MASK_EVERY_LAYER) the layer takes the validity mask as one
    extra input channel (DeepFill v2): a ones channel when called without a mask, so the zero padding around it
    reveals where the image ends. By linearity the mask channel is its own small convolution added to the main
    one, so any `groups` works. Inside `convs.Masked` the mask arrives by itself; `forward(x, mask)` passes one
    explicitly.

    `weight` and `bias` hold the feature half, shaped like a plain conv's, so pretrained conv weights load into
    them; `gate_weight`, `gate_bias` and `mask_weight` hold the rest.
    """

    # Outputs of the one fused convolution, in order; subclasses add branches.
    BRANCHES: ClassVar[tuple[str, ...]] = ("feature", "gate")
    # Whether `convert` gives every layer the mask channel (True) or only the first one (False).
    MASK_EVERY_LAYER: ClassVar[bool] = False
    # `from_conv`'s BatchNorm to absorb comes from the site (the module after the conv), never from the user.
    SITE_ARGUMENTS: ClassVar[tuple[str, ...]] = ("bn",)
    # The norm placement when none is given: eq. 3.12 for gated conv (the thesis' Cityscapes form).
    DEFAULT_NORM: ClassVar[Literal["outside", "inside"]] = "outside"

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
        norm: Literal["outside", "inside"] | None = None,
        activation: nn.Module | None = None,
        mask_channel: bool | None = None,
    ) -> None:
        check_padding_mode(padding_mode, type(self).__name__)
        norm = self.resolve_norm(norm)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        mask_channel = self.MASK_EVERY_LAYER if mask_channel is None else mask_channel
        self.norm = norm
        for branch in self.BRANCHES[1:]:
            setattr(self, f"{branch}_weight", nn.Parameter(torch.empty_like(self.weight)))
            setattr(self, f"{branch}_bias", nn.Parameter(torch.zeros(out_channels, **factory)))
        if mask_channel:
            shape = (len(self.BRANCHES) * out_channels, 1, *self.kernel_size)
            self.mask_weight = nn.Parameter(torch.empty(shape, **factory))
        else:
            self.register_parameter("mask_weight", None)
        self.bn = nn.BatchNorm2d(out_channels, **factory) if norm == "inside" else nn.Identity()
        self.act = activation if activation is not None else (nn.ReLU() if norm == "inside" else nn.Identity())
        self._reset_branches()

    @classmethod
    def resolve_norm(cls, norm: str | None) -> Literal["outside", "inside"]:
        """`norm`, or the class's DEFAULT_NORM for None; a clear error for anything else."""
        norm = cls.DEFAULT_NORM if norm is None else norm
        if norm not in NORM_PLACEMENTS:
            raise ValueError(
                f"Invalid norm {norm!r} for {cls.__name__}. Only 'outside' (thesis eq. 3.12) and 'inside' "
                f"(eq. 3.11) are supported; the default is {cls.DEFAULT_NORM!r}."
            )
        return norm

    @property
    def mask_channel(self) -> bool:
        return self.mask_weight is not None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "gate_weight"):
            self._reset_branches()

    def _reset_branches(self) -> None:
        # The extra branches get a conv's default init and zero bias (gate at sigmoid(0) = 0.5, as in DeepFill v2).
        for branch in self.BRANCHES[1:]:
            nn.init.kaiming_uniform_(getattr(self, f"{branch}_weight"), a=math.sqrt(5))
            nn.init.zeros_(getattr(self, f"{branch}_bias"))
        if self.mask_weight is not None:
            nn.init.kaiming_uniform_(self.mask_weight, a=math.sqrt(5))

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        norm: Literal["outside", "inside"] | None = None,
        activation: nn.Module | None = None,
        mask_channel: bool | None = None,
        bn: nn.BatchNorm2d | None = None,
        open_logit: float = 3.0,
        start: Literal["copy", "random"] = "copy",
    ) -> Self:
        """A layer that computes exactly what `conv` computed (and `bn`, for norm="inside"), or a fresh gate.

        start="copy": the gate starts input-independent and open at sigmoid(open_logit) (0.95 by default: open,
        yet with a healthy gradient); the feature half is scaled by 1 / sigmoid(open_logit) so that the product
        equals the source conv (for "inside", the BatchNorm's affine part is scaled instead, exact for ReLU-like
        activations, which are positively homogeneous). Other branches and mask-channel weights start at zero.
        start="random": the feature half (and `bn`) keep the source's values unscaled; gate, shift and
        mask-channel weights get a fresh layer's default (kaiming) init and their biases zero, as in a new layer
        (gate at sigmoid(0) = 0.5 on average); `open_logit` is not used.

        Args:
            conv: the source convolution (zero padding); it is not modified.
            norm: "outside" (eq. 3.12, the model's own BatchNorm and activation follow) or "inside" (eq. 3.11,
                the layer owns them); None (default): the class's DEFAULT_NORM, "outside" for gated conv and
                "inside" for the affine variant.
            activation: the activation of norm="inside" (default: nn.ReLU with a `bn`, the identity without
                one, so that the layer starts as its source); the identity for "outside".
            mask_channel: take the validity mask as an extra input channel (default: the class's
                MASK_EVERY_LAYER).
            bn: for norm="inside", the BatchNorm2d (affine) that followed `conv`; a scaled copy moves into the
                layer. None: no normalisation.
            open_logit: the gate's starting logit (start="copy" only).
            start: "copy" (default, the source's exact function) or "random" (fresh gate, see above).

        Returns:
            A layer on `conv`'s device and dtype, in its train/eval mode, that computes `conv(x)` (norm="outside")
            or `activation(bn(conv(x)))` (norm="inside") with start="copy".

        Raises:
            ValueError: an unknown `norm` or `start`; a `bn` without affine parameters.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> import convs
            >>> _ = torch.manual_seed(0)
            >>> conv, x = nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 10, 10)
            >>> layer = convs.GatedConv2d.from_conv(conv)
            >>> torch.allclose(layer(x), conv(x), atol=1e-5)
            True
            >>> bn = nn.BatchNorm2d(8).eval()
            >>> inside = convs.GatedConv2d.from_conv(conv.eval(), norm="inside", bn=bn)
            >>> torch.allclose(inside(x), torch.relu(bn(conv(x))), atol=1e-5)
            True
            >>> convs.AffineGatedConv2d.from_conv(conv)(x).shape  # the affine variant starts from conv too
            torch.Size([2, 8, 10, 10])
            >>> fresh = convs.GatedConv2d.from_conv(conv, start="random")  # feature = conv's weight, a fresh gate
            >>> torch.equal(fresh.weight, conv.weight), bool(fresh.gate_weight.abs().sum() > 0)
            (True, True)
        """
        check_start(start, cls.__name__)
        norm = cls.resolve_norm(norm)
        if norm == "inside" and bn is None and activation is None:
            activation = nn.Identity()  # no BatchNorm to absorb: the source is `conv` alone, so nothing follows it
        layer = cls(
            **conv_kwargs(conv),
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            norm=norm,
            activation=activation,
            mask_channel=mask_channel,
        )
        if start == "random":
            # The constructor gave gate, shift and mask channel a fresh layer's init; the feature half is the source's.
            with torch.no_grad():
                layer.weight.copy_(conv.weight)
                if conv.bias is not None:
                    layer.bias.copy_(conv.bias)
            if norm == "inside":
                layer.bn = _scaled_copy(bn, 1.0) if bn is not None else nn.Identity()
            layer.train(conv.training)
            return layer
        scale = 1.0 / torch.sigmoid(torch.tensor(open_logit, dtype=torch.float64)).item()
        feature_scale = scale if norm == "outside" or bn is None else 1.0
        with torch.no_grad():
            layer.weight.copy_(conv.weight * feature_scale)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias * feature_scale)
            for branch in cls.BRANCHES[1:]:
                getattr(layer, f"{branch}_weight").zero_()
                getattr(layer, f"{branch}_bias").zero_()
            layer.gate_bias.fill_(open_logit)
            if layer.mask_weight is not None:
                layer.mask_weight.zero_()
        if norm == "inside":
            layer.bn = _scaled_copy(bn, scale) if bn is not None else nn.Identity()
        layer.train(conv.training)
        return layer

    @classmethod
    def replacements(
        cls,
        site: ConvSite,
        *,
        mask_channel: bool = True,
        norm: Literal["outside", "inside"] | None = None,
        activation: nn.Module | None = None,
        **options,
    ) -> dict[nn.Module, nn.Module]:
        """`convert`'s policy for gated layers: the mask channel where it belongs, and BatchNorm absorption.

        Args:
            site: the conv to replace, whether it is the first one of the `convert` call, the module after it and
                the activation the model applies after that module when it is the conv's BatchNorm.
            mask_channel: False gives no layer the mask channel; True (default) gives it to the first converted
                conv only, or to every one for a MASK_EVERY_LAYER class (affine).
            norm: with "inside", a BatchNorm2d registered right after the conv (same parent, as many features as
                the conv has output channels) moves into the layer, and an nn.Identity takes its place. None
                (default): the class's DEFAULT_NORM.
            activation: the activation inside the layer for norm="inside". None (default): the model's own,
                `site.activation_after_bn` (ReLU where the BatchNorm's only user is a ReLU, the identity where it
                feeds an addition); the identity where no BatchNorm is absorbed or the site does not say. The
                model's own activation stays in place: relu(relu(x) * s) = relu(x) * s for a gate s > 0, so the
                converted model computes the source's function either way.
            **options: the other `from_conv` options (open_logit, start).

        Returns:
            {conv: gated layer}, plus {batch norm: nn.Identity()} when one was absorbed.

        Example:
            >>> from torch import nn
            >>> import convs
            >>> conv, bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            >>> site = convs.ConvSite("0", conv, following=bn, first=True, activation_after_bn=nn.ReLU())
            >>> changes = convs.GatedConv2d.replacements(site, norm="inside")
            >>> [type(new).__name__ for new in changes.values()]
            ['GatedConv2d', 'Identity']
            >>> changes[conv].mask_channel, changes[conv].bn is not bn  # the first layer; bn is a scaled copy
            (True, True)
            >>> changes[conv].act  # the model applied a ReLU after bn
            ReLU()
        """
        norm = cls.resolve_norm(norm)
        bn = site.following if norm == "inside" and _absorbable(site.following, site.conv) else None
        if norm == "inside" and activation is None:
            # eq. 3.11 holds the activation the source applies right after this BatchNorm, and no other: the identity
            # is exact whatever follows, so it is also the answer where the site does not say.
            known = bn is not None and site.activation_after_bn is not None
            activation = copy.deepcopy(site.activation_after_bn) if known else nn.Identity()
        layer = cls.from_conv(
            site.conv,
            norm=norm,
            activation=activation,
            mask_channel=bool(mask_channel) and (site.first or cls.MASK_EVERY_LAYER),
            bn=bn,
            **options,
        )
        return {site.conv: layer} if bn is None else {site.conv: layer, bn: nn.Identity()}

    @classmethod
    def needs_activation_after_bn(cls, **options) -> bool:
        """True for norm="inside" without an explicit `activation`: the layer takes the model's own (see above)."""
        return cls.resolve_norm(options.get("norm")) == "inside" and options.get("activation") is None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm={self.norm!r}" + (", mask_channel=True" if self.mask_channel else "")

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the one convolution that yields every branch, grouped as (groups, branch, out/groups)."""
        bias = self.bias if self.bias is not None else torch.zeros_like(self.gate_bias)
        weights = [self.weight] + [getattr(self, f"{b}_weight") for b in self.BRANCHES[1:]]
        biases = [bias] + [getattr(self, f"{b}_bias") for b in self.BRANCHES[1:]]
        if self.groups == 1:
            return torch.cat(weights), torch.cat(biases)
        g = self.groups
        weight = torch.stack([w.unflatten(0, (g, -1)) for w in weights], 1)
        bias = torch.stack([b.unflatten(0, (g, -1)) for b in biases], 1)
        return weight.flatten(0, 2), bias.flatten(0, 2)

    def _mask_term(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Contribution of the mask channel to the fused output: conv(mask, mask_weight); ones without a mask."""
        if self.mask_weight is None:
            if mask is not None:
                raise ValueError(
                    f"{type(self).__name__} without a mask channel got a mask; build it with mask_channel=True "
                    "(convert gives the first layer one), later layers learn their gates from features"
                )
            return None
        if mask is None:
            flow = active_flow(self)
            if flow is not None:
                mask = flow.mask_at(x.shape[-2], x.shape[-1])
        if mask is None:
            m = x.new_ones(1, 1, x.shape[-2], x.shape[-1])  # zero padding around it marks the border
        else:
            check_mask(x, mask, channels=(1, self.in_channels), owner=type(self).__name__)
            m = mask.to(x.dtype).mean(1, keepdim=True)
        return F.conv2d(m, self.mask_weight, None, self.stride, self.padding, self.dilation)

    def _split(self, y: torch.Tensor) -> list[torch.Tensor]:
        c, n = self.out_channels, len(self.BRANCHES)
        if self.groups == 1:
            return list(y.split(c, 1))
        grouped = y.unflatten(1, (self.groups, n, c // self.groups))
        return [grouped[:, :, i].flatten(1, 2) for i in range(n)]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`act(feature) * sigmoid(gate)`; `mask` (1 = valid) feeds the mask channel, which needs mask_channel=True."""
        weight, bias = self.fused_weight()
        y = self._conv_forward(x, weight, bias)
        mask_term = self._mask_term(x, mask)
        if mask_term is not None:
            y = y + mask_term
        return self._combine(y)

    def _combine(self, y: torch.Tensor) -> torch.Tensor:
        if self.groups == 1 and self.norm == "outside" and isinstance(self.act, nn.Identity):
            if torch.compiler.is_compiling():  # inductor fuses the plain expression better than any hand-written one
                return y[:, : self.out_channels] * torch.sigmoid(y[:, self.out_channels :])
            return _Gate.apply(y, self.out_channels)  # the common case, eq. 3.12, in one fused backward
        feature, gate = self._split(y)
        return self.act(self.bn(feature)) * torch.sigmoid(gate)


class AffineGatedConv2d(GatedConv2d):
    """Affine gated convolution (new here): a gate that both scales and shifts, `act(f) * sigmoid(g) + shift`.

    The thesis' proposed future work, in the spirit of SPADE (Park et al. 2019): the modulation is computed
    from features *and* the validity mask, and unlike gated conv every layer sees the mask, at its own
    resolution, as an extra input channel (a ones channel without holes, so every layer knows where the border
    is). Feature, gate and shift come from one convolution with three times the output channels. `from_conv`
    starts from the source function: shift weights and bias at zero, gate open as in `GatedConv2d`.

    Its default placement is norm="inside", `act(BN(f)) * sigmoid(g) + shift`: the shift is added after the
    normalisation, as SPADE modulates after it. With norm="outside" the model's own BatchNorm follows the layer and
    subtracts each channel's batch mean, so the per-channel constant part of the shift (its bias, and any shift
    the same everywhere in the image) cancels; only its spatial variation would act.
    """

    BRANCHES: ClassVar[tuple[str, ...]] = ("feature", "gate", "shift")
    MASK_EVERY_LAYER: ClassVar[bool] = True
    DEFAULT_NORM: ClassVar[Literal["outside", "inside"]] = "inside"

    def _combine(self, y: torch.Tensor) -> torch.Tensor:
        feature, gate, shift = self._split(y)
        return self.act(self.bn(feature)) * torch.sigmoid(gate) + shift


def _absorbable(module: nn.Module | None, conv: nn.Conv2d) -> bool:
    return isinstance(module, nn.BatchNorm2d) and module.num_features == conv.out_channels


def _scaled_copy(bn: nn.BatchNorm2d, scale: float) -> nn.BatchNorm2d:
    """A copy of `bn` whose output is multiplied by `scale` (through its affine weight and bias)."""
    if not bn.affine:
        raise ValueError("GatedConv2d(norm='inside') can only absorb a BatchNorm2d with affine=True")
    out = copy.deepcopy(bn)
    with torch.no_grad():
        out.weight.mul_(scale)
        out.bias.mul_(scale)
    return out
