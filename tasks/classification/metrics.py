"""Classification metrics: top-1/top-5 accuracy, mean loss and the confusion matrix over the validation split."""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..common import autocast, log_progress
from ..evaluation import ConfusionMatrix, Evaluation
from ..preset import Preset

logger = logging.getLogger(__name__)


def class_names(dataset: Dataset) -> list[str]:
    """Readable class names: torchvision's ImageNet gives a tuple of names per wnid (the first is kept),
    ImageFolder the folder names."""
    return [c[0] if isinstance(c, tuple | list) else str(c) for c in dataset.classes]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, preset: Preset) -> Evaluation:
    """Top-1 and top-5 accuracy (%) and mean loss over the loader, plus the confusion matrix."""
    model.eval()
    num_classes = len(loader.dataset.classes)
    k = min(5, num_classes)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    batches = itertools.islice(loader, preset.max_batches)
    count = min(len(loader), preset.max_batches or len(loader))
    for images, targets in log_progress(batches, total=count, what="evaluation batches", logger=logger):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, preset.amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(dim=1).sum().item()
        total += targets.numel()
        confusion += torch.bincount((targets * num_classes + top[:, 0]).cpu(), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    scalars = {
        "val/top1": 100.0 * correct1 / max(total, 1),
        "val/top5": 100.0 * correct5 / max(total, 1),
        "val/loss": loss_sum / max(total, 1),
    }
    return Evaluation(scalars, confusion=ConfusionMatrix(confusion, class_names(loader.dataset)))
