"""Shared data plumbing: the synthetic stand-in is generated once, atomically, and a split too small is reported."""

import logging
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import tasks
from orchestrator import loop
from tasks import LayoutError, PresetError, ensure_synthetic, get_task
from tasks.data import (
    MAX_WORKERS_PER_GPU,
    PREFETCH_FACTOR,
    EpochKeys,
    SeededItems,
    loader_options,
    loader_workers_per_gpu,
    shard,
    unsharded,
)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_generation_is_cached_and_survives_a_crash(name, tmp_path, caplog):
    task = get_task(name)
    preset = task.presets["smoke"]
    with caplog.at_level(logging.INFO, logger="tasks"):
        first = ensure_synthetic(task, preset, tmp_path)
    progress = [r.getMessage() for r in caplog.records]
    assert any("writing the synthetic" in m for m in progress) and any(" ready in " in m for m in progress)
    assert len(progress) >= 3  # the start, at least one progress line from the task's generator, the end
    stamp = (first / ".complete").stat().st_mtime_ns
    assert ensure_synthetic(task, preset, tmp_path) == first
    assert (first / ".complete").stat().st_mtime_ns == stamp
    (first / ".complete").unlink()  # as if a writer had died before finishing
    assert ensure_synthetic(task, preset, tmp_path) == first and (first / ".complete").exists()


