"""Tasks: each supplies its data (real layout + synthetic stand-in), model, loss, metrics and presets."""

from .base import LayoutError, Preset, Task, default_cache_dir, ensure_synthetic
from .classification import ClassificationTask
from .segmentation import SegmentationTask

TASKS: dict[str, type] = {"classification": ClassificationTask, "segmentation": SegmentationTask}


def get_task(name: str) -> Task:
    """An instance of the task registered under `name`."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(sorted(TASKS))}.") from None


__all__ = ["TASKS", "LayoutError", "Preset", "Task", "default_cache_dir", "ensure_synthetic", "get_task"]
