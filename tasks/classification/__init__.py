"""ImageNet classification (the partial-conv padding paper's recipe): ResNet, top-1/top-5, real ImageNet layout."""

from .data import LAYOUT, build_dataset, build_transform, check_layout
from .metrics import evaluate
from .model import build_model
from .presets import PRESETS, ClassificationPreset
from .synthetic import SYNTHETIC_CLASSES, border_scene, write_synthetic
from .task import ClassificationTask

__all__ = [
    "LAYOUT",
    "PRESETS",
    "SYNTHETIC_CLASSES",
    "ClassificationPreset",
    "ClassificationTask",
    "border_scene",
    "build_dataset",
    "build_model",
    "build_transform",
    "check_layout",
    "evaluate",
    "write_synthetic",
]
