"""The task interface: what every task gives the shared training loop, which it never owns."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from .evaluation import Evaluation
from .preset import Preset


class Task(Protocol):
    """A task: presets, real-data layout check, synthetic stand-in, loaders, model, loss and evaluation.

    Tasks never import ray, mlflow or the orchestrator. Each lives in its own package with the same files
    (`data`, `synthetic`, `model`, `metrics`, `presets`, `task`), so a new task starts as a copy of a folder.
    """

    name: ClassVar[str]
    preset_class: ClassVar[type[Preset]]  # the task's Preset subclass; `dataclasses.fields` lists its keys
    presets: ClassVar[dict[str, Preset]]
    variants: ClassVar[tuple[str, ...]]  # conv variants this task supports
    metric: ClassVar[str]  # the headline metric key, e.g. "val/top1" (higher is better)
    table_metrics: ClassVar[tuple[str, ...]]  # summarized per run at the headline's best epoch and last-5; headline 1st
    layout: ClassVar[str]  # the expected on-disk layout, shown when a data root does not match

    def check_layout(self, root: Path) -> None:
        """Raise `LayoutError`, showing `layout`, unless `root` holds the real dataset's on-disk layout."""

    def write_synthetic(self, root: Path, preset: Preset, *, seed: int = 0) -> None:
        """Write a small stand-in dataset in the real layout, sized by `preset.synthetic`."""

    def build_loaders(
        self, root: Path, preset: Preset, *, rank: int, world_size: int, seed: int, workers: int
    ) -> tuple[DataLoader, DataLoader]:
        """The training loader sharded over `world_size` workers (seeded order) and the whole validation loader."""

    def num_classes(self, root: Path) -> int:
        """The number of classes of the dataset at `root`."""

    def build_model(self, preset: Preset, *, num_classes: int) -> nn.Module:
        """An untrained model with plain `nn.Conv2d` layers (the loop converts them to the trial's variant)."""

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch's model output."""

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, preset: Preset) -> Evaluation:
        """Evaluate on the validation loader (at most `preset.max_batches` batches); `metric` among the scalars."""
