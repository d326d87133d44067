"""The hotels task as the loop sees it: batches, masks reaching the right layers, evaluation keys, data report."""

import csv
import io
import json
import math

import pytest
import torch

import convs
from orchestrator.loop import MaskInput, forward, to_device
from tasks import get_task
from tasks.hotels import LEVELS, build_model


@pytest.fixture(scope="module")
def task():
    return get_task("hotels")


def test_train_batches_hold_hotels_x_images_split_over_workers(task, root, preset):
    loader, _ = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    (images, masks), hotels = next(iter(loader))
    assert images.shape == (preset.batch_size, 3, preset.image_size, preset.image_size)
    assert masks.shape == (preset.batch_size, 1, preset.image_size, preset.image_size)
    assert sorted(torch.unique(hotels, return_counts=True)[1].tolist()) == [preset.images_per_hotel] * (
        preset.hotels_per_batch
    )
    halves = [task.build_loaders(root, preset, rank=r, world_size=2, seed=0, workers=0)[0] for r in (0, 1)]
    first = [next(iter(half))[1] for half in halves]
    assert [len(f) for f in first] == [preset.batch_size // 2] * 2
    assert sorted(torch.cat(first).tolist()) == sorted(hotels.tolist())  # the two halves make the global batch


@pytest.mark.parametrize(
    "variant,aware", [("zero", False), ("edge", False), ("partial", True), ("gated:start=random", True)]
)
def test_masks_reach_mask_aware_layers_only(task, root, preset, variant, aware):
    torch.manual_seed(0)
    model = build_model(preset)
    convs.convert(model, variant)
    net = MaskInput(model.eval())
    assert net.mask_aware is aware
    x = torch.randn(2, 3, 32, 32)
    holes = torch.ones(2, 1, 32, 32)
    holes[..., 8:24, 8:24] = 0
    with torch.no_grad():
        same = torch.allclose(net(x, holes), net(x, torch.ones_like(holes)), atol=1e-6)
        assert torch.allclose(net(x, torch.ones_like(holes)), model(x), atol=1e-5) or aware
    assert same is not aware  # zero and edge see the pixels only; partial and gated see the holes (a gate that
    # starts as a copy has zero mask weights, so gated starts random here)


def test_evaluation_scores_every_level_and_k(task, root, preset):
    _, loaders = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    torch.manual_seed(0)
    model = build_model(preset)
    convs.convert(model, "partial")
    evaluation = task.evaluate(MaskInput(model), loaders, torch.device("cpu"), preset)
    assert set(task.table_metrics) <= set(evaluation.scalars)
    assert task.metric == "test_unoccluded/instance_top1" and task.table_metrics[0] == task.metric
    for key in task.table_metrics:
        assert 0 <= evaluation.scalars[key] <= 100 and not math.isnan(evaluation.scalars[key]), key
    assert len(task.table_metrics) == len(LEVELS) * 6


def test_data_report_counts_cleaning_and_lists_skipped_images(task, root, preset, index):
    report = task.data_report(root, preset)
    assert json.loads(report["data/cleaning.json"]) == index.counts
    rows = list(csv.DictReader(io.StringIO(report["data/skipped_images.csv"])))
    assert len(rows) == len(index.skipped) > 0
    assert {row["reason"] for row in rows} >= {"missing"}


def test_a_training_step_through_the_loop_helpers(task, root, preset):
    loader, _ = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    torch.manual_seed(0)
    model = build_model(preset)
    convs.convert(model, "partial_1ch")
    net = MaskInput(model)
    inputs, targets = next(iter(loader))
    loss = task.loss(forward(net, to_device(inputs, torch.device("cpu"))), targets, preset)
    loss.backward()
    assert loss.item() > 0 and model.backbone.conv1.weight.grad is not None
