"""Cityscapes on disk: the layout and its check, label ids -> train ids, the joint image + label transform.

Layout, label ids and recipe: docs/datasets.md, "Cityscapes segmentation". The real files are read through
`torchvision.datasets.Cityscapes`; raw label ids map to the 19 train ids, everything else to 255 (ignored).
"""

from __future__ import annotations

from functools import partial
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

from .. import images
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
_LUT8 = _LUT.to(torch.uint8)  # the same map into uint8 (train ids and 255 fit): label maps augmented in 1 byte a pixel

LAYOUT = (
    "ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
    "     e.g. ROOT/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png\n"
    "ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (raw Cityscapes label ids)\n"
    "     e.g. ROOT/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
)
# Padding, applied before normalisation: the ImageNet mean colour (0 once normalised) and label 255 (ignored).
PAD_FILL = {tv_tensors.Image: list(IMAGENET_MEAN), tv_tensors.Mask: IGNORE}
BLUR_SIGMA = (0.15, 1.3)  # NVIDIA/semantic-segmentation's RandomGaussianBlur: sigma = 0.15 + U(0, 1) * 1.15
BLUR_KERNEL = 11  # odd, covering 4 sigma either side at the largest sigma (skimage's truncate=4, which NVIDIA used)


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
    A uint8 image that needs padding is converted to float32 (0..1, `v2.ToDtype(scale=True)`) first, so that a
    fill in 0..1 (the ImageNet mean colour, `PAD_FILL`) is exact: 0 once normalised; one that does not stays uint8.

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
        if isinstance(inpt, tv_tensors.Image) and not inpt.is_floating_point():
            inpt = F.to_dtype(inpt, torch.float32, scale=True)
        return self._call_kernel(F.pad, inpt, params["padding"], fill=self.fill.get(type(inpt), 0))


