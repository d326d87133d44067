"""The classification task: ties the ImageNet layout, synthetic stand-in, ResNet, loss and metrics together."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..common import load_pretrained
from ..data import sharded_loaders
from ..evaluation import Evaluation
from ..published import Published
from . import data, metrics, synthetic
from .model import build_model
from .presets import PRESETS, ClassificationPreset
from .published import PUBLISHED


class ClassificationTask:
    """ImageNet-style classification: `ROOT/{train,val}/<wnid>/*.JPEG`, class index = sorted position of the wnid."""

    name: ClassVar[str] = "classification"
    preset_class: ClassVar[type[ClassificationPreset]] = ClassificationPreset
    presets: ClassVar[dict[str, ClassificationPreset]] = PRESETS
    metric: ClassVar[str] = "val/top1"
    # The thesis' (and its sources') numbers the sweep report shows beside this sweep's: docs/published.md.
    published: ClassVar[tuple[Published, ...]] = PUBLISHED
    table_metrics: ClassVar[tuple[str, ...]] = ("val/top1",)
    variants: ClassVar[tuple[str, ...]] = ("zero", "partial", "gated", "edge", "affine")
    layout: ClassVar[str] = data.LAYOUT
    takes_masks: ClassVar[bool] = False
    # Every worker evaluates its shard of the validation split; the counts are summed over them (metrics.evaluate).
    collective_eval: ClassVar[bool] = True

    def check_layout(self, root: Path) -> None:
        """Raise `LayoutError` showing the expected layout unless `root` holds an ImageNet-style tree."""
        data.check_layout(root)

    def write_synthetic(self, root: Path, preset: ClassificationPreset, *, seed: int = 0) -> None:
        """Write the synthetic stand-in, sized by `preset.synthetic`, in the real ImageNet layout."""
        synthetic.write_synthetic(root, preset.synthetic, seed=seed)

    def build_loaders(
        self, root: Path, preset: ClassificationPreset, *, rank: int, world_size: int, seed: int, workers: int
    ) -> tuple[DataLoader, DataLoader]:
        """Train loader sharded over the Ray Train workers (seeded order); this worker's contiguous shard of the
        validation split (one worker: the whole split), capped by `max_batches` (`sharded_loaders`)."""
        train, val = data.build_dataset(root, preset, "train"), data.build_dataset(root, preset, "val")
        common = dict(rank=rank, world_size=world_size, seed=seed, workers=workers)
        return sharded_loaders(train, val, preset, **common, where=f"{root}/train")

    def num_classes(self, root: Path) -> int:
        """The number of class folders under ROOT/train."""
        return len(data.class_folders(root, "train"))

    def build_model(self, preset: ClassificationPreset, *, num_classes: int) -> nn.Module:
        """torchvision's `preset.model`, untrained, with `num_classes` outputs."""
        return build_model(preset, num_classes=num_classes)

    def load_pretrained(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load pretrained weights by name (`--init`): all but the classifier `fc`, which loads only with as many
        classes; returns the names of the tensors not loaded."""
        return load_pretrained(model, state, optional=("fc.",))

    def loss(self, output: torch.Tensor, target: torch.Tensor, preset: ClassificationPreset) -> torch.Tensor:
        """Cross-entropy of the logits."""
        return F.cross_entropy(output, target)

    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device, preset: ClassificationPreset
    ) -> Evaluation:
        """Top-1/top-5 accuracy (%), mean loss and the confusion matrix over the validation loader; with several
        workers collective (`collective_eval`), every one returning the scores of the whole split."""
        return metrics.evaluate(model, loader, device, preset)
