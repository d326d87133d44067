"""Validity masks (1 = valid pixel, 0 = hole): validation, and the per-pass flow that hands them to layers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F


def check_mask(x: torch.Tensor, mask: torch.Tensor, *, channels: tuple[int, ...], owner: str, hint: str = "") -> None:
    """Raise a clear error unless `mask` fits input `x`: (N or 1, c, H, W) with c in `channels`, float or bool.

    Only shapes and dtypes are checked here (no device sync); value ranges are checked once per forward by
    `convs.Masked`, not in every layer.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{owner}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise TypeError(
            f"{owner}: mask must be a float tensor with values in [0, 1] or a bool tensor, got {mask.dtype}"
        )
    n, _, h, w = x.shape
    expected = " or ".join(f"({n}, {c}, {h}, {w})" for c in channels)
    if mask.dim() != 4 or mask.shape[0] not in (n, 1) or mask.shape[1] not in channels or mask.shape[-2:] != (h, w):
        raise ValueError(
            f"{owner}: mask of shape {tuple(mask.shape)} does not match input of shape {tuple(x.shape)}; "
            f"expected {expected}, values in [0, 1] (batch may also be 1; 1 = valid pixel, 0 = hole){hint}"
        )


class MaskFlow:
    """The validity masks of one forward pass through one `convs.Masked` model, keyed by spatial size.

    A mask-aware layer asks for the mask at its input's size. A size seen before returns what is stored; a new
    size is derived from the nearest finer mask by max-pooling (a position is valid if any pixel it covers is),
    or, going up (decoders), by nearest upsampling of the finest coarser one. Partial conv stores its updated
    mask under its output size as the union with what was there, so holes only shrink within a pass.
    """

    def __init__(self, layers: frozenset[int], mask: torch.Tensor) -> None:
        self.layers = layers
        self.by_size: dict[tuple[int, int], torch.Tensor] = {(mask.shape[-2], mask.shape[-1]): mask}

    def mask_at(self, height: int, width: int) -> torch.Tensor:
        key = (height, width)
        if key in self.by_size:
            return self.by_size[key]
        finer = [k for k in self.by_size if k[0] >= height and k[1] >= width]
        if finer:
            source = self.by_size[min(finer, key=lambda k: k[0] * k[1])]
            mask = F.adaptive_max_pool2d(source, key)
        else:
            source = self.by_size[max(self.by_size, key=lambda k: k[0] * k[1])]
            mask = F.interpolate(source, size=key, mode="nearest")
        self.by_size[key] = mask
        return mask

    def update(self, mask: torch.Tensor) -> None:
        key = (mask.shape[-2], mask.shape[-1])
        old = self.by_size.get(key)
        self.by_size[key] = mask if old is None else torch.maximum(old, mask)


# Eager: a context variable, not module state, so each thread (and asyncio task) sees only its own passes.
_ACTIVE: ContextVar[tuple[MaskFlow, ...]] = ContextVar("convs_mask_flows", default=())
# Under torch.compile the hand-off happens once, while dynamo traces (ContextVar.set cannot be traced); the
# compiled graph then carries the masks as plain tensors, with no Python state left at run time.
_TRACING: list[MaskFlow] = []


def active_flow(layer: torch.nn.Module) -> MaskFlow | None:
    """The mask flow of the innermost running `Masked` model that contains `layer`, if any."""
    flows = _TRACING if torch.compiler.is_compiling() else _ACTIVE.get()
    for flow in reversed(flows):
        if id(layer) in flow.layers:
            return flow
    return None


@contextmanager
def flowing(flow: MaskFlow) -> Iterator[MaskFlow]:
    """Make `flow` visible to the mask-aware layers it lists for the duration of the block."""
    if torch.compiler.is_compiling():
        _TRACING.append(flow)
        try:
            yield flow
        finally:
            _TRACING.pop()
        return
    token = _ACTIVE.set((*_ACTIVE.get(), flow))
    try:
        yield flow
    finally:
        _ACTIVE.reset(token)
