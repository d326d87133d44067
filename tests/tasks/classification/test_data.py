"""The classification loaders read the real ImageNet layout (ImageFolder / ImageNet) and check it first."""

import shutil

import pytest
import torch
import torchvision

from tasks import LayoutError
from tasks.classification import SYNTHETIC_CLASSES


def test_read_by_imagefolder_imagenet_and_the_task_loader(task, root):
    folder = torchvision.datasets.ImageFolder(str(root / "train"))
    assert folder.classes == sorted(SYNTHETIC_CLASSES)
    imagenet = torchvision.datasets.ImageNet(str(root), split="val")
    assert len(imagenet) == 4 * 16 and imagenet.wnids == sorted(SYNTHETIC_CLASSES)
    train, val = task.build_loaders(root, task.presets["smoke"], rank=0, world_size=1, seed=0, workers=0)
    images, labels = next(iter(train))
    assert images.shape == (16, 3, 32, 32) and labels.dtype == torch.long
    assert set(labels.tolist()) <= {0, 1, 2, 3}
    assert task.num_classes(root) == 4


def test_loader_shards_between_workers(task, root):
    seen = []
    for rank in range(2):
        train, _ = task.build_loaders(root, task.presets["smoke"], rank=rank, world_size=2, seed=0, workers=0)
        seen.append(set(train.sampler))
    assert not seen[0] & seen[1]


def test_wrong_layout_shows_the_expected_layout(task, root, tmp_path):
    with pytest.raises(LayoutError, match=r"missing folder .*train(.|\n)*ROOT/train/<wnid>/<wnid>_<n>.JPEG"):
        task.check_layout(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / "val" / sorted(SYNTHETIC_CLASSES)[0])
    with pytest.raises(LayoutError, match="different class folders"):
        task.check_layout(broken)
