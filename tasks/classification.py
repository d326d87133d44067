"""ImageNet classification (the partial-conv padding paper's recipe): ResNet, top-1/top-5, real ImageNet layout."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .base import LayoutError, Preset, sharded_loaders

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}

# The synthetic stand-in's classes, named after real ImageNet synsets so the layout looks like the real one.
# A class is decided by where a large object meets the image border (horizontal flips keep every label).
SYNTHETIC_CLASSES = {
    "n01440764": "touches the top border",
    "n01443537": "touches the bottom border",
    "n01484850": "touches the left or right border",
    "n01491361": "touches no border",
}


def _transforms(preset: Preset, train: bool) -> transforms.Compose:
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        crop = transforms.RandomResizedCrop(preset.image_size, scale=preset.crop_scale)
        return transforms.Compose([crop, transforms.RandomHorizontalFlip(), *norm])
    return transforms.Compose([transforms.Resize(preset.eval_size), transforms.CenterCrop(preset.image_size), *norm])


# A laptop-sized comparison: a small ResNet at low resolution on the synthetic data (Adam: BatchNorm statistics
# settle within a few hundred steps, where SGD 0.1 from scratch would not).
_CPU = Preset(
    model="resnet18",
    epochs=6,
    batch_size=32,
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    schedule="constant",
    image_size=48,
    eval_size=48,
    crop_scale=(0.7, 1.0),
    synthetic={"train_per_class": 96, "val_per_class": 24, "size": 56},
)


class ClassificationTask:
    """ImageNet-style classification: `ROOT/{train,val}/<wnid>/*.JPEG`, class index = sorted position of the wnid."""

    name: ClassVar[str] = "classification"
    metric: ClassVar[str] = "val/top1"
    table_metrics: ClassVar[tuple[str, ...]] = ("val/top1",)
    variants: ClassVar[tuple[str, ...]] = ("zero", "partial", "gated", "edge", "affine")
    layout: ClassVar[str] = (
        "ROOT/train/<wnid>/<wnid>_<n>.JPEG    e.g. ROOT/train/n01440764/n01440764_10026.JPEG\n"
        "ROOT/val/<wnid>/<name>.JPEG          validation re-sorted into one folder per class,\n"
        "                                     e.g. ROOT/val/n01440764/ILSVRC2012_val_00000293.JPEG\n"
        "ROOT/meta.bin                        optional: torch.save((wnid_to_classes, val_wnids)), as written by\n"
        "                                     torchvision.datasets.ImageNet"
    )
    presets: ClassVar[dict[str, Preset]] = {
        # NVIDIA/partialconv main.py and the thesis (batch 64): 100 epochs, SGD 0.1, x0.1 every 30 epochs.
        "thesis": Preset(model="resnet50", epochs=100, batch_size=64, lr=0.1, step_size=30, gamma=0.1),
        "cpu": _CPU,
        # The cpu recipe at 32 px with a few batches per epoch: for tests and a first try.
        "smoke": _CPU.updated(
            epochs=4,
            batch_size=16,
            image_size=32,
            eval_size=32,
            max_batches=8,
            synthetic={"train_per_class": 32, "val_per_class": 16, "size": 36},
        ),
    }

    # data ---------------------------------------------------------------------------------------------------

    def check_layout(self, root: Path) -> None:
        """Raise `LayoutError` showing the expected layout unless `root` holds an ImageNet-style tree."""
        root = Path(root)
        problems = []
        classes = {}
        for split in ("train", "val"):
            folder = root / split
            if not folder.is_dir():
                problems.append(f"missing folder {folder}")
                continue
            found = sorted(d.name for d in folder.iterdir() if d.is_dir() and _has_image(d))
            if not found:
                problems.append(f"{folder} has no class folder with .JPEG/.jpg/.png images")
            classes[split] = found
        if not problems and classes["train"] != classes["val"]:
            only = sorted(set(classes["train"]) ^ set(classes["val"]))
            problems.append(f"train and val have different class folders (e.g. {', '.join(only[:3])})")
        if problems:
            raise LayoutError(
                f"{root} does not look like an ImageNet-style dataset: {'; '.join(problems)}.\n"
                f"Expected layout:\n{self.layout}"
            )

    def dataset(self, root: Path, preset: Preset, split: str) -> Dataset:
        """The real loader: torchvision's ImageNet where meta.bin exists, else ImageFolder on ROOT/<split>."""
        self.check_layout(root)
        transform = _transforms(preset, train=split == "train")
        if (Path(root) / "meta.bin").exists():
            return torchvision.datasets.ImageNet(str(root), split=split, transform=transform)
        return torchvision.datasets.ImageFolder(str(Path(root) / split), transform=transform)

    def build_loaders(
        self, root: Path, preset: Preset, *, rank: int, world_size: int, seed: int, workers: int
    ) -> tuple[DataLoader, DataLoader]:
        """Train loader sharded over the Ray Train workers (seeded order); the full validation loader."""
        train, val = self.dataset(root, preset, "train"), self.dataset(root, preset, "val")
        common = dict(rank=rank, world_size=world_size, seed=seed, workers=workers)
        return sharded_loaders(train, val, preset, **common, where=f"{root}/train")

    def write_synthetic(self, root: Path, preset: Preset, *, seed: int = 0) -> None:
        """Write a small dataset in the real ImageNet layout whose labels depend on content at the image border."""
        spec = {"train_per_class": 32, "val_per_class": 8, "size": 64, **preset.synthetic}
        rng = np.random.default_rng(seed)
        root = Path(root)
        val_index = 1
        val_wnids = []
        for label, wnid in enumerate(sorted(SYNTHETIC_CLASSES)):
            for split, count in (("train", spec["train_per_class"]), ("val", spec["val_per_class"])):
                folder = root / split / wnid
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    image = _border_scene(rng, spec["size"], label)
                    if split == "train":
                        name = f"{wnid}_{int(rng.integers(1, 99999))}{i:03d}.JPEG"
                    else:
                        name = f"ILSVRC2012_val_{val_index:08d}.JPEG"
                        val_index += 1
                        val_wnids.append(wnid)
                    Image.fromarray(image).save(folder / name, format="JPEG", quality=92)
        wnid_to_classes = {w: (c,) for w, c in SYNTHETIC_CLASSES.items()}
        torch.save((wnid_to_classes, val_wnids), root / "meta.bin")

    # model, loss, metrics ---------------------------------------------------------------------------------------

    def build_model(self, preset: Preset, *, num_classes: int) -> nn.Module:
        try:
            builder = getattr(torchvision.models, preset.model)
        except AttributeError:
            raise ValueError(f"Unknown torchvision model {preset.model!r} in the preset") from None
        return builder(weights=None, num_classes=num_classes)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, preset: Preset) -> dict[str, Any]:
        """Top-1 and top-5 accuracy (%) and mean loss over the loader, plus the confusion matrix."""
        model.eval()
        num_classes = len(loader.dataset.classes)
        k = min(5, num_classes)
        correct1 = correct5 = total = 0
        loss_sum = 0.0
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for images, targets in itertools.islice(loader, preset.max_batches):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            top = logits.topk(k, dim=1).indices
            correct1 += (top[:, 0] == targets).sum().item()
            correct5 += (top == targets[:, None]).any(dim=1).sum().item()
            total += targets.numel()
            confusion += torch.bincount((targets * num_classes + top[:, 0]).cpu(), minlength=num_classes**2).view(
                num_classes, num_classes
            )
        return {
            "val/top1": 100.0 * correct1 / max(total, 1),
            "val/top5": 100.0 * correct5 / max(total, 1),
            "val/loss": loss_sum / max(total, 1),
            "confusion": confusion,
            "classes": list(loader.dataset.classes),
        }

    def num_classes(self, root: Path) -> int:
        return len([d for d in (Path(root) / "train").iterdir() if d.is_dir() and _has_image(d)])


