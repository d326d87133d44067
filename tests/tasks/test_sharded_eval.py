"""The segmentation and classification evaluations sharded over workers: each worker's loader reads its contiguous,
unpadded shard of the validation split (the same images for any number of workers under `max_batches`), and gloo
workers that sum their counts score exactly as one process does, an empty shard included; the loop calls the
collective evaluation on every rank.

Exact: the confusion matrices (every mode), the metrics computed from them (mIoU per mode, pixel accuracy, top-1,
per-class IoU) and top-5. Within a tolerance: the mean loss, a float64 sum of per-pixel or per-image losses whose
terms are added in another order when split over workers (a relative error near 1e-16, compared to 1e-12).
Evaluated one image per batch (`eval_batch_size=1`), so that one process and the workers run the model on the same
batches: a convolution's output may change in its last bits with the batch around an image (oneDNN picks its
kernels by batch size), which could flip a prediction at a near tie; summing the counts cannot.
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from orchestrator.config import TrialConfig
from orchestrator.loop import prepare, train
from tasks import Evaluation, Preset, ensure_synthetic, get_task
from tasks.data import Shard, eval_images
from tests.distributed import best_model, one_thread, run_gloo, train_on_gloo

CPU = torch.device("cpu")
# Splits that do not divide evenly over 2 workers, and over 3 workers 2 images (rank 0's shard empty): batches of
# one image, `max_batches` choosing how many of the first images are evaluated; a global batch 3 workers can split.
SPLITS = {
    "segmentation": {"eval_batch_size": 1, "max_batches": 9},  # 9 of the 24 images: shards of 4 and 5
    "classification": {"eval_batch_size": 1, "max_batches": 63},  # 63 of 64, all 4 classes: shards of 31 and 32
}
EMPTY_SHARD = {"batch_size": 12, "eval_batch_size": 1, "max_batches": 2}  # shards of 0, 1 and 1 images
ONE = {"rank": 0, "world_size": 1, "seed": 0, "workers": 0}  # one process: the whole (capped) split


@pytest.fixture(scope="module", params=sorted(SPLITS))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def cache(name: str, tmp_path_factory) -> Path:
    """The folder holding the task's smoke-sized synthetic data, generated before any worker looks for it."""
    folder = tmp_path_factory.mktemp(f"{name}-cache")
    task = get_task(name)
    ensure_synthetic(task, task.presets["smoke"], folder)
    return folder


@pytest.fixture(scope="module")
def model(name: str, cache: Path, tmp_path_factory) -> nn.Module:
    """The smoke model after an epoch of 6 batches: it predicts several classes, some right (an untrained one
    predicts one or two classes, its scores 0 and its confusion matrices all but empty: trivially equal)."""
    folder = tmp_path_factory.mktemp(f"{name}-trained")
    cfg = TrialConfig(
        name, "zero", 0, cache_dir=str(cache), loader_workers=0, overrides={"epochs": 1, "max_batches": 6}
    )
    with one_thread():
        train(cfg, device=CPU, workdir=folder / "0")
    return best_model(cfg, folder).eval()


def _preset(name: str, overrides: dict[str, Any]) -> Preset:
    return get_task(name).presets["smoke"].updated(**overrides)


def _root(name: str, cache: Path) -> Path:
    return ensure_synthetic(get_task(name), get_task(name).presets["smoke"], cache)


def assert_same_scalars(scalars: dict[str, float], expected: dict[str, float]) -> None:
    """Equal (NaN to NaN) but for the loss, equal to rounding (module docstring)."""
    assert set(scalars) == set(expected)
    for key, value in expected.items():
        if key == "val/loss":
            assert scalars[key] == pytest.approx(value, rel=1e-12, abs=0), key
        else:
            assert scalars[key] == value or math.isnan(value) and math.isnan(scalars[key]), key


def assert_same_evaluation(evaluation: Evaluation, expected: Evaluation) -> None:
    """The same scores (`assert_same_scalars`), confusion matrix (int64 counts on the CPU) and per-class tables."""
    assert_same_scalars(evaluation.scalars, expected.scalars)
    assert evaluation.confusion.counts.device == CPU and evaluation.confusion.counts.dtype == torch.int64
    assert torch.equal(evaluation.confusion.counts, expected.confusion.counts)
    assert evaluation.confusion.classes == expected.confusion.classes
    assert [t.name for t in evaluation.tables] == [t.name for t in expected.tables]
    for table, other in zip(evaluation.tables, expected.tables, strict=True):
        assert table.columns.keys() == other.columns.keys()
        for column, values in other.columns.items():
            assert np.array_equal(table.columns[column], values, equal_nan=True), (table.name, column)


