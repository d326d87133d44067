"""What several tasks share: ImageNet normalisation, mixed precision, progress logging, synthetic-scene drawing."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

import numpy as np
import torch
from torch import nn

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


BACKBONE_PREFIX = "backbone."  # where a model that wraps a torchvision network keeps its keys (hotels' EmbeddingNet)


def load_pretrained(
    target: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    rename: Mapping[str, str] | None = None,
    optional: tuple[str, ...] = (),
) -> list[str]:
    """Load a pretrained state dict into `target` by name; return the names (as given) of the tensors not loaded.

    The source may be a torchvision classifier, a model of this project (converted by `convs.convert` the same
    way as `target`, or plain), or an EmbeddingNet (its `backbone.` prefix is dropped when every key has it).
    `rename` maps source key prefixes to the target's (segmentation: `conv1.` -> `stem.0.`). Every tensor of
    `target` must be there with its shape, except those under an `optional` prefix (a task's own head: the
    classifier, a decoder), which load when present with the same shape and otherwise keep their fresh values;
    BatchNorm's `num_batches_tracked` may be absent (older checkpoints).

    Raises:
        ValueError: a required tensor absent from `state`, or one of another shape, naming the first few.
    """
    if state and all(k.startswith(BACKBONE_PREFIX) for k in state):
        names = {k[len(BACKBONE_PREFIX) :]: k for k in state}
    else:
        names = {k: k for k in state}
    for old, new in (rename or {}).items():
        names = {(new + k[len(old) :] if k.startswith(old) else k): given for k, given in names.items()}
    wanted = target.state_dict()
    is_optional = lambda key: key.startswith(optional) or key.endswith(".num_batches_tracked")  # noqa: E731
    missing = [k for k in wanted if k not in names and not is_optional(k)]
    if missing:
        raise ValueError(
            f"the pretrained state dict lacks {len(missing)} of the {len(wanted)} tensors of the "
            f"{type(target).__name__}, e.g. {', '.join(missing[:4])}: it holds another architecture or depth, or "
            "a model converted to another variant (a plain model converts to any variant; a converted one loads "
            "only into the same variant)"
        )
    misshapen = [
        f"{k}: {tuple(state[names[k]].shape)} given, {tuple(wanted[k].shape)} expected"
        for k in wanted
        if k in names and state[names[k]].shape != wanted[k].shape and not is_optional(k)
    ]
    if misshapen:
        raise ValueError(f"{len(misshapen)} pretrained tensors have another shape: {'; '.join(misshapen[:4])}")
    load = {k: state[names[k]] for k in wanted if k in names and state[names[k]].shape == wanted[k].shape}
    target.load_state_dict(load, strict=False)
    loaded = {names[k] for k in load}
    return [given for given in state if given not in loaded]
