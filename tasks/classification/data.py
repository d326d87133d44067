"""ImageNet on disk: the expected layout, its check, the transforms, and the torchvision datasets that read it.

Layout and recipe: docs/datasets.md, "ImageNet classification".
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .. import images
from ..common import IMAGENET_MEAN, IMAGENET_STD
from ..data import LayoutError
from .presets import ClassificationPreset

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
LAYOUT = (
    "ROOT/train/<wnid>/<wnid>_<n>.JPEG    e.g. ROOT/train/n01440764/n01440764_10026.JPEG\n"
    "ROOT/val/<wnid>/<name>.JPEG          validation re-sorted into one folder per class,\n"
    "                                     e.g. ROOT/val/n01440764/ILSVRC2012_val_00000293.JPEG\n"
    "ROOT/meta.bin                        optional: torch.save((wnid_to_classes, val_wnids)), as written by\n"
    "                                     torchvision.datasets.ImageNet"
)


def build_transform(preset: ClassificationPreset, *, train: bool) -> v2.Compose:
    """The partial-conv recipe: RandomResizedCrop + flip for training, Resize + CenterCrop for validation, then
    ImageNet normalisation. torchvision.transforms.v2 on the uint8 tensor (3, H, W) `images.read_rgb` decodes:
    resizing stays in uint8 (bilinear, antialiased like PIL's), only the crop becomes float32 (3, S, S)."""
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        crop = v2.RandomResizedCrop(preset.image_size, scale=preset.crop_scale, antialias=True)
        return v2.Compose([crop, v2.RandomHorizontalFlip(), *norm])
    resize = v2.Resize(preset.eval_size, antialias=True)
    return v2.Compose([resize, v2.CenterCrop(preset.image_size), *norm])


def has_image(folder: Path) -> bool:
    """Whether `folder` directly holds at least one .JPEG/.jpg/.png file."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def class_folders(root: Path, split: str) -> list[str]:
    """The sorted class folder names (wnids) of `ROOT/<split>` that hold images: the class index order."""
    return sorted(d.name for d in (Path(root) / split).iterdir() if d.is_dir() and has_image(d))


def check_layout(root: Path) -> None:
    """Raise `LayoutError` showing the expected layout unless `root` holds an ImageNet-style tree."""
    root = Path(root)
    problems = []
    classes = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            problems.append(f"missing folder {folder}")
            continue
        found = class_folders(root, split)
        if not found:
            problems.append(f"{folder} has no class folder with .JPEG/.jpg/.png images")
        classes[split] = found
    if not problems and classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        problems.append(f"train and val have different class folders (e.g. {', '.join(only[:3])})")
    if problems:
        raise LayoutError(
            f"{root} does not look like an ImageNet-style dataset: {'; '.join(problems)}.\nExpected layout:\n{LAYOUT}"
        )


class _BadImagesHandled:
    """torchvision's folder datasets reading through `images.read_rgb` (decoded whole, a uint8 tensor), a damaged
    file handled as the preset's `bad_images` says: "skip" serves the next image of the same class in its place
    (`images.BadImages`)."""

    def __init__(self, *args: Any, bad_images: str, **kwargs: Any) -> None:
        super().__init__(*args, loader=images.read_rgb, **kwargs)
        self.bad_images = images.BadImages(bad_images)
        self._classes = np.asarray(self.targets, dtype=np.int64)

    def __getitem__(self, index: int) -> Any:
        candidates = partial(images.substitutes, index, len(self), self._classes)
        return self.bad_images.get(super().__getitem__, index, candidates)


class ImageFolder(_BadImagesHandled, torchvision.datasets.ImageFolder):
    """`torchvision.datasets.ImageFolder`, damaged files handled as `bad_images` says."""


class ImageNet(_BadImagesHandled, torchvision.datasets.ImageNet):
    """`torchvision.datasets.ImageNet`, damaged files handled as `bad_images` says."""


def build_dataset(root: Path, preset: ClassificationPreset, split: str) -> Dataset:
    """The real loader: torchvision's ImageNet where meta.bin exists, else ImageFolder on ROOT/<split>; images
    decoded whole, a damaged one handled as `preset.bad_images` says (`tasks.images`)."""
    check_layout(root)
    transform = build_transform(preset, train=split == "train")
    if (Path(root) / "meta.bin").exists():
        return ImageNet(str(root), split=split, transform=transform, bad_images=preset.bad_images)
    return ImageFolder(str(Path(root) / split), transform=transform, bad_images=preset.bad_images)