def test_shards_are_contiguous_capped_and_the_same_images_for_any_number_of_workers(name, cache):
    task, root = get_task(name), _root(name, cache)
    split = len(task.build_loaders(root, _preset(name, {"max_batches": None}), **ONE)[1].dataset)
    for overrides in (SPLITS[name], EMPTY_SHARD, {}, {"max_batches": None}, {"max_batches": 1}):
        preset = _preset(name, {"batch_size": 12, **overrides})  # a global batch 2 and 3 workers can split
        size = eval_images(split, preset)  # max_batches batches of one process, or the whole split
        _, whole = task.build_loaders(root, preset, **ONE)
        assert len(whole.dataset) == size and list(getattr(whole.dataset, "indices", range(split))) == list(range(size))
        for world_size in (2, 3):
            shards = [
                task.build_loaders(root, preset, rank=rank, world_size=world_size, seed=0, workers=0)[1]
                for rank in range(world_size)
            ]
            assert all(isinstance(loader.dataset, Shard) for loader in shards)
            # in rank order the shards are the same images as one process', each once (no padding), one apart in size
            assert [i for loader in shards for i in loader.dataset.indices] == list(range(size)), (
                overrides,
                world_size,
            )
            lengths = [len(loader.dataset) for loader in shards]
            assert max(lengths) - min(lengths) <= 1
            # no worker reads more than `max_batches` batches of its own (per-worker) size
            assert all(len(loader) <= (preset.max_batches or len(loader)) for loader in shards)


def test_a_shard_evaluated_without_its_process_group_is_refused(name, cache, model):
    """Rank 0's shard alone is not the split: refused before a batch is read, not reported as the whole."""
    task, preset = get_task(name), _preset(name, SPLITS[name])
    _, loader = task.build_loaders(_root(name, cache), preset, rank=0, world_size=2, seed=0, workers=0)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        task.evaluate(model, loader, CPU, preset)


def _evaluate_shard(rank: int, name: str, overrides: dict[str, Any], root: Path, model: nn.Module, folder: Path):
    task, preset = get_task(name), _preset(name, overrides)
    _, loader = task.build_loaders(root, preset, rank=rank, world_size=dist.get_world_size(), seed=0, workers=0)
    evaluation = task.evaluate(model, loader, CPU, preset)
    torch.save({"evaluation": evaluation, "images": len(loader.dataset)}, folder / f"rank{rank}.pt")


@pytest.mark.parametrize("world_size", [2, 3], ids=["2 workers, unequal shards", "3 workers, an empty shard"])
def test_workers_summing_their_counts_score_exactly_as_one_process(name, cache, model, world_size, tmp_path):
    task, root = get_task(name), _root(name, cache)
    overrides = SPLITS[name] if world_size == 2 else EMPTY_SHARD
    preset = _preset(name, overrides)
    _, whole = task.build_loaders(root, preset, **ONE)
    with one_thread():  # as the workers
        expected = task.evaluate(model, whole, CPU, preset)
    run_gloo(_evaluate_shard, name, overrides, root, model, tmp_path, world_size=world_size)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
    sizes = [result["images"] for result in results]
    assert sum(sizes) == len(whole.dataset) and len(set(sizes)) == 2  # unequal shards; over 3 workers [0, 1, 1]
    for result in results:  # every worker gets the scores of the whole split
        assert_same_evaluation(result["evaluation"], expected)
    counts = expected.confusion.counts
    if name == "classification":
        assert counts.sum() == len(whole.dataset)  # every image counted once
    if world_size == 2:  # not trivially equal: several classes predicted, some right, some wrong
        assert (counts.sum(0) > 0).sum() >= 3 and 0 < counts.diag().sum() < counts.sum()


def test_the_loop_evaluates_on_every_rank_as_one_process_evaluates_its_best_model(name, cache, tmp_path):
    """Every rank evaluates its shard with rank 0's model (the loop broadcasts its BatchNorm buffers) and the
    counts are summed: rank 0 records the scores that one process gets from the checkpointed model on the
    same images. Batches of one image (module docstring), 3 of them: shards of 1 and 2."""
    overrides = {"epochs": 1, "max_batches": 3, "eval_batch_size": 1}
    cfg = TrialConfig(name, "zero", 0, cache_dir=str(cache), loader_workers=0, overrides=overrides)
    first, second = train_on_gloo(cfg, tmp_path)
    assert second["history"] == []  # only rank 0 keeps the history
    (epoch,) = first["history"]
    task, preset, root = prepare(cfg)
    _, whole = task.build_loaders(root, preset, **ONE)
    assert len(whole.dataset) == 3
    with one_thread():
        expected = task.evaluate(best_model(cfg, tmp_path), whole, CPU, preset)
    assert_same_scalars({key: epoch[key] for key in expected.scalars}, expected.scalars)
