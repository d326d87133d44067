"""Tasks: each supplies its data (real layout + synthetic stand-in), model, loss, metrics and presets.

One package per task with the same files (`data`, `synthetic`, `model`, `metrics`, `presets`, `task`); what several
tasks share lives here: the interface (`base`), presets (`preset`), evaluation results (`evaluation`), loaders and the
synthetic cache (`data`), and ImageNet normalisation, autocast and scene drawing (`common`).
"""

import importlib
from typing import Any

from .base import Task
from .common import IMAGENET_MEAN, IMAGENET_STD, autocast
from .data import LayoutError, default_cache_dir, ensure_synthetic, sharded_loaders
from .evaluation import ClassTable, ConfusionMatrix, Evaluation
from .preset import Preset, PresetError

# name: (its package, its Task class). Imported on first use: a Ray Train worker of a classification trial never pays
# for the hotels task's imports (pytorch-metric-learning, scipy, faiss), and every worker process of every trial
# starts afresh.
TASKS: dict[str, tuple[str, str]] = {
    "classification": ("tasks.classification", "ClassificationTask"),
    "segmentation": ("tasks.segmentation", "SegmentationTask"),
    "hotels": ("tasks.hotels", "HotelsTask"),
}
_LAZY = {  # what `from tasks import X` finds in a task's package: X -> the task
    "ClassificationTask": "classification",
    "ClassificationPreset": "classification",
    "SegmentationTask": "segmentation",
    "SegmentationPreset": "segmentation",
    "HotelsTask": "hotels",
    "HotelsPreset": "hotels",
}


def get_task(name: str) -> Task:
    """An instance of the task registered under `name` (its package imported now, if it was not yet)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(sorted(TASKS))}.")
    package, cls = TASKS[name]
    return getattr(importlib.import_module(package), cls)()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(TASKS[_LAZY[name]][0]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TASKS",
    "ClassTable",
    "ClassificationPreset",
    "ClassificationTask",
    "ConfusionMatrix",
    "Evaluation",
    "HotelsPreset",
    "HotelsTask",
    "LayoutError",
    "Preset",
    "PresetError",
    "SegmentationPreset",
    "SegmentationTask",
    "Task",
    "autocast",
    "default_cache_dir",
    "ensure_synthetic",
    "get_task",
    "sharded_loaders",
]
