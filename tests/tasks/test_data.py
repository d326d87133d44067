"""Shared data plumbing: the synthetic stand-in is generated once, atomically, and a split too small is reported."""

import logging

import pytest
from torch.utils.data import DataLoader

import tasks
from tasks import LayoutError, PresetError, ensure_synthetic, get_task
from tasks.data import shard


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
