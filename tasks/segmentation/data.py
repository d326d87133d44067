"""Cityscapes on disk: the layout and its check, label ids -> train ids, the joint image + label transform.

Layout, label ids and recipe: docs/datasets.md, "Cityscapes segmentation". The real files are read through
`torchvision.datasets.Cityscapes`; raw label ids map to the 19 train ids, everything else to 255 (ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..common import IMAGENET_MEAN, IMAGENET_STD
from ..data import LayoutError
from .presets import SegmentationPreset

IGNORE = 255
# The 19 evaluated classes, in train-id order, and the raw label id -> train id map (every other id -> 255).
TRAIN_CLASSES = tuple(
    c.name
    for c in sorted(torchvision.datasets.Cityscapes.classes, key=lambda c: c.train_id)
    if 0 <= c.train_id < IGNORE
)
ID_TO_TRAIN = {c.id: c.train_id for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < IGNORE}
COLORS = {c.id: c.color for c in torchvision.datasets.Cityscapes.classes if c.id >= 0}  # label id -> _color.png RGB
_LUT = torch.full((256,), IGNORE, dtype=torch.long)
for _id, _train in ID_TO_TRAIN.items():
    _LUT[_id] = _train

LAYOUT = (
    "ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
    "     e.g. ROOT/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png\n"
    "ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (raw Cityscapes label ids)\n"
    "     e.g. ROOT/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
)
PAD_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}  # 0 = the mean colour once normalised; 255 = ignored


def to_train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """Raw Cityscapes label ids (any integer tensor, 0..255) -> train ids 0..18, 255 for ignored pixels."""
    return _LUT.to(label_ids.device)[label_ids.long()]


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from `scale_range`: images bilinear with antialiasing, masks nearest.

    v2's RandomResize draws a target size; the Cityscapes recipes draw a factor of the image size.
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the factor (torch's RNG, seeded per DataLoader worker) and the scaled size shared by all inputs."""
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize one input (v2 picks the kernel by type: Mask -> nearest)."""
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class PadIfSmaller(v2.Transform):
    """Pad right and bottom up to `size` (height, width), filling per type (`fill={tv_tensors.Mask: 255, ...}`).

    As torchvision's segmentation reference (`references/segmentation/v2_extras.py`): RandomCrop's pad_if_needed
    pads both sides, which would move the image away from the top-left corner the labels are aligned to.
    """

    def __init__(self, size: tuple[int, int], fill: dict[type, float]) -> None:
        super().__init__()
        self.size, self.fill = size, fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """The right and bottom padding that brings the inputs up to `size`."""
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - width), max(0, self.size[0] - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Pad one input with its type's fill value."""
        if not any(params["padding"]):
            return inpt
        return self._call_kernel(F.pad, inpt, params["padding"], fill=self.fill.get(type(inpt), 0))


class JointTransform:
    """Image + raw labelIds PIL pair -> normalized tensor (3, H, W) and train-id tensor (H, W); in training, a
    random scale, crop and horizontal flip applied to both alike (torchvision transforms v2 on Image + Mask).

    The crop is `crop` pixels square, clipped to the unscaled image, so a small synthetic image trains whole; a
    scaled image smaller than the crop is padded right and bottom with zeros and label 255.
    """

    def __init__(self, crop: int | None, scale_range: tuple[float, float] = (1.0, 1.0), train: bool = False) -> None:
        self.crop, self.scale_range, self.train = crop, tuple(scale_range), train
        self._augment: dict[tuple[int, int], v2.Compose] = {}  # by unscaled image size: the crop is clipped to it

    def augmentation(self, height: int, width: int) -> v2.Compose:
        """The training augmentation for images of `height` x `width` pixels (built once per size)."""
        if (height, width) not in self._augment:
            steps: list[v2.Transform] = []
            scaled = self.scale_range != (1.0, 1.0)
            if scaled:
                steps.append(RandomScale(self.scale_range))
            if self.crop:
                size = (min(self.crop, height), min(self.crop, width))
                if self.scale_range[0] < 1.0:  # only a shrunk image can be smaller than the crop
                    steps.append(PadIfSmaller(size, fill=PAD_FILL))
                if scaled or size != (height, width):  # else the only window is the whole image
                    steps.append(v2.RandomCrop(size))
            steps.append(v2.RandomHorizontalFlip())
            self._augment[height, width] = v2.Compose(steps)
        return self._augment[height, width]

    def __call__(self, image: Image.Image, target: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        # (H, W, C) -> (C, H, W) made contiguous before the float conversion: resizing a channels-last view is slower
        pixels = F.to_dtype(F.pil_to_tensor(image.convert("RGB")).contiguous(), torch.float32, scale=True)
        pixels = F.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
        label = to_train_ids(torch.from_numpy(np.array(target, dtype=np.uint8)))
        if self.train:
            augment = self.augmentation(*pixels.shape[-2:])
            pixels, label = augment(tv_tensors.Image(pixels), tv_tensors.Mask(label))
            pixels, label = pixels.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
        return pixels.contiguous(), label.contiguous()


def check_layout(root: Path) -> None:
    """Raise `LayoutError` showing the expected layout unless `root` holds Cityscapes' fine train/val folders."""
    root = Path(root)
    problems = []
    for split in ("train", "val"):
        images = root / "leftImg8bit" / split
        if not images.is_dir():
            problems.append(f"missing folder {images}")
            continue
        found = sorted(images.glob("*/*_leftImg8bit.png"))
        if not found:
            problems.append(f"{images} has no <city>/*_leftImg8bit.png images")
            continue
        first = found[0]
        label = root / "gtFine" / split / first.parent.name / first.name.replace("_leftImg8bit", "_gtFine_labelIds")
        if not label.is_file():
            problems.append(f"{first.relative_to(root)} has no label file {label.relative_to(root)}")
    if problems:
        raise LayoutError(
            f"{root} does not look like a Cityscapes dataset: {'; '.join(problems)}.\nExpected layout:\n{LAYOUT}"
        )


def build_dataset(root: Path, preset: SegmentationPreset, split: str) -> Dataset:
    """The real loader: torchvision's Cityscapes (fine, semantic), files in sorted order, ids -> train ids."""
    check_layout(root)
    transform = JointTransform(preset.image_size, preset.scale_range, train=split == "train")
    data = torchvision.datasets.Cityscapes(
        str(root), split=split, mode="fine", target_type="semantic", transforms=transform
    )
    pairs = sorted(zip(data.images, data.targets, strict=True))  # os.listdir order differs between machines
    data.images, data.targets = [p[0] for p in pairs], [p[1] for p in pairs]
    return data
