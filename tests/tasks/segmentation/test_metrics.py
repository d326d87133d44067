"""Segmentation metrics: mIoU against torchmetrics, tiled windows, and the three evaluation modes."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from tasks import Evaluation
from tasks.segmentation import (
    IGNORE,
    TRAIN_CLASSES,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    overlap_stride,
    predict_tiled,
    window_starts,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_agrees_with_torchmetrics(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 19, (3, 40, 50), generator=g)
    target[:, :5] = IGNORE
    target[target == 7] = 3  # class 7 absent from the targets
    pred = torch.randint(0, 19, (3, 40, 50), generator=g)
    pred[pred == 11] = 12  # class 11 never predicted
    pred[target == 5] = 5  # some agreement
    confusion = confusion_matrix(pred, target)
    assert confusion.sum() == (target != IGNORE).sum()
    reference = MulticlassJaccardIndex(num_classes=19, ignore_index=IGNORE, average="none", zero_division=math.nan)
    expected = reference(pred, target)
    ours = iou_per_class(confusion).float()
    assert torch.allclose(ours.nan_to_num(-1), expected.nan_to_num(-1), atol=1e-6)
    assert mean_iou(confusion) == pytest.approx(100 * expected[~expected.isnan()].mean().item(), abs=1e-4)


def test_a_class_neither_present_nor_predicted_is_ignored():
    confusion = torch.zeros(19, 19, dtype=torch.long)
    confusion[0, 0], confusion[1, 1], confusion[1, 0] = 10, 5, 5
    iou = iou_per_class(confusion)
    assert iou[2:].isnan().all()
    assert mean_iou(confusion) == pytest.approx(100 * (10 / 15 + 5 / 10) / 2)


@pytest.mark.parametrize("length,tile", [(100, 32), (64, 64), (65, 64), (1000, 333), (2048, 1024), (7, 3)])
def test_windows_cover_every_pixel_and_stay_inside(length, tile):
    for stride in (tile, overlap_stride(tile)):
        starts = window_starts(length, tile, stride)
        assert starts[0] == 0 and starts[-1] == length - tile  # the last window is clamped to the edge
        covered = np.zeros(length, bool)
        for s in starts:
            assert 0 <= s <= length - tile
            covered[s : s + tile] = True
        assert covered.all()
    assert window_starts(2048, 1024, overlap_stride(1024)) == [0, 683, 1024]  # stride = ceil(2/3 * 1024)
    with pytest.raises(ValueError, match="tile <= length"):
        window_starts(10, 11, 5)


def test_tiles_change_nothing_for_a_model_without_padding_effects():
    """1x1 convolutions are translation-equivariant with no border: the three modes give the same prediction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 19, 1)).eval()
    images = torch.randn(2, 3, 37, 90)  # not multiples of the tile
    with torch.no_grad():
        whole = model(images).softmax(1)
        tiles = predict_tiled(model, images, 37, 37)
        overlap = predict_tiled(model, images, 37, overlap_stride(37))
    assert torch.allclose(whole, tiles, atol=1e-6) and torch.allclose(whole, overlap, atol=1e-6)
    assert torch.equal(whole.argmax(1), overlap.argmax(1))
    # a padded 3x3 convolution does see the tile borders: the control that the test can fail
    padded = nn.Conv2d(3, 19, 3, padding=1).eval()
    with torch.no_grad():
        assert not torch.allclose(padded(images).softmax(1), predict_tiled(padded, images, 37, 37), atol=1e-4)


def window_by_window(model: nn.Module, images: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    """The reference: one forward pass per window, softmaxes summed into place and divided by the per-pixel count."""
    n, _, height, width = images.shape
    total, count = torch.zeros(n, 19, height, width), torch.zeros(1, 1, height, width)
    for top in window_starts(height, tile, stride):
        for left in window_starts(width, tile, stride):
            total[..., top : top + tile, left : left + tile] += model(
                images[..., top : top + tile, left : left + tile]
            ).softmax(1)
            count[..., top : top + tile, left : left + tile] += 1
    return total / count


class CountingPasses(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batched_tiles_equal_the_window_by_window_prediction_and_its_miou(task, channels_last):
    """The segmentation model (batch norm in eval mode, padded convs that do see the tile borders) on 2 images of
    40x50 in tiles of 24: all tiles in one pass, overlapping ones in passes of at most the whole batch's pixels."""
    torch.manual_seed(0)
    model = CountingPasses(task.build_model(task.presets["smoke"], num_classes=19).eval())
    images = torch.randn(2, 3, 40, 50)
    target = torch.randint(0, 19, (2, 40, 50))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for stride in (24, overlap_stride(24)):
            reference = window_by_window(model, images, 24, stride)
            windows = len(window_starts(40, 24, stride)) * len(window_starts(50, 24, stride))
            model.batches.clear()
            batched = predict_tiled(model, images, 24, stride)
            # twice the 2 x 40 x 50 pixels hold the 6 windows of 24 x 24 per image: one pass of 2 x 6 crops
            assert windows == 6 and model.batches == [2 * 6] and torch.allclose(batched, reference, atol=1e-5)
            model.batches.clear()
            batched = predict_tiled(model, images, 24, stride, max_pixels=2 * 40 * 50)
            # 2 x 40 x 50 pixels hold 3 windows per image: passes of 2 x 3 crops
            assert model.batches == [2 * 3, 2 * 3] and torch.allclose(batched, reference, atol=1e-5)
            assert mean_iou(confusion_matrix(batched.argmax(1), target)) == mean_iou(
                confusion_matrix(reference.argmax(1), target)
            )
            model.batches.clear()
            one_by_one = predict_tiled(model, images, 24, stride, max_pixels=1)  # a window per pass
            assert model.batches == [2] * windows and torch.allclose(one_by_one, reference, atol=1e-5)
        assert not torch.allclose(model(images).softmax(1), reference, atol=1e-3)  # the tiles do change the output


def test_evaluate_reports_the_three_modes_and_per_class_iou(task, root):
    preset = task.presets["smoke"]
    _, val = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    torch.manual_seed(0)
    model = task.build_model(preset, num_classes=19)
    result = task.evaluate(model, val, torch.device("cpu"), preset)
    assert isinstance(result, Evaluation)
    for key in ("val/miou", "val/miou_tile", "val/miou_tile_overlap", "val/pixel_acc", "val/loss"):
        assert isinstance(result.scalars[key], float) and not math.isnan(result.scalars[key])
    assert result.confusion.counts.shape == (19, 19) and result.confusion.classes == list(TRAIN_CLASSES)
    assert [table.name for table in result.tables] == ["per_class_iou"]
    per_class = result.tables[0]
    assert list(per_class.columns) == ["iou_whole", "iou_tile", "iou_tile_overlap"]
    assert per_class.classes == list(TRAIN_CLASSES)
    assert all(len(v) == 19 for v in per_class.columns.values())
    # the whole-image column is the per-class IoU of the confusion matrix the headline mIoU comes from
    whole = 100 * iou_per_class(result.confusion.counts)
    assert np.allclose(per_class.columns["iou_whole"], whole.numpy(), equal_nan=True)
    assert result.scalars["val/miou"] == pytest.approx(mean_iou(result.confusion.counts))
