"""Holes inside the image: run a converted model with a validity mask delivered to every mask-aware layer."""

from __future__ import annotations

import torch
from torch import nn

from .gated import GatedConv2d
from .masks import MaskFlow, check_mask, flowing
from .partial import PartialConv2d

MASK_AWARE = (PartialConv2d, GatedConv2d)


class Masked(nn.Module):
    """Wrap a converted model so that `forward(x, mask)` reaches every mask-aware layer, with no change to its code.

    `mask` is (N, 1, H, W) or (N, C, H, W) (C = channels of `x`), float in [0, 1] or bool, 1 = valid, 0 = hole.
    During the call each partial conv takes the mask at its input's resolution and stores its updated mask at
    its output's (holes shrink as the partial-conv rule says); the first gated layer (every layer, for affine)
    takes it as an extra input channel. Resolutions no layer produced (after pooling, or upsampling in a
    decoder) are derived from the nearest mask (see `MaskFlow`). Without a mask the model runs exactly as in
    padding-only mode. The hand-off uses a context variable, so threads and several models run independently.

    Convert first, then wrap: the layers are collected here. Edge conv handles padding only and ignores holes.

    Args:
        model: a model converted with `convs.convert` (partial, gated or affine); it is used as is, not copied.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import convs
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))
        >>> convs.convert(model, "partial")
        2
        >>> masked = convs.Masked(model)
        >>> x, mask = torch.randn(1, 3, 16, 16), torch.ones(1, 1, 16, 16)
        >>> mask[..., 4:10, 4:10] = 0  # a 6x6 hole
        >>> out = masked(x, mask)
        >>> out.shape
        torch.Size([1, 4, 8, 8])
        >>> torch.allclose(masked(x.masked_fill(mask == 0, 5.0), mask), out)  # what lies under the hole is ignored
        True
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._layers = self._mask_aware_layers()

    def _mask_aware_layers(self) -> frozenset[int]:
        return frozenset(id(m) for m in self.model.modules() if isinstance(m, MASK_AWARE))

    def __setstate__(self, state: dict) -> None:
        """A pickled or deep-copied `Masked` (an MLflow model, a checkpointed module) holds new layer objects: find
        them again, or its copies would run the mask-aware layers without the mask."""
        super().__setstate__(state)
        self._layers = self._mask_aware_layers()

    @property
    def mask_aware(self) -> bool:
        """Whether the model has a layer that takes the mask (partial, gated, affine); zero and edge have none."""
        return bool(self._layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *args, return_masks: bool = False, **kwargs):
        """`model(x, *args, **kwargs)` with `mask` flowing; with `return_masks`, also {(H, W): mask} of the pass.

        Args:
            x: the input, (N, C, H, W).
            mask: (N or 1, 1 or C, H, W), float in [0, 1] or bool, 1 = valid pixel; None runs the plain model.
            *args, **kwargs: passed on to the model.
            return_masks: also return the masks of the pass, keyed by spatial size.

        Returns:
            The model's output; with `return_masks`, `(output, {(H, W): mask})` (an empty dict without a mask).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> import convs
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))
            >>> convs.convert(model, "partial")
            2
            >>> masked = convs.Masked(model)
            >>> x, mask = torch.randn(1, 3, 16, 16), torch.ones(1, 1, 16, 16)
            >>> mask[..., 4:10, 4:10] = 0  # a 6x6 hole
            >>> out, masks = masked(x, mask, return_masks=True)
            >>> sorted(masks)
            [(8, 8), (16, 16)]
            >>> int((masks[(16, 16)] == 0).sum())  # the first 3x3 layer shrank the hole to 4x4
            16
            >>> torch.equal(masked(x), model(x))  # without a mask: the model as it is
            True
        """
        if mask is None:
            out = self.model(x, *args, **kwargs)
            return (out, {}) if return_masks else out
        mask = self._validated(x, mask)
        with flowing(MaskFlow(self._layers, mask)) as flow:
            out = self.model(x, *args, **kwargs)
        return (out, dict(flow.by_size)) if return_masks else out

    def _validated(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self._layers:
            raise ValueError(
                "Masked(model) got a mask but the model has no mask-aware layer: convert it first, e.g. "
                "convs.convert(model, 'partial'), then wrap it (edge and zero padding ignore holes)"
            )
        check_mask(x, mask, channels=(1, x.shape[1]), owner="Masked")
        if mask.dtype == torch.bool:
            return mask.to(torch.float32)
        if not torch.compiler.is_compiling():  # a data-dependent check: one sync per forward, not per layer
            low, high = torch.aminmax(mask)
            if low.item() < 0 or high.item() > 1:
                raise ValueError(
                    f"mask values must lie in [0, 1] (1 = valid pixel, 0 = hole), got min {low.item():g} and "
                    f"max {high.item():g}"
                )
        return mask.to(torch.float32)
