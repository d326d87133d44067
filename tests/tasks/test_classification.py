"""The classification task: the synthetic stand-in is real ImageNet layout, read by the real loaders."""

import shutil

import numpy as np
import pytest
import torch
import torchvision

from tasks import LayoutError, ensure_synthetic, get_task
from tasks.classification import SYNTHETIC_CLASSES


@pytest.fixture(scope="module")
def task():
    return get_task("classification")


@pytest.fixture(scope="module")
def root(task, tmp_path_factory):
    return ensure_synthetic(task, task.presets["smoke"], tmp_path_factory.mktemp("cache"))


def test_layout_and_names_look_like_imagenet(root):
    wnids = sorted(SYNTHETIC_CLASSES)
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == wnids
    train_name = next((root / "train" / wnids[0]).iterdir()).name
    val_name = next((root / "val" / wnids[0]).iterdir()).name
    assert train_name.startswith(f"{wnids[0]}_") and train_name.endswith(".JPEG")
    assert val_name.startswith("ILSVRC2012_val_") and len(val_name) == len("ILSVRC2012_val_00000001.JPEG")


def test_read_by_imagefolder_imagenet_and_the_task_loader(task, root):
    folder = torchvision.datasets.ImageFolder(str(root / "train"))
    assert folder.classes == sorted(SYNTHETIC_CLASSES)
    imagenet = torchvision.datasets.ImageNet(str(root), split="val")
    assert len(imagenet) == 4 * 16 and imagenet.wnids == sorted(SYNTHETIC_CLASSES)
    train, val = task.build_loaders(root, task.presets["smoke"], rank=0, world_size=1, seed=0, workers=0)
    images, labels = next(iter(train))
    assert images.shape == (16, 3, 32, 32) and labels.dtype == torch.long
    assert set(labels.tolist()) <= {0, 1, 2, 3}


def test_loader_shards_between_workers(task, root):
    seen = []
    for rank in range(2):
        train, _ = task.build_loaders(root, task.presets["smoke"], rank=rank, world_size=2, seed=0, workers=0)
        seen.append(set(train.sampler))
    assert not seen[0] & seen[1]


def test_labels_depend_on_the_border(task, root):
    """Class 'touches the top border' has bright pixels in its top row; 'touches no border' does not."""
    from PIL import Image

    def border_brightness(wnid):
        values = []
        for path in sorted((root / "train" / wnid).iterdir())[:10]:
            image = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32))
            values.append(image[0].max(dim=-1).values.mean().item())
        return sum(values) / len(values)

    wnids = sorted(SYNTHETIC_CLASSES)
    assert border_brightness(wnids[0]) > border_brightness(wnids[3]) + 20


def test_generation_is_cached_and_survives_a_crash(task, tmp_path):
    preset = task.presets["smoke"]
    first = ensure_synthetic(task, preset, tmp_path)
    stamp = (first / ".complete").stat().st_mtime_ns
    assert ensure_synthetic(task, preset, tmp_path) == first
    assert (first / ".complete").stat().st_mtime_ns == stamp
    (first / ".complete").unlink()  # as if a writer had died before finishing
    assert ensure_synthetic(task, preset, tmp_path) == first and (first / ".complete").exists()


def test_wrong_layout_shows_the_expected_layout(task, root, tmp_path):
    with pytest.raises(LayoutError, match=r"missing folder .*train(.|\n)*ROOT/train/<wnid>/<wnid>_<n>.JPEG"):
        task.check_layout(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / "val" / sorted(SYNTHETIC_CLASSES)[0])
    with pytest.raises(LayoutError, match="different class folders"):
        task.check_layout(broken)


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match="Unknown task 'segmentatoin'. Known tasks: classification"):
        get_task("segmentatoin")
