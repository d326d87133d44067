"""Tasks: each supplies its data (real layout + synthetic stand-in), model, loss, metrics and presets.

One package per task with the same files (`data`, `synthetic`, `model`, `metrics`, `presets`, `task`); what several
tasks share lives here: the interface (`base`), presets (`preset`), evaluation results (`evaluation`), loaders and the
synthetic cache (`data`), and ImageNet normalisation, autocast and scene drawing (`common`).
"""

from .base import Task
from .classification import ClassificationPreset, ClassificationTask
from .common import IMAGENET_MEAN, IMAGENET_STD, autocast
from .data import LayoutError, default_cache_dir, ensure_synthetic, sharded_loaders
from .evaluation import ClassTable, ConfusionMatrix, Evaluation
from .hotels import HotelsPreset, HotelsTask
from .preset import Preset, PresetError
from .segmentation import SegmentationPreset, SegmentationTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "segmentation": SegmentationTask,
    "hotels": HotelsTask,
}


def get_task(name: str) -> Task:
    """An instance of the task registered under `name`."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(sorted(TASKS))}.") from None


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
