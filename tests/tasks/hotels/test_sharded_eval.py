"""The hotels evaluation sharded over workers: each worker's loaders read its contiguous shard of the gallery and
test sets, two gloo workers gather their shards of unequal length and score exactly as one process does, and the
loop calls the collective evaluation on every rank."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestrator.config import TrialConfig
from orchestrator.loop import MaskInput, broadcast_buffers, train, variant_options
from orchestrator.weights import initialize, parse_init
from tasks import ensure_synthetic, get_task
from tasks.hotels.metrics import gather_shards
from tests.distributed import run_gloo


@pytest.fixture(scope="module")
def task():
    return get_task("hotels")


class TinyEmbedder(nn.Module):
    """(images, masks) -> L2-normalised embeddings of the masked images: a strided conv and a pooled linear layer,
    random but seeded, so that every process builds the same model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 16, 5, stride=4)
        self.linear = nn.Linear(16 * 4, 8)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        features = F.adaptive_avg_pool2d(F.relu(self.conv(torch.cat([images * masks, masks], 1))), 2)
        return F.normalize(self.linear(features.flatten(1)), dim=1)


def test_each_worker_loads_its_shard_of_the_gallery_and_test_sets(task, root, preset):
    _, whole = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    assert (whole.rank, whole.world_size) == (0, 1)
    halves = [task.build_loaders(root, preset, rank=r, world_size=2, seed=0, workers=0)[1] for r in (0, 1)]
    assert [(h.rank, h.world_size) for h in halves] == [(0, 2), (1, 2)]
    pairs = [(whole.gallery, [h.gallery for h in halves])]
    pairs += [(whole.queries[level], [h.queries[level] for h in halves]) for level in whole.queries]
    for full, parts in pairs:
        assert [len(p.dataset) for p in parts] == [len(full.dataset) // 2, len(full.dataset) - len(full.dataset) // 2]
        # each worker reads only its rows (a Subset's indices), and the two shards in rank order are the whole set
        hotels = np.concatenate([p.dataset.dataset.hotel_ids[p.dataset.indices] for p in parts])
        assert np.array_equal(hotels, full.dataset.hotel_ids)
        assert all(p.batch_size == full.batch_size for p in parts)


def _sharded_evaluation(rank: int, root: Path, preset, folder: str) -> None:
    task = get_task("hotels")
    _, loaders = task.build_loaders(root, preset, rank=rank, world_size=2, seed=0, workers=0)
    evaluation = task.evaluate(TinyEmbedder().eval(), loaders, torch.device("cpu"), preset)
    # rows of unequal length, an empty (0, 0) shard and integer rows
    floats = gather_shards(torch.arange(6.0).reshape(3, 2) if rank == 0 else torch.zeros(0, 0), torch.device("cpu"))
    ints = gather_shards(torch.full((rank + 1, 2), rank, dtype=torch.int64), torch.device("cpu"))
    try:
        gather_shards(torch.zeros(2, 3 + rank), torch.device("cpu"))
        mismatch = ""
    except ValueError as error:
        mismatch = str(error)
    torch.save(
        {"scalars": evaluation.scalars, "floats": floats, "ints": ints, "mismatch": mismatch},
        os.path.join(folder, f"rank{rank}.pt"),
    )


def test_two_gloo_workers_score_exactly_as_one_process(task, root, preset, tmp_path):
    _, whole = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    assert len(whole.gallery.dataset) % 2 == 1  # shards of unequal length
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        expected = task.evaluate(TinyEmbedder().eval(), whole, torch.device("cpu"), preset).scalars
    finally:
        torch.set_num_threads(threads)
    run_gloo(_sharded_evaluation, root, preset, str(tmp_path))
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))
    assert set(first["scalars"]) == set(expected) and second["scalars"] == {}
    for key, value in expected.items():
        assert first["scalars"][key] == value or math.isnan(first["scalars"][key]) and math.isnan(value), key
    assert 0 < expected["test_unoccluded/instance_top1"] < 100  # not trivially equal
    assert expected["test_high/queries"] % 2 == 1
    assert torch.equal(first["floats"], torch.arange(6.0).reshape(3, 2)) and second["floats"] is None
    assert torch.equal(first["ints"], torch.tensor([[0, 0], [1, 1], [1, 1]])) and second["ints"] is None
    assert "widths differ" in first["mismatch"] and "widths differ" in second["mismatch"]


def _train(rank: int, cfg: TrialConfig, folder: Path) -> None:
    out = train(
        cfg, device=torch.device("cpu"), rank=rank, world_size=dist.get_world_size(), workdir=folder / str(rank)
    )
    torch.save(out, folder / f"rank{rank}.pt")


def _buffers(rank: int, folder: Path) -> None:
    norm = nn.BatchNorm1d(3)
    norm.running_mean.fill_(rank + 1.0)
    norm.num_batches_tracked.fill_(rank + 5)
    broadcast_buffers(nn.Sequential(norm))
    torch.save(norm.state_dict(), folder / f"buffers{rank}.pt")


def test_the_loop_evaluates_a_collective_task_on_every_rank_with_rank_0s_model(task, preset, tmp_path):
    """Rank 0's evaluation gathers from rank 1, so it only ends when rank 1 evaluates too (else rank 1 leaves and
    the gather fails); both embed with rank 0's model, the checkpointed one: its scores are that model's."""
    root = ensure_synthetic(task, preset, tmp_path)  # once, before the workers look for it
    cfg = TrialConfig(
        "hotels", "zero", 0, cache_dir=str(tmp_path), loader_workers=0, overrides={"epochs": 1, "max_batches": 1}
    )
    run_gloo(_train, cfg, tmp_path)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))
    assert second["history"] == []  # only rank 0 keeps the history
    (epoch,) = first["history"]
    # a single process scoring the checkpointed model on the whole sets gets the same
    model = task.build_model(preset, num_classes=task.num_classes(root))
    initialize(model, task, cfg.variant, variant_options(cfg, preset), parse_init(cfg.init), None)
    model.load_state_dict(torch.load(tmp_path / "0" / "best.pt", weights_only=False)["model"])
    _, whole = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        expected = task.evaluate(MaskInput(model), whole, torch.device("cpu"), preset).scalars
    finally:
        torch.set_num_threads(threads)
    assert {key: epoch[key] for key in expected} == pytest.approx(expected, nan_ok=True)
    for level, loader in whole.queries.items():  # scored on the whole test sets
        assert epoch[f"test_{level}/queries"] == len(loader.dataset), level
    # the buffers every rank evaluates with are rank 0's
    run_gloo(_buffers, tmp_path)
    for rank in (0, 1):
        buffers = torch.load(tmp_path / f"buffers{rank}.pt")
        assert torch.equal(buffers["running_mean"], torch.ones(3)) and buffers["num_batches_tracked"] == 5