def _has_image(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _border_scene(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """A noisy scene with distractor blobs inside and one large disc placed by class: top, bottom, side, none."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    base = rng.uniform(40, 140, 3)  # background colour
    grad = (xx / size * rng.uniform(-30, 30) + yy / size * rng.uniform(-30, 30))[..., None]
    image = base[None, None, :] + grad + rng.normal(0, 12, (size, size, 3))
    for _ in range(int(rng.integers(1, 3))):  # distractors strictly inside the frame
        r = rng.uniform(0.06, 0.12) * size
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    r = rng.uniform(0.22, 0.3) * size
    colour = rng.uniform(160, 255, 3) * rng.permutation([1.0, 0.6, 0.3])
    along = rng.uniform(0.3, 0.7) * size
    cut = rng.uniform(0.0, 0.5) * r  # how far the disc centre lies outside the frame
    if label == 0:
        cy, cx = -cut, along
    elif label == 1:
        cy, cx = size - 1 + cut, along
    elif label == 2:
        cy, cx = along, (-cut if rng.random() < 0.5 else size - 1 + cut)
    else:
        margin = r + 0.08 * size
        cy, cx = rng.uniform(margin, size - margin, 2) if size - 2 * margin > 0 else (size / 2, size / 2)
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


__all__ = ["ClassificationTask", "SYNTHETIC_CLASSES"]
