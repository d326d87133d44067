"""The task interface: what every task gives the shared training loop, which it never owns."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from .evaluation import Evaluation
from .preset import Preset


class Task(Protocol):
    """A task: presets, real-data layout check, synthetic stand-in, loaders, model, loss and evaluation.

    Optional: `data_report(root, preset) -> {artifact path: text}`, what the task's data preparation found
    (hotels: the cleaning counts and the skipped images), logged once to the sweep's run; `closing_tables`
    (title -> ((column header, table metric), ...)), tables in the thesis' layout (hotels: occlusion level x k)
    that the sweep closes with instead of the one wide comparison; `collective_eval: ClassVar[bool]` (False when
    absent), True for an evaluation that every Ray Train worker takes part in: the loop then calls `evaluate` on
    every rank, at the same epochs, with the evaluation loaders `build_loaders` gave that rank (its contiguous
    shard: classification and segmentation sum their counts over the workers with one all-reduce, hotels gathers
    the embeddings of each shard to rank 0); only rank 0's result is used.

    Optional too: `published: ClassVar[tuple[tasks.published.Published, ...]]` (empty when absent), the numbers the
    thesis and its sources printed for this task, each row keyed like the sweep report's columns (`best/top1`,
    `last5/top1`, `best/test_low/chain_top3`: `best/` or `last5/` and the table metric without `val/`, a blank
    of the source an absent key) and naming the arm of this project it corresponds to; the report sets them,
    labelled with their source and data, beside its own tables. They live in the task's `published.py` and are
    restated with their sources in docs/published.md, which a test keeps equal to them. Two more shape the
    report's plots: `report_class_table` ((table name, column): the per-class table of `Evaluation.tables` whose
    column the report averages per arm, segmentation's IoU per class on whole images) and `report_series`
    (title -> (x labels, {series: one table metric per x}): line plots of each arm over the x labels, hotels'
    top-k against the occlusion level).

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
    # True: a batch is `((images, masks), targets)` and the model the task gets is called `model(images, masks)`;
    # the loop passes the masks to mask-aware layers (convs.Masked) and drops them for zero and edge.
    takes_masks: ClassVar[bool]

    def check_layout(self, root: Path) -> None:
        """Raise `LayoutError`, showing `layout`, unless `root` holds the real dataset's on-disk layout."""

    def write_synthetic(self, root: Path, preset: Preset, *, seed: int = 0) -> None:
        """Write a small stand-in dataset in the real layout, sized by `preset.synthetic`."""

    def build_loaders(
        self, root: Path, preset: Preset, *, rank: int, world_size: int, seed: int, workers: int
    ) -> tuple[DataLoader, Any]:
        """The training loader sharded over `world_size` workers (seeded order), and what `evaluate` reads: the
        validation loader (this worker's shard of the split for a task with `collective_eval`), or the task's own
        bundle of loaders (hotels: the gallery and each test set).

        A training batch is `(inputs, targets)`: `inputs` a tensor, or a tuple the model takes as arguments."""

    def num_classes(self, root: Path) -> int:
        """The number of classes of the dataset at `root`."""

    def build_model(self, preset: Preset, *, num_classes: int) -> nn.Module:
        """An untrained model with plain `nn.Conv2d` layers (the loop converts them to the trial's variant)."""

    def load_pretrained(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load pretrained weights into `model` by name (`--init`): a classifier's, or this task's own, converted
        the same way as `model` or plain; the task's head loads only when its shape matches. Returns the names
        of the tensors not loaded; `ValueError` when a required tensor is missing or of another shape."""

    def loss(self, output: Any, target: torch.Tensor, preset: Preset) -> torch.Tensor:
        """The training loss of a batch's model output (the preset gives its settings, e.g. a triplet margin)."""

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, preset: Preset) -> Evaluation:
        """Evaluate on what `build_loaders` returned second; `metric` among the scalars. Called on rank 0 after
        every `preset.eval_every` epochs and after the last; on every rank then for a task with `collective_eval`."""
