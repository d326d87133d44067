"""What every task provides: presets, real-data layout checks, a synthetic stand-in, model, loss and metrics."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class LayoutError(ValueError):
    """A data root that does not hold the dataset's expected on-disk layout."""


@dataclass(frozen=True)
class Preset:
    """A training recipe. Every field can be overridden per sweep (`--epochs`, `--space lr=...`)."""

    model: str  # torchvision builder name, e.g. "resnet50"
    epochs: int  # full passes over the training split
    batch_size: int  # per Ray Train worker (the thesis' total batch is batch_size x workers)
    lr: float  # peak learning rate
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9  # SGD momentum (Adam: beta1)
    weight_decay: float = 1e-4
    schedule: str = "step"  # step: x gamma every step_size epochs | poly: (1 - t/T)^power | constant
    step_size: int = 30
    gamma: float = 0.1
    poly_power: float = 1.0
    image_size: int = 224  # training crop side in pixels
    eval_size: int = 256  # validation resize before the centre crop (classification)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (synthetic data: keep borders)
    max_batches: int | None = None  # cap on batches per epoch and per evaluation (smoke tests)
    eval_batch_size: int | None = None  # validation batch size (None: batch_size)
    tile_size: int | None = None  # segmentation: side of the square evaluation tiles (None: the image height)
    scale_range: tuple[float, float] = (1.0, 1.0)  # segmentation: random rescaling before the training crop
    sync_bn: bool = False  # synchronized BatchNorm across the Ray Train workers (used on GPUs)
    model_options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the task's model
    synthetic: dict[str, Any] = field(default_factory=dict)  # size of the generated stand-in dataset

    def updated(self, **overrides: Any) -> Preset:
        """A copy with `overrides` applied; unknown keys are an error, not silently ignored."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Unknown preset key(s) {unknown}. Known keys: {', '.join(sorted(known))}.")
        return replace(self, **overrides)


class Task(Protocol):
    """The task interface. Tasks never own the training loop and never import ray or mlflow."""

    name: ClassVar[str]
    presets: ClassVar[dict[str, Preset]]
    variants: ClassVar[tuple[str, ...]]  # conv variants this task supports
    metric: ClassVar[str]  # the headline metric key, e.g. "val/top1" (higher is better)
    table_metrics: ClassVar[tuple[str, ...]]  # per-epoch metrics summarized per run (best, last-5), headline first
    layout: ClassVar[str]  # the expected on-disk layout, shown when a data root does not match

    def check_layout(self, root: Path) -> None: ...
    def write_synthetic(self, root: Path, preset: Preset, *, seed: int = 0) -> None: ...
    def build_loaders(
        self, root: Path, preset: Preset, *, rank: int, world_size: int, seed: int, workers: int
    ) -> tuple[DataLoader, DataLoader]: ...
    def num_classes(self, root: Path) -> int: ...
    def build_model(self, preset: Preset, *, num_classes: int) -> nn.Module: ...
    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor: ...
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, preset: Preset) -> dict: ...


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker seeding from torch's per-worker seed, so augmentation is reproducible."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def sharded_loaders(
    train: Dataset, val: Dataset, preset: Preset, *, rank: int, world_size: int, seed: int, workers: int, where: str
) -> tuple[DataLoader, DataLoader]:
    """Train loader sharded over the Ray Train workers (seeded order, a new one every epoch); the whole validation
    split on every worker. `where` names the training images in the error for a split smaller than one batch."""
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=workers, worker_init_fn=_seed_worker, generator=generator, pin_memory=False)
    train_loader = DataLoader(train, batch_size=preset.batch_size, sampler=sampler, drop_last=True, **common)
    if len(train_loader) == 0:
        raise LayoutError(
            f"{where} holds {len(train)} images, fewer than one batch of {preset.batch_size} per worker "
            f"x {world_size} workers"
        )
    val_loader = DataLoader(val, batch_size=preset.eval_batch_size or preset.batch_size, shuffle=False, **common)
    return train_loader, val_loader


def ensure_synthetic(task: Task, preset: Preset, cache_dir: Path, *, seed: int = 0) -> Path:
    """Generate the task's synthetic dataset once into `cache_dir` and reuse it; safe against concurrent callers.

    Writers take an exclusive file lock, write into a temporary folder and rename it into place, so a reader
    never sees a half-written dataset, and a crash leaves only a temporary folder that the next call removes.
    """
    spec = json.dumps(preset.synthetic, sort_keys=True)
    root = cache_dir / f"{task.name}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}-seed{seed}"
    if (root / ".complete").exists():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").exists():
            partial = root.with_name(root.name + f".partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            task.write_synthetic(partial, preset, seed=seed)
            (partial / ".complete").touch()
            shutil.rmtree(root, ignore_errors=True)
            partial.rename(root)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def default_cache_dir() -> Path:
    """Where synthetic datasets go: $INVALID_PIXELS_CACHE, else ~/.cache/invalid-pixels-bench."""
    return Path(os.environ.get("INVALID_PIXELS_CACHE", Path.home() / ".cache" / "invalid-pixels-bench"))
