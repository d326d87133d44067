"""Validation of validity masks (1 = valid pixel, 0 = hole) shared by the mask-aware layers."""

from __future__ import annotations

import torch


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
            f"expected {expected} (batch may also be 1), with 1 = valid pixel and 0 = hole{hint}"
        )
