"""Segmentation metrics as the thesis reports them: mIoU from a confusion matrix over the split, in three modes
(whole image, square tiles, tiles with 1/3 overlap); docs/datasets.md, "Cityscapes segmentation".

Under several Ray Train workers each evaluates its shard of the split (`tasks.data.Shard`) and the confusion
matrices and loss sums are summed over the workers: every worker gets the scores of the whole split.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..common import autocast, log_progress
from ..data import reads_shard, sum_over_workers
from ..evaluation import ClassTable, ConfusionMatrix, Evaluation
from .data import IGNORE, TRAIN_CLASSES
from .presets import SegmentationPreset

logger = logging.getLogger(__name__)

EVAL_MODES = {"whole": "val/miou", "tile": "val/miou_tile", "tile_overlap": "val/miou_tile_overlap"}


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of `tile` pixels every `stride` along `length`, the last one clamped to the edge."""
    if not 0 < tile <= length or stride <= 0:
        raise ValueError(f"need 0 < tile <= length and stride > 0, got tile={tile}, length={length}, stride={stride}")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def overlap_stride(tile: int) -> int:
    """The thesis' overlapping tiles: 1/3 overlap, stride = ceil(2/3 tile)."""
    return math.ceil(2 * tile / 3)


def predict_tiled(
    model: nn.Module, images: torch.Tensor, tile: int, stride: int, *, max_pixels: int | None = None
) -> torch.Tensor:
    """Class probabilities from square tiles: each tile's softmax summed into place, divided by the per-pixel count.

    The tiles go through the model as batches, not one window at a time: every window of every image is one batch
    item, and a pass holds as many windows as keep it within `max_pixels` input pixels (default: twice the pixels of
    `images`, so that the 1.5x pixels of the thesis' overlapping tiles of a 1:2 image go in one pass, and tiling
    never needs more than twice the activation memory of the whole-image pass beside it). Windows are independent
    (the model is in eval mode, batch norm uses its running statistics), so the result equals the window-by-window
    one.
    """
    n, channels, height, width = images.shape
    windows = [
        (top, left) for top in window_starts(height, tile, stride) for left in window_starts(width, tile, stride)
    ]
    per_pass = max(1, (max_pixels or 2 * n * height * width) // (n * tile * tile))  # windows per forward pass
    total = count = None
    for first in range(0, len(windows), per_pass):
        chunk = windows[first : first + per_pass]
        # (windows x images) batch items, window-major: item w * n + i is window w of image i
        crops = torch.stack([images[:, :, top : top + tile, left : left + tile] for top, left in chunk])
        crops = crops.view(len(chunk) * n, channels, tile, tile)
        if images.is_contiguous(memory_format=torch.channels_last):
            crops = crops.contiguous(memory_format=torch.channels_last)
        probs = model(crops).float().softmax(dim=1)
        probs = probs.view(len(chunk), n, *probs.shape[1:])
        if total is None:
            total = probs.new_zeros(n, probs.shape[2], height, width)
            count = probs.new_zeros(1, 1, height, width)
        for (top, left), prob in zip(chunk, probs, strict=True):
            total[:, :, top : top + tile, left : left + tile] += prob
            count[:, :, top : top + tile, left : left + tile] += 1
    return total / count


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = len(TRAIN_CLASSES)) -> torch.Tensor:
    """num_classes x num_classes int64 counts (rows: true class, columns: predicted) on the inputs' device; pixels
    labelled 255 are skipped.

    Without a host sync, so that a GPU evaluation never waits on one: no boolean indexing (its size is read back)
    and no `torch.bincount` (a GPU one reads its input's min and max back); ignored pixels go to an extra bin.
    """
    index = torch.where(target == IGNORE, num_classes**2, target.long() * num_classes + pred.long()).flatten()
    counts = torch.zeros(num_classes**2 + 1, dtype=torch.long, device=index.device)
    counts.index_add_(0, index, torch.ones_like(index))
    return counts[:-1].view(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """IoU = diag / (row + col - diag) per class; NaN for a class neither present nor predicted."""
    confusion = confusion.double()
    diag = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - diag
    return torch.where(union > 0, diag / union.clamp(min=1), torch.full_like(diag, math.nan))


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean IoU in percent over the classes that are not NaN (the thesis' and NVIDIA's mIoU)."""
    iou = iou_per_class(confusion)
    return 100.0 * iou[~iou.isnan()].mean().item() if (~iou.isnan()).any() else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, preset: SegmentationPreset) -> Evaluation:
    """mIoU (%) in the thesis' three modes from confusion matrices accumulated over the split, plus per-class IoU.

    whole: the full image in one pass. tile: square tiles of `preset.tile_size` (clipped to the image) without
    overlap. tile_overlap: the same tiles with 1/3 overlap. Tile probabilities are averaged where windows meet.

    Reads the whole loader (`tasks.data.sharded_loaders` caps it at `preset.max_batches`). The counts stay on
    `device` until the end. A loader of one worker's `Shard` makes it collective: every worker calls it, the
    confusion matrices (int64, exact) and the loss sum (float64) are summed over the workers, and every worker
    returns the evaluation of the whole split.
    """
    collective = reads_shard(loader)  # checked before the first batch, not after a whole evaluation
    model.eval()
    n = len(TRAIN_CLASSES)
    confusions = torch.zeros(len(EVAL_MODES), n, n, dtype=torch.long, device=device)
    # float64 sum of the per-pixel losses: as near as can be to one order-free sum, whatever the batches and shards
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for images, targets in log_progress(loader, total=len(loader), what="evaluation batches", logger=logger):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        tile = min(preset.tile_size or images.shape[-2], *images.shape[-2:])
        with autocast(device, preset.amp):
            logits = model(images).float()
            predictions = {
                "whole": logits.argmax(1),
                "tile": predict_tiled(model, images, tile, tile).argmax(1),
                "tile_overlap": predict_tiled(model, images, tile, overlap_stride(tile)).argmax(1),
            }
        loss_sum += F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none").double().sum()
        for i, mode in enumerate(EVAL_MODES):
            confusions[i] += confusion_matrix(predictions[mode], targets, n)
    confusions = dict(zip(EVAL_MODES, sum_over_workers(confusions, collective=collective), strict=True))
    loss_sum = sum_over_workers(loss_sum, collective=collective).item()
    scalars = {key: mean_iou(confusions[mode]) for mode, key in EVAL_MODES.items()}
    whole = confusions["whole"]
    pixels = whole.sum().item()  # the labelled pixels, each counted once in every mode's matrix
    scalars["val/pixel_acc"] = 100.0 * whole.diag().sum().item() / max(pixels, 1)
    scalars["val/loss"] = loss_sum / max(pixels, 1)
    per_class = ClassTable(
        "per_class_iou",
        list(TRAIN_CLASSES),
        {f"iou_{mode}": (100.0 * iou_per_class(c)).tolist() for mode, c in confusions.items()},
        ylabel="IoU (%)",
        ylim=(0, 100),
    )
    return Evaluation(scalars, confusion=ConfusionMatrix(whole, list(TRAIN_CLASSES)), tables=[per_class])
