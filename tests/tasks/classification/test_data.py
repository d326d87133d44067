"""The classification loaders read the real ImageNet layout (ImageFolder / ImageNet) and check it first."""

import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as v1

from tasks import LayoutError, images
from tasks.classification import PRESETS, SYNTHETIC_CLASSES, build_transform
from tasks.common import IMAGENET_MEAN, IMAGENET_STD


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


@pytest.mark.parametrize("train", [True, False])
def test_the_tensor_transform_gives_the_pil_recipes_crops_and_pixels(tmp_path, train):
    """torchvision.io + transforms v2 on uint8 tensors: the same crops and flips for a seed as the PIL recipe
    (transforms v1 on PIL images) and the same pixels, up to one level of rounding."""
    preset = PRESETS["thesis"].updated(image_size=56, eval_size=64, crop_scale=(0.08, 1.0))
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.JPEG"
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 96 x 128
    Image.fromarray(smooth).save(path, quality=90)
    norm = [v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        pil = v1.Compose([v1.RandomResizedCrop(56, scale=preset.crop_scale), v1.RandomHorizontalFlip(), *norm])
    else:
        pil = v1.Compose([v1.Resize(64), v1.CenterCrop(56), *norm])
    tensor = build_transform(preset, train=train)
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    for seed in range(6):
        torch.manual_seed(seed)
        expected = pil(images.open_rgb(path))
        torch.manual_seed(seed)
        got = tensor(images.read_rgb(path))
        assert got.shape == expected.shape == (3, 56, 56) and got.dtype == torch.float32
        levels = ((got - expected) * std * 255).abs()
        assert levels.max() < 1.01 and levels.mean() < 0.05, (seed, levels.max(), levels.mean())
