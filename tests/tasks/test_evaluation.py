"""The typed evaluation result refuses tables and matrices that do not match their class lists."""

import pytest
import torch

from tasks import ClassTable, ConfusionMatrix, Evaluation


def test_shapes_must_match_the_classes():
    with pytest.raises(ValueError, match=r"shape \(2, 2\) for 3 classes"):
        ConfusionMatrix(torch.zeros(2, 2, dtype=torch.long), ["a", "b", "c"])
    with pytest.raises(ValueError, match="column 'iou' has 2 values for 3 classes"):
        ClassTable("per_class_iou", ["a", "b", "c"], {"iou": [1.0, 2.0]})
    evaluation = Evaluation({"val/top1": 50.0})
    assert evaluation.confusion is None and evaluation.tables == []
