"""Classification metrics: top-1/top-5 accuracy, mean loss and the confusion matrix over the validation split.

Under several Ray Train workers each evaluates its shard of the split (`tasks.data.Shard`) and the counts and loss
sums are summed over the workers: every worker gets the scores of the whole split.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..common import autocast, log_progress
from ..data import reads_shard, sum_over_workers, unsharded
from ..evaluation import ConfusionMatrix, Evaluation
from ..preset import Preset

logger = logging.getLogger(__name__)


def class_names(dataset: Dataset) -> list[str]:
    """Readable class names: torchvision's ImageNet gives a tuple of names per wnid (the first is kept),
    ImageFolder the folder names."""
    return [c[0] if isinstance(c, tuple | list) else str(c) for c in dataset.classes]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, preset: Preset) -> Evaluation:
    """Top-1 and top-5 accuracy (%) and mean loss over the loader, plus the confusion matrix.

    Reads the whole loader (`tasks.data.sharded_loaders` caps it at `preset.max_batches`). The counts stay on
    `device` until the end. A loader of one worker's `Shard` makes it collective: every worker calls it, the
    confusion matrix and top-5 hits (int64, exact) and the loss sum (float64) are summed over the workers, and
    every worker returns the evaluation of the whole split.
    """
    collective = reads_shard(loader)  # checked before the first batch, not after a whole evaluation
    model.eval()
    dataset = unsharded(loader.dataset)
    num_classes = len(dataset.classes)
    k = min(5, num_classes)
    # the confusion matrix, flattened, and the top-5 hits last: one tensor, one sum over the workers; top-1 hits are
    # its diagonal and the image count its total
    counts = torch.zeros(num_classes**2 + 1, dtype=torch.long, device=device)
    # float64 sum of the per-image losses: as near as can be to one order-free sum, whatever the batches and shards
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for images, targets in log_progress(loader, total=len(loader), what="evaluation batches", logger=logger):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, preset.amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="none").double().sum()
        top = logits.topk(k, dim=1).indices
        # index_add_, not torch.bincount: a GPU bincount reads its input's min and max back to the host
        index = targets.long() * num_classes + top[:, 0]
        counts[:-1].index_add_(0, index, torch.ones_like(index))
        counts[-1] += (top == targets[:, None]).any(dim=1).sum()
    counts = sum_over_workers(counts, collective=collective)
    loss_sum = sum_over_workers(loss_sum, collective=collective).item()
    confusion = counts[:-1].view(num_classes, num_classes)
    total = max(confusion.sum().item(), 1)
    scalars = {
        "val/top1": 100.0 * confusion.diag().sum().item() / total,
        "val/top5": 100.0 * counts[-1].item() / total,
        "val/loss": loss_sum / total,
    }
    return Evaluation(scalars, confusion=ConfusionMatrix(confusion, class_names(dataset)))
