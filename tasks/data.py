"""Data plumbing every task shares: layout errors, the DataLoader settings and the rule for loader workers per GPU,
the sharded loaders and the sums over their evaluation shards, the cached synthetic stand-in."""

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
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .preset import Preset, PresetError

if TYPE_CHECKING:
    from .base import Task

logger = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A data root that does not hold the dataset's expected on-disk layout."""


def seed_worker(worker_id: int) -> None:
    """DataLoader worker seeding from torch's per-worker seed (python's and numpy's RNG too). Training items get
    their own seed besides (`SeededItems`)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item `index`'s random draws in `epoch` of a trial of seed `seed`: a 64-bit value from numpy's
    SeedSequence of the three, so nearby triples give unrelated streams."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0])


class EpochKeys(torch.utils.data.Sampler):
    """A sampler (of indices) or batch sampler (of lists of indices) whose indices come out as (epoch, index) keys
    of a `SeededItems` dataset, `epoch` the one `set_epoch` gave last (forwarded to the wrapped sampler, which
    reshuffles by it)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        for item in self.sampler:
            if isinstance(item, int | np.integer):
                yield (epoch, int(item))
            else:
                yield [(epoch, int(index)) for index in item]

    def __len__(self) -> int:
        return len(self.sampler)


class SeededItems(Dataset):
    """`dataset` read by (epoch, index) keys (`EpochKeys`): item `index` with every random draw of its loading and
    augmentation (torch's, python's and numpy's global RNG) seeded by `item_seed(seed, epoch, index)`.

    So an item's augmentation depends on the trial's seed, the epoch and the item alone: not on the loader worker
    that reads it, nor on the number of workers or of Ray Train workers, nor on what a worker read before. A
    resumed trial draws exactly what the uninterrupted one would have, although its loader workers are new
    processes (persistent workers otherwise carry their RNG state across epochs, which a restart loses: the
    resumed epochs would repeat the first epoch's draws). In the training process itself (a loader without workers)
    the global RNG states are put back after each item, so the loop's own draws (dropout) are untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        try:
            epoch, index = key
        except (TypeError, ValueError):
            raise TypeError(f"SeededItems takes (epoch, index) keys, as EpochKeys gives them; got {key!r}") from None
        # A loader worker is a process of its own, whose RNG only items use; the training process's is put back.
        in_worker = torch.utils.data.get_worker_info() is not None
        states = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        _seed_all(item_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            if states is not None:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def training_loader(dataset: Dataset, seed: int, workers: int, *, sampler=None, batch_sampler=None, **kwargs):
    """The DataLoader of a training set: `sampler` (with `batch_size`, `drop_last` in `kwargs`) or `batch_sampler`
    yields indices, reshuffled by `set_epoch`; every item's random draws are seeded by (seed, epoch, index)
    (`SeededItems`); `loader_options(workers)`."""
    keys = {"sampler": EpochKeys(sampler)} if batch_sampler is None else {"batch_sampler": EpochKeys(batch_sampler)}
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(SeededItems(dataset, seed), generator=generator, **keys, **kwargs, **loader_options(workers))


# Batches each loader worker keeps ready (DataLoader's prefetch_factor; its default is 2). Decoding time varies with
# the file (a JPEG's size, a Cityscapes frame's content) and a training step's time with what the GPU does besides
# (evaluation, logging, DDP's all-reduce): 4 ready batches per worker ride out such bursts. It costs memory: workers x
# 4 batches in shared memory, e.g. 8 workers x 4 x a batch of 64 ImageNet crops (38 MiB) = 1.2 GiB per GPU.
PREFETCH_FACTOR = 4
# More loader workers than this per GPU buy nothing but memory: at ~600 ImageNet training images/s per worker
# (docs/data_loading.md) 16 workers feed ~10,000 images/s, three times what ResNet50 trains on one current GPU.
MAX_WORKERS_PER_GPU = 16


def loader_workers_per_gpu(cpus: int, gpus: int, *, cap: int = MAX_WORKERS_PER_GPU) -> int:
    """How many DataLoader worker processes each GPU's training process should start on a node of `cpus` cores
    and `gpus` GPUs (one training process per GPU, as Ray Train runs them): the `workers` of `build_loaders`.

    The rule: every training process keeps a core for itself (its Python step loop, the pin-memory thread, NCCL's
    threads) and the node keeps one more (Ray's raylet, the driver, logging); the cores left are shared equally
    among the GPUs, rounded down, and capped at `cap` (`MAX_WORKERS_PER_GPU`). At least 1 whatever the cores: a
    worker process overlaps decoding with the GPU's step, where workers=0 would decode in the training loop itself
    and stall the GPU for every batch.

    E.g. 16 cores, 1 GPU -> 14; 32 cores, 4 GPUs -> 6; 96 cores, 8 GPUs -> 10; 128 cores, 8 GPUs -> 14;
    2 cores, 1 GPU -> 1. Whether that feeds a GPU: `python -m benchmarks.data` prints the workers one GPU needs for
    a target images/s, from the measured images/s per core (docs/data_loading.md).

    Raises:
        ValueError: `cpus` or `gpus` or `cap` below 1.
    """
    if cpus < 1 or gpus < 1 or cap < 1:
        raise ValueError(
            f"loader_workers_per_gpu needs at least 1 cpu, gpu and cap (cpus={cpus}, gpus={gpus}, cap={cap})"
        )
    spare = cpus - gpus - 1  # one core per training process, one for the node
    return max(1, min(cap, spare // gpus))


def loader_options(workers: int, *, persistent: bool = True) -> dict:
    """The DataLoader keyword arguments every task's loaders share: `workers` worker processes seeded by
    `seed_worker`; pinned (page-locked) batches when CUDA is available, so the host-to-GPU copy can run
    asynchronously (`.to(device, non_blocking=True)`) and faster; with workers, `PREFETCH_FACTOR` batches ready per
    worker and, when `persistent`, workers kept alive across epochs (no restart, no refilling of the prefetch queue
    at each epoch's start; their RNG state carries on, so each epoch still draws new augmentations)."""
    options: dict = dict(num_workers=workers, worker_init_fn=seed_worker, pin_memory=torch.cuda.is_available())
    if workers > 0:
        options.update(persistent_workers=persistent, prefetch_factor=PREFETCH_FACTOR)
    return options


def per_worker_batch(preset: Preset, world_size: int) -> int:
    """`preset.batch_size` (the global batch) split over `world_size` workers; PresetError when it does not divide."""
    if preset.batch_size % world_size:
        raise PresetError(
            f"batch_size={preset.batch_size} is the global batch of all Ray Train workers and does not split "
            f"evenly across {world_size} workers; set batch_size to a multiple of {world_size} or run a number of "
            f"workers per trial that divides {preset.batch_size}"
        )
    return preset.batch_size // world_size


def shard(size: int, rank: int, world_size: int) -> range:
    """The indices of worker `rank`'s contiguous shard of `size` items split over `world_size` workers: the shards
    differ in length by at most one (some are empty when `size` < `world_size`), and in rank order they make
    `range(size)`: every item is evaluated once, none twice (DistributedSampler pads with repeated items)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size} workers")
    return range(size * rank // world_size, size * (rank + 1) // world_size)


class Shard(Subset):
    """Worker `rank`'s contiguous `shard` of the first `size` items of `dataset`, split over `world_size` workers:
    what one worker of a collective evaluation reads; `sum_over_workers` adds up what each shard counted."""

    def __init__(self, dataset: Dataset, size: int, *, rank: int, world_size: int) -> None:
        super().__init__(dataset, shard(size, rank, world_size))
        self.rank, self.world_size = rank, world_size


def eval_images(size: int, preset: Preset) -> int:
    """How many of a validation split's `size` images an evaluation reads: all, or with `preset.max_batches` the
    first images of that many batches of one process (of `eval_batch_size`, else of the global `batch_size`),
    whatever the number of workers: so 1 and N workers evaluate the same images, the N sharing them."""
    if preset.max_batches is None:
        return size
    return min(size, preset.max_batches * (preset.eval_batch_size or preset.batch_size))


def sharded_loaders(
    train: Dataset, val: Dataset, preset: Preset, *, rank: int, world_size: int, seed: int, workers: int, where: str
) -> tuple[DataLoader, DataLoader]:
    """Train loader sharded over the Ray Train workers (seeded order, a new one every epoch); this worker's `Shard`
    of the validation split, in order, for an evaluation every worker takes part in (`collective_eval`: the counts
    are summed with `sum_over_workers`). `where` names the training images in the error for a split smaller than
    one batch.

    `preset.batch_size` is the global batch, as the thesis gives it: each of the `world_size` workers loads
    `batch_size // world_size` images per step, and a batch that does not split evenly is refused (PresetError).
    The validation batch is `preset.eval_batch_size`, else the per-worker training batch. `preset.max_batches`
    caps the validation split at `eval_images` before it is sharded, so no worker reads more than `max_batches`
    batches and 1 and N workers evaluate the same images. One worker reads the whole (capped) split.
    Both loaders take `loader_options(workers)`: pinned memory on CUDA machines, persistent workers.
    """
    per_worker = per_worker_batch(preset, world_size)
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    train_loader = training_loader(train, seed, workers, sampler=sampler, batch_size=per_worker, drop_last=True)
    if len(train_loader) == 0:
        raise LayoutError(
            f"{where} holds {len(train)} images, fewer than one batch of {per_worker} per worker x {world_size} "
            f"workers (global batch_size={preset.batch_size})"
        )
    size = eval_images(len(val), preset)
    if world_size > 1 or size < len(val):
        val = Shard(val, size, rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(seed)  # the workers' base seed, not drawn from the global RNG
    val_loader = DataLoader(
        val,
        batch_size=preset.eval_batch_size or per_worker,
        shuffle=False,
        generator=generator,
        **loader_options(workers),
    )
    return train_loader, val_loader


def unsharded(dataset: Dataset) -> Dataset:
    """The dataset a `Shard` (or any Subset) was cut from, or a training loader's `SeededItems` read, for what the
    whole split knows (its class names, its files)."""
    return unsharded(dataset.dataset) if isinstance(dataset, Subset | SeededItems) else dataset


def reads_shard(loader: DataLoader) -> bool:
    """Whether `loader` reads one worker's `Shard` of several, whose evaluation is collective (`sum_over_workers`).

    RuntimeError when it is, but torch.distributed's default group is not the one of its shards (not initialised,
    another rank or size): a worker evaluating a shard alone would report a part as the whole, or hang."""
    part = loader.dataset
    if not isinstance(part, Shard) or part.world_size == 1:
        return False
    check_process_group(part.rank, part.world_size, what="a loader")
    return True


def check_process_group(rank: int, world_size: int, *, what: str) -> None:
    """RuntimeError unless torch.distributed's default group is the one of rank `rank` of `world_size`, whose shard
    `what` (loaders) reads: a worker evaluating its shard alone would report a part as the whole, or hang."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} of rank {rank}'s shard of {world_size}: its evaluation combines the workers' shards and needs "
            "their process group (torch.distributed is not initialised)"
        )
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise RuntimeError(
            f"{what} of rank {rank}'s shard of {world_size}, evaluated by rank {dist.get_rank()} of "
            f"{dist.get_world_size()}"
        )


def sum_over_workers(counts: torch.Tensor, *, collective: bool) -> torch.Tensor:
    """`counts` summed over the workers of the default process group when `collective` (`reads_shard`), on the CPU.

    Collective then: every worker calls it, equally often, with tensors of one shape and dtype. The sum is exact
    for integer counts; a float sum depends on the order of its terms (summing float64 keeps that error at
    rounding level). Under NCCL the tensor is reduced on its GPU, under gloo on the CPU; either way an evaluation
    that accumulates on the device reads its counts back to the host here, once, after its last batch.
    """
    if not collective:
        return counts.cpu()
    counts = counts.clone() if dist.get_backend() == dist.Backend.NCCL else counts.cpu().clone()
    dist.all_reduce(counts)
    return counts.cpu()


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
