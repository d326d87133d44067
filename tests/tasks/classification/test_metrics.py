"""Classification evaluation: top-1/top-5 and loss as scalars, the confusion matrix with readable class names."""

import pytest
import torch

from tasks import Evaluation
from tasks.classification import SYNTHETIC_CLASSES


def test_evaluate_returns_accuracies_and_the_confusion_matrix(task, root):
    preset = task.presets["smoke"]
    _, val = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    torch.manual_seed(0)
    model = task.build_model(preset, num_classes=4)
    result = task.evaluate(model, val, torch.device("cpu"), preset)
    assert isinstance(result, Evaluation) and set(result.scalars) == {"val/top1", "val/top5", "val/loss"}
    assert all(isinstance(v, float) for v in result.scalars.values())
    assert result.scalars["val/top5"] == 100.0  # 4 classes: the true one is always among the top 5
    counts = result.confusion.counts
    assert counts.shape == (4, 4) and counts.sum() == len(val.dataset)  # the whole split (max_batches 8 > 4)
    assert result.scalars["val/top1"] == pytest.approx(100 * counts.diag().sum().item() / counts.sum().item())
    # torchvision's ImageNet gives a tuple of names per wnid: the first one names the row
    assert result.confusion.classes == [SYNTHETIC_CLASSES[w] for w in sorted(SYNTHETIC_CLASSES)]
    assert result.tables == []