class ClassUniformCrop(v2.Transform):
    """A `size` (height, width) crop that, with probability `class_uniform`, is centred on a pixel of a class drawn
    uniformly from the classes in the label map (255 excluded), moved inside the image where it would cross the
    border; otherwise a uniformly random window, as `v2.RandomCrop`. Needs the inputs to be at least `size`.

    Zhu et al.'s class-uniform sampling (NVIDIA/semantic-segmentation `--class_uniform_pct 0.5`), per image.
    Upstream draws that fraction of an epoch's samples over the whole dataset: a class uniformly, then one of the
    (image, 1024 px tile) pairs that hold it, and the crop holds the class' centroid in that tile at a random
    place. Here the sampler stays the shuffled one, and each crop draws the class among its own image's and
    centres on a random pixel of it: rare classes get more crops inside the images that hold them, not more
    images. A pixel is always of the class, where a centroid need not be, so no tiles are needed to keep it there.
    Each call's choice is in its parameters: `make_params(...)["label"]`, None for a random window.
    """

    def __init__(self, size: tuple[int, int], class_uniform: float, *, ignore: int = IGNORE) -> None:
        super().__init__()
        self.size, self.class_uniform, self.ignore = tuple(size), class_uniform, ignore

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the window (torch's RNG, seeded per DataLoader worker): its corner, size and the class it is on."""
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = self.size
        if crop_h > height or crop_w > width:
            raise ValueError(f"crop {crop_h} x {crop_w} is larger than the {height} x {width} input; pad it first")
        label = None
        top, left = torch.randint(height - crop_h + 1, ()).item(), torch.randint(width - crop_w + 1, ()).item()
        if torch.rand(()).item() < self.class_uniform:
            masks = [i for i in flat_inputs if isinstance(i, tv_tensors.Mask)]
            if not masks:
                raise TypeError("class-uniform cropping needs the label map: pass a tv_tensors.Mask with the image")
            labels = masks[0].as_subclass(torch.Tensor).reshape(height, width)
            counts = torch.bincount(labels.flatten().long(), minlength=self.ignore + 1)
            counts[self.ignore :] = 0
            classes = counts.nonzero().flatten()
            if len(classes):
                label = classes[torch.randint(len(classes), ())].item()
                ys, xs = (labels == label).nonzero(as_tuple=True)
                pick = torch.randint(len(ys), ()).item()
                top = min(max(ys[pick].item() - crop_h // 2, 0), height - crop_h)
                left = min(max(xs[pick].item() - crop_w // 2, 0), width - crop_w)
        return {"top": top, "left": left, "height": crop_h, "width": crop_w, "label": label}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Crop one input to the drawn window."""
        window = {k: params[k] for k in ("top", "left", "height", "width")}
        return self._call_kernel(F.crop, inpt, **window)


class JointTransform:
    """Image + raw labelIds pair -> normalized float32 tensor (3, H, W) and train-id tensor (H, W), int64; in
    training, a random scale, crop and horizontal flip applied to both alike (torchvision transforms v2 on Image +
    Mask), then the image alone jittered in colour and blurred where asked; normalisation comes last.

    The pair comes as decoded by `images.read_image`: a uint8 tensor (3, H, W) and a uint8 label map (1, H, W) or
    (H, W) (PIL images are accepted too). The geometric steps run on uint8, images and label maps alike (resizing
    bilinear with antialiasing, labels nearest: exact ids); the image becomes float32 after the flip (or where it is
    padded), so colour jitter and blur work on 0..1 pixels as before, on the crop only.

    The crop is `crop` pixels square, clipped to the unscaled image, so a small synthetic image trains whole; a
    scaled image smaller than the crop is padded right and bottom with the mean colour and label 255.
    `class_uniform`, `color_jitter` and `gaussian_blur` are NVIDIA/semantic-segmentation's training defaults
    (`--class_uniform_pct 0.5 --color_aug 0.25 --gblur`): see `ClassUniformCrop`; v2.ColorJitter with brightness,
    contrast, saturation and hue all `color_jitter` (as upstream's `--color_aug`); v2.GaussianBlur with a sigma
    drawn from `BLUR_SIGMA` on every image.
    """

    def __init__(
        self,
        crop: int | None,
        scale_range: tuple[float, float] = (1.0, 1.0),
        train: bool = False,
        *,
        class_uniform: float = 0.0,
        color_jitter: float = 0.0,
        gaussian_blur: bool = False,
    ) -> None:
        self.crop, self.scale_range, self.train = crop, tuple(scale_range), train
        self.class_uniform, self.color_jitter, self.gaussian_blur = class_uniform, color_jitter, gaussian_blur
        self._augment: dict[tuple[int, int], v2.Compose] = {}  # by unscaled image size: the crop is clipped to it

    def augmentation(self, height: int, width: int) -> v2.Compose:
        """The training augmentation for images of `height` x `width` pixels (built once per size)."""
        if (height, width) not in self._augment:
            steps: list[v2.Transform] = []
            scaled = self.scale_range != (1.0, 1.0)
            if scaled:
                steps.append(RandomScale(self.scale_range))
            smallest = max(1, round(min(height, width) * min(self.scale_range[0], 1.0)))  # the output's shorter side
            if self.crop:
                size = (min(self.crop, height), min(self.crop, width))
                if self.scale_range[0] < 1.0:  # only a shrunk image can be smaller than the crop
                    steps.append(PadIfSmaller(size, fill=PAD_FILL))
                if scaled or size != (height, width):  # else the only window is the whole image
                    # v2.RandomCrop when class-uniform crops are off: the same draws as before they existed
                    crop = ClassUniformCrop(size, self.class_uniform) if self.class_uniform else v2.RandomCrop(size)
                    steps.append(crop)
                smallest = min(size)
            steps.append(v2.RandomHorizontalFlip())
            steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
            if self.color_jitter:
                jitter = self.color_jitter
                steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter))
            if self.gaussian_blur:  # reflect padding needs the kernel's half width below the image side
                steps.append(v2.GaussianBlur(min(BLUR_KERNEL, 2 * smallest - 1), sigma=BLUR_SIGMA))
            self._augment[height, width] = v2.Compose(steps)
        return self._augment[height, width]

    def __call__(
        self, image: torch.Tensor | Image.Image, target: torch.Tensor | Image.Image
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(image, Image.Image):  # (H, W, C) -> (C, H, W) made contiguous: resizing a strided view is slower
            image = F.pil_to_tensor(image.convert("RGB")).contiguous()
        if isinstance(target, Image.Image):
            target = torch.from_numpy(np.array(target, dtype=np.uint8))
        if target.ndim == 3 and target.shape[0] != 1:
            raise ValueError(f"a label map of {target.shape[0]} channels: expected one (a labelIds PNG)")
        label = _LUT8[target.reshape(target.shape[-2:]).long()]  # raw label ids -> train ids, uint8
        pixels = image
        if self.train:
            augment = self.augmentation(*pixels.shape[-2:])
            pixels, label = augment(tv_tensors.Image(pixels), tv_tensors.Mask(label))
            pixels, label = pixels.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
        if not pixels.is_floating_point():  # evaluation: torchvision decodes (H, W, C), a 4-byte copy would cost more
            pixels = pixels.contiguous()
        # after the augmentation: the crop is cheaper to convert and normalise
        pixels = F.normalize(F.to_dtype(pixels, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
        return pixels.contiguous(), label.long().contiguous()


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


class Cityscapes(torchvision.datasets.Cityscapes):
    """torchvision's Cityscapes (fine, semantic), reading the image and its labelIds PNG through `images.read_image`
    (decoded whole into uint8 tensors, the label ids as stored), a damaged one of the two handled as `bad_images`
    says: "skip" serves the next pair in its place (`images.BadImages`)."""

    def __init__(self, root: Path, split: str, *, transforms: JointTransform, bad_images: str) -> None:
        super().__init__(str(root), split=split, mode="fine", target_type="semantic", transforms=transforms)
        self.bad_images = images.BadImages(bad_images)

    def _load(self, index: int) -> tuple[Any, Any]:
        image = images.read_image(self.images[index], "RGB")
        target = images.read_image(self.targets[index][0])
        return self.transforms(image, target) if self.transforms is not None else (image, target)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.bad_images.get(self._load, index, partial(images.substitutes, index, len(self)))


def build_dataset(root: Path, preset: SegmentationPreset, split: str) -> Dataset:
    """The real loader: torchvision's Cityscapes (fine, semantic), files in sorted order, ids -> train ids; images
    and labels decoded whole, a damaged one handled as `preset.bad_images` says (`tasks.images`)."""
    check_layout(root)
    transform = JointTransform(
        preset.image_size,
        preset.scale_range,
        train=split == "train",
        class_uniform=preset.class_uniform,
        color_jitter=preset.color_jitter,
        gaussian_blur=preset.gaussian_blur,
    )
    data = Cityscapes(root, split, transforms=transform, bad_images=preset.bad_images)
    pairs = sorted(zip(data.images, data.targets, strict=True))  # os.listdir order differs between machines
    data.images, data.targets = [p[0] for p in pairs], [p[1] for p in pairs]
    return data
