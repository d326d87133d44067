"""What a task's `evaluate` returns: scalar metrics, an optional confusion matrix and per-class tables."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts over a split: `counts[i, j]` = samples (or pixels) of true class i predicted as class j."""

    counts: torch.Tensor  # (C, C) integer tensor on the CPU; rows: true class, columns: predicted class
    classes: list[str]  # the C class names, in index order

    def __post_init__(self) -> None:
        n = len(self.classes)
        if tuple(self.counts.shape) != (n, n):
            raise ValueError(
                f"confusion counts of shape {tuple(self.counts.shape)} for {n} classes; expected ({n}, {n})"
            )


@dataclass(frozen=True)
class ClassTable:
    """One value per class in each column, e.g. per-class IoU per evaluation mode; saved as `<name>.csv` + `.png`."""

    name: str  # artifact stem, e.g. "per_class_iou" -> per_class_iou.csv and per_class_iou.png
    classes: list[str]  # row labels, in class index order
    columns: dict[str, list[float]]  # CSV header -> one value per class (NaN: undefined, e.g. a class never seen)
    ylabel: str = ""  # the bar chart's value axis, e.g. "IoU (%)"
    ylim: tuple[float, float] | None = None  # the value axis' range; None: matplotlib's choice
    digits: int = 3  # decimals written to the CSV

    def __post_init__(self) -> None:
        for column, values in self.columns.items():
            if len(values) != len(self.classes):
                raise ValueError(
                    f"table {self.name!r}: column {column!r} has {len(values)} values for {len(self.classes)} classes"
                )


@dataclass
class Evaluation:
    """One evaluation of a model on the validation split; the loop logs `scalars` per epoch, the rest at the best."""

    scalars: dict[str, float]  # metric key ("val/top1", "val/loss") -> value; the task's headline metric among them
    confusion: ConfusionMatrix | None = None  # over the whole split, in the task's main evaluation mode
    tables: list[ClassTable] = field(default_factory=list)  # per-class breakdowns
