"""The segmentation task: ties the Cityscapes layout, synthetic stand-in, DeepLabV3+, loss and metrics together."""

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
from .model import DeepLabV3Plus
from .presets import PRESETS, SegmentationPreset
from .published import PUBLISHED


class SegmentationTask:
    """Cityscapes-style semantic segmentation with 19 train ids, DeepLabV3+ on a torchvision ResNet."""

    name: ClassVar[str] = "segmentation"
    preset_class: ClassVar[type[SegmentationPreset]] = SegmentationPreset
    presets: ClassVar[dict[str, SegmentationPreset]] = PRESETS
    metric: ClassVar[str] = "val/miou"
    # The thesis' (and its sources') numbers the sweep report shows beside this sweep's: docs/published.md.
    published: ClassVar[tuple[Published, ...]] = PUBLISHED
    table_metrics: ClassVar[tuple[str, ...]] = tuple(metrics.EVAL_MODES.values())
    # The per-class table (and its column) the sweep report averages per arm: IoU per class on whole images.
    report_class_table: ClassVar[tuple[str, str]] = ("per_class_iou", "iou_whole")
    variants: ClassVar[tuple[str, ...]] = ("zero", "partial", "gated", "edge", "affine")
    layout: ClassVar[str] = data.LAYOUT
    takes_masks: ClassVar[bool] = False
    # Every worker evaluates its shard of the validation split; the counts are summed over them (metrics.evaluate).
    collective_eval: ClassVar[bool] = True

    def check_layout(self, root: Path) -> None:
        """Raise `LayoutError` showing the expected layout unless `root` holds Cityscapes' fine train/val folders."""
        data.check_layout(root)

    def write_synthetic(self, root: Path, preset: SegmentationPreset, *, seed: int = 0) -> None:
        """Write the synthetic street scenes, sized by `preset.synthetic`, in the real Cityscapes layout."""
        synthetic.write_synthetic(root, preset.synthetic, seed=seed)

    def build_loaders(
        self, root: Path, preset: SegmentationPreset, *, rank: int, world_size: int, seed: int, workers: int
    ) -> tuple[DataLoader, DataLoader]:
        """Train loader sharded over the Ray Train workers (seeded order); this worker's contiguous shard of the
        validation split at full size (one worker: the whole split), capped by `max_batches` (`sharded_loaders`)."""
        train, val = data.build_dataset(root, preset, "train"), data.build_dataset(root, preset, "val")
        common = dict(rank=rank, world_size=world_size, seed=seed, workers=workers)
        return sharded_loaders(train, val, preset, **common, where=f"{root}/leftImg8bit/train")

    def num_classes(self, root: Path) -> int:
        """Always the 19 Cityscapes train ids."""
        return len(data.TRAIN_CLASSES)

    def build_model(self, preset: SegmentationPreset, *, num_classes: int) -> nn.Module:
        """DeepLabV3+ on the preset's ResNet backbone, with `preset.model_options` (output stride, head widths)."""
        return DeepLabV3Plus(preset.model, num_classes=num_classes, **preset.model_options)

    def load_pretrained(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load pretrained weights by name (`--init`) into the backbone (torchvision's `conv1`/`bn1` are the
        `stem` here); ASPP, decoder and classifier load only from a segmentation model of the same shape. Returns
        the names of the tensors not loaded (an ImageNet classifier's `fc`)."""
        return load_pretrained(
            model,
            state,
            rename={"conv1.": "stem.0.", "bn1.": "stem.1."},
            optional=("aspp.", "low_level.", "decoder.", "classifier."),
        )

    def loss(self, output: torch.Tensor, target: torch.Tensor, preset: SegmentationPreset) -> torch.Tensor:
        """Per-pixel cross-entropy; label 255 is ignored."""
        return F.cross_entropy(output, target, ignore_index=data.IGNORE)

    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device, preset: SegmentationPreset
    ) -> Evaluation:
        """mIoU (%) whole / tiles / overlapping tiles, pixel accuracy, loss, confusion matrix and per-class IoU; with
        several workers collective (`collective_eval`), every one returning the scores of the whole split."""
        return metrics.evaluate(model, loader, device, preset)