def test_a_split_smaller_than_one_batch_says_so(tmp_path):
    task = get_task("classification")
    preset = task.presets["smoke"]
    root = ensure_synthetic(task, preset, tmp_path)
    # 200 global over 2 workers: 100 each, but each worker's shard holds 64 of the 128 images
    with pytest.raises(LayoutError, match=r"train holds 128 images, fewer than one batch of 100 per worker x 2"):
        task.build_loaders(root, preset.updated(batch_size=200), rank=0, world_size=2, seed=0, workers=0)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_the_batch_size_is_global_and_split_across_workers(name, tmp_path):
    """The thesis' batches are global (ImageNet 64; Cityscapes 16 = 8 GPUs x 2): each worker loads its share."""
    task = get_task(name)
    preset = task.presets["smoke"]
    root = ensure_synthetic(task, preset, tmp_path)
    for world_size in (1, 2):
        for rank in range(world_size):
            train, val = task.build_loaders(root, preset, rank=rank, world_size=world_size, seed=0, workers=0)
            assert len(next(iter(train))[1]) == preset.batch_size // world_size  # one target per image
            evaluation = val if isinstance(val, DataLoader) else val.gallery  # hotels: gallery and test sets
            assert evaluation.batch_size == (preset.eval_batch_size or preset.batch_size // world_size)
    message = rf"batch_size={preset.batch_size} is the global batch .* does not split evenly across 3 workers; set"
    with pytest.raises(PresetError, match=message):
        task.build_loaders(root, preset, rank=0, world_size=3, seed=0, workers=0)


def test_shards_are_contiguous_in_order_and_one_apart():
    for size in (0, 1, 5, 185):
        for world_size in (1, 2, 3, 8):
            shards = [shard(size, rank, world_size) for rank in range(world_size)]
            assert [i for s in shards for i in s] == list(range(size))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        shard(10, 2, 2)


def test_loader_workers_per_gpu_leaves_a_core_per_gpu_and_one_for_the_node():
    assert loader_workers_per_gpu(16, 1) == 14
    assert loader_workers_per_gpu(32, 4) == 6  # 32 - 4 - 1 = 27 cores shared by 4 GPUs
    assert loader_workers_per_gpu(96, 8) == 10
    assert loader_workers_per_gpu(128, 8) == 14
    for cpus in range(1, 300):
        for gpus in (1, 2, 4, 8):
            workers = loader_workers_per_gpu(cpus, gpus)
            assert 1 <= workers <= MAX_WORKERS_PER_GPU
            if workers > 1:  # the training processes, the node and every GPU's workers fit in the cores
                assert gpus * (workers + 1) + 1 <= cpus


def test_loader_workers_per_gpu_is_capped_and_never_zero():
    assert loader_workers_per_gpu(256, 1) == MAX_WORKERS_PER_GPU == 16
    assert loader_workers_per_gpu(256, 1, cap=4) == 4
    assert loader_workers_per_gpu(2, 1) == loader_workers_per_gpu(1, 1) == loader_workers_per_gpu(8, 8) == 1
    for bad in ((0, 1), (8, 0), (-1, 2)):
        with pytest.raises(ValueError, match="at least 1 cpu, gpu and cap"):
            loader_workers_per_gpu(*bad)
    with pytest.raises(ValueError, match="cap=0"):
        loader_workers_per_gpu(8, 1, cap=0)


def test_loader_options_pin_on_cuda_and_keep_workers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader_options(0)["pin_memory"] is False and "persistent_workers" not in loader_options(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    options = loader_options(3)
    assert options["pin_memory"] is True and options["num_workers"] == 3
    assert options["persistent_workers"] is True and options["prefetch_factor"] == PREFETCH_FACTOR
    assert loader_options(3, persistent=False)["persistent_workers"] is False


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_the_task_loaders_take_the_shared_options(name, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pinning is decided when the loader is built
    monkeypatch.setenv("INVALID_PIXELS_CACHE", str(tmp_path / "cache"))
    task = get_task(name)
    preset = task.presets["smoke"]
    root = ensure_synthetic(task, preset, tmp_path)
    train, val = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=2)
    evaluation = [val] if isinstance(val, DataLoader) else [val.gallery, *val.queries.values()]
    for loader in [train, *evaluation]:
        assert loader.pin_memory and loader.num_workers == 2 and loader.prefetch_factor == PREFETCH_FACTOR
    assert train.persistent_workers
    # hotels: five evaluation loaders, whose idle workers would outnumber the training loader's
    assert all(loader.persistent_workers == (name != "hotels") for loader in evaluation)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_training_items_are_drawn_by_seed_epoch_and_index_whatever_the_workers(name, tmp_path):
    """A training item's random crop, flip (hotels: the pasted occluder) come from (seed, epoch, index) alone: the
    same batches with 0 and 2 loader workers, and a new draw each epoch; so a resumed trial's new worker
    processes draw what the uninterrupted trial's did (tests/orchestrator/test_loop.py)."""
    task = get_task(name)
    preset = task.presets["smoke"]
    root = ensure_synthetic(task, preset, tmp_path)

    def first_batches(workers: int, epoch: int) -> list:
        train, _ = task.build_loaders(root, preset, rank=0, world_size=1, seed=7, workers=workers)
        loop.set_epoch(train, epoch)
        batches = []
        for inputs, _ in train:
            batches.append(inputs[0] if isinstance(inputs, list | tuple) else inputs)  # hotels: (images, masks)
            if len(batches) == 2:
                return batches

    alone, pooled = first_batches(0, 1), first_batches(2, 1)
    assert all(torch.equal(a, b) for a, b in zip(alone, pooled, strict=True))
    train, _ = task.build_loaders(root, preset, rank=0, world_size=1, seed=7, workers=0)
    items = train.dataset
    assert isinstance(items, SeededItems) and unsharded(items) is items.dataset

    def image(item):
        return item[0][0] if isinstance(item[0], list | tuple) else item[0]  # hotels: ((image, mask), target)

    assert torch.equal(image(items[(3, 5)]), image(items[(3, 5)]))
    # The next epoch draws anew, and so does another seed (some draws are coin flips: among 8 items, some differ).
    other_seed = SeededItems(items.dataset, 8)
    assert any(not torch.equal(image(items[(3, i)]), image(items[(4, i)])) for i in range(8))
    assert any(not torch.equal(image(items[(3, i)]), image(other_seed[(3, i)])) for i in range(8))


def test_seeded_items_leave_the_training_process_rng_alone_and_refuse_bare_indices():
    """Read in the training process (no loader workers), an item's seeding must not reset the loop's own draws."""

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return torch.rand(()).item(), random.random(), np.random.rand()

    items = SeededItems(Draws(), seed=1)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = torch.rand(()).item(), random.random(), np.random.rand()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    first = items[(0, 2)]
    assert (torch.rand(()).item(), random.random(), np.random.rand()) == expected
    assert items[(0, 2)] == first and items[(1, 2)] != first and items[(0, 3)] != first
    with pytest.raises(TypeError, match=r"SeededItems takes \(epoch, index\) keys, as EpochKeys gives them; got 2"):
        items[2]


def test_epoch_keys_tag_indices_and_batches_with_the_epoch():
    sampler = torch.utils.data.DistributedSampler(range(8), num_replicas=2, rank=1, shuffle=True, seed=0)
    keys = EpochKeys(sampler)
    keys.set_epoch(3)
    assert sampler.epoch == 3 and len(keys) == 4
    assert list(keys) == [(3, i) for i in sampler]
    batches = EpochKeys([[1, 2], np.array([3, 4])])
    assert list(batches) == [[(0, 1), (0, 2)], [(0, 3), (0, 4)]]
