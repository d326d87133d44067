"""Data plumbing every task shares: layout errors, the sharded loaders, the cached synthetic stand-in."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .preset import Preset, PresetError

if TYPE_CHECKING:
    from .base import Task

logger = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A data root that does not hold the dataset's expected on-disk layout."""


def seed_worker(worker_id: int) -> None:
    """DataLoader worker seeding from torch's per-worker seed, so augmentation is reproducible."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def per_worker_batch(preset: Preset, world_size: int) -> int:
    """`preset.batch_size` (the global batch) split over `world_size` workers; PresetError when it does not divide."""
    if preset.batch_size % world_size:
        raise PresetError(
            f"batch_size={preset.batch_size} is the global batch of all Ray Train workers and does not split "
            f"evenly across {world_size} workers; set batch_size to a multiple of {world_size} or run a number of "
            f"workers per trial that divides {preset.batch_size}"
        )
    return preset.batch_size // world_size


def sharded_loaders(
    train: Dataset, val: Dataset, preset: Preset, *, rank: int, world_size: int, seed: int, workers: int, where: str
) -> tuple[DataLoader, DataLoader]:
    """Train loader sharded over the Ray Train workers (seeded order, a new one every epoch); the whole validation
    split on every worker. `where` names the training images in the error for a split smaller than one batch.

    `preset.batch_size` is the global batch, as the thesis gives it: each of the `world_size` workers loads
    `batch_size // world_size` images per step, and a batch that does not split evenly is refused (PresetError).
    The validation batch is `preset.eval_batch_size`, else the per-worker training batch (rank 0 evaluates alone).
    """
    per_worker = per_worker_batch(preset, world_size)
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=workers, worker_init_fn=seed_worker, generator=generator, pin_memory=False)
    train_loader = DataLoader(train, batch_size=per_worker, sampler=sampler, drop_last=True, **common)
    if len(train_loader) == 0:
        raise LayoutError(
            f"{where} holds {len(train)} images, fewer than one batch of {per_worker} per worker x {world_size} "
            f"workers (global batch_size={preset.batch_size})"
        )
    val_loader = DataLoader(val, batch_size=preset.eval_batch_size or per_worker, shuffle=False, **common)
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
            started = time.perf_counter()
            logger.info("writing the synthetic %s dataset (seed %d) to %s", task.name, seed, root)
            partial = root.with_name(root.name + f".partial-{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            task.write_synthetic(partial, preset, seed=seed)
            (partial / ".complete").touch()
            shutil.rmtree(root, ignore_errors=True)
            partial.rename(root)
            logger.info("synthetic %s dataset ready in %.1f s: %s", task.name, time.perf_counter() - started, root)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def default_cache_dir() -> Path:
    """Where synthetic datasets go: $INVALID_PIXELS_CACHE, else ~/.cache/invalid-pixels-bench."""
    return Path(os.environ.get("INVALID_PIXELS_CACHE", Path.home() / ".cache" / "invalid-pixels-bench"))
