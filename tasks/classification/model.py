"""The classification model: any torchvision classifier by name, trained from scratch."""

from __future__ import annotations

import torchvision
from torch import nn

from .presets import ClassificationPreset


def build_model(preset: ClassificationPreset, *, num_classes: int) -> nn.Module:
    """torchvision's `preset.model` (e.g. resnet50) without pretrained weights, with `num_classes` outputs."""
    try:
        builder = getattr(torchvision.models, preset.model)
    except AttributeError:
        raise ValueError(f"Unknown torchvision model {preset.model!r} in the preset") from None
    return builder(weights=None, num_classes=num_classes)
