"""What several tasks share: ImageNet normalisation, mixed precision, progress logging, synthetic-scene drawing."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

from .preset import PresetError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

T = TypeVar("T")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # a preset's `amp` -> autocast dtype (None: fp32)


def autocast(device: torch.device, amp: str | None) -> torch.autocast:
    """Mixed precision as a preset asks (`preset.amp`): the one setting of training, evaluation and benchmarks.

    None runs in full precision, as the thesis trained; "bf16" autocasts on GPUs and CPUs alike; "fp16" only on
    GPUs (the loop scales the loss for it). A CPU is refused fp16: CPU autocast has few fp16 kernels and
    PyTorch trains there in bf16 or fp32, so asking for it is a mistake to report, not to remap silently.
    """
    if amp is not None and amp not in AMP_DTYPES:
        raise PresetError(
            f"Invalid preset value amp={amp!r}: expected None (fp32) or one of {', '.join(AMP_DTYPES)} "
            '(e.g. amp="bf16").'
        )
    if amp == "fp16" and device.type == "cpu":
        raise PresetError(
            "Invalid preset value amp='fp16' on a CPU: CPUs train in bf16 or fp32 only; "
            'use amp="bf16" there, or amp=None for fp32 (the thesis\' precision).'
        )
    if amp is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=True)


def log_progress(
    items: Iterable[T],
    *,
    total: int,
    what: str,
    logger: logging.Logger,
    quiet_s: float = 5.0,
    every_s: float = 30.0,
) -> Iterator[T]:
    """Yield `items`, logging `what: i/total` at each 20% step and at least every `every_s` seconds.

    Short loops stay silent: nothing is logged during the first `quiet_s` seconds or within `quiet_s` of the
    previous line. When something was logged, a last line gives the time taken.
    """
    start = last = time.perf_counter()
    logged, step = False, max(1, round(total / 5))
    done = 0
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if (done % step == 0 and now - last >= quiet_s) or now - last >= every_s:
            logger.info("%s: %d/%d (%.0f%%), %.0f s", what, done, total, 100 * done / max(total, 1), now - start)
            last, logged = now, True
    if logged:
        logger.info("%s: done, %d in %.0f s", what, done, time.perf_counter() - start)


# synthetic scenes: float (H, W, 3) canvases drawn with boolean masks, saved as uint8 --------------------------------


def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of every pixel, two float32 (H, W) arrays, to draw shapes as boolean masks."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    return yy, xx


def noisy_canvas(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    *,
    colour_range: tuple[float, float] = (40, 140),
    tilt: float = 30,
    noise: float = 12,
) -> np.ndarray:
    """A float (H, W, 3) background: a random colour, a random linear gradient of up to `tilt`, Gaussian noise."""
    height, width = yy.shape
    base = rng.uniform(*colour_range, 3)
    grad = (xx / width * rng.uniform(-tilt, tilt) + yy / height * rng.uniform(-tilt, tilt))[..., None]
    return base[None, None, :] + grad + rng.normal(0, noise, (height, width, 3))


def disc(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean (H, W) mask of the pixels strictly inside the circle of radius `r` around (`cy`, `cx`)."""
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float canvas clipped to 0..255 as uint8 pixels, ready for PIL."""
    return np.clip(image, 0, 255).astype(np.uint8)
