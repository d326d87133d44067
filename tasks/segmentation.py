"""Cityscapes semantic segmentation (the thesis' DeepLabV3+ recipe): mIoU on whole images, tiles, overlapping tiles.

Real layout (FORMATS.md): `ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png` with
`ROOT/gtFine/<split>/<city>/<same stem>_gtFine_labelIds.png`, read through `torchvision.datasets.Cityscapes`; the
raw label ids are mapped to the 19 train ids, everything else to 255 (ignored).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.transforms import functional as TF

from .base import LayoutError, Preset, sharded_loaders
from .classification import IMAGENET_MEAN, IMAGENET_STD

IGNORE = 255
# The 19 evaluated classes, in train-id order, and the raw label id -> train id map (every other id -> 255).
TRAIN_CLASSES = tuple(
    c.name
    for c in sorted(torchvision.datasets.Cityscapes.classes, key=lambda c: c.train_id)
    if 0 <= c.train_id < IGNORE
)
ID_TO_TRAIN = {c.id: c.train_id for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < IGNORE}
_LUT = torch.full((256,), IGNORE, dtype=torch.long)
for _id, _train in ID_TO_TRAIN.items():
    _LUT[_id] = _train
_COLORS = {c.id: c.color for c in torchvision.datasets.Cityscapes.classes if c.id >= 0}

# Raw Cityscapes label ids the synthetic scenes use.
UNLABELED, EGO, ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, BUS = 0, 1, 7, 8, 11, 21, 23, 26, 28
EVAL_MODES = {"whole": "val/miou", "tile": "val/miou_tile", "tile_overlap": "val/miou_tile_overlap"}


def to_train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """Raw Cityscapes label ids (any integer tensor, 0..255) -> train ids 0..18, 255 for ignored pixels."""
    return _LUT.to(label_ids.device)[label_ids.long()]


# evaluation --------------------------------------------------------------------------------------------------------


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of `tile` pixels every `stride` along `length`, the last one clamped to the edge."""
    if not 0 < tile <= length or stride <= 0:
        raise ValueError(f"need 0 < tile <= length and stride > 0, got tile={tile}, length={length}, stride={stride}")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def overlap_stride(tile: int) -> int:
    """The thesis' overlapping tiles: 1/3 overlap, stride = ceil(2/3 tile)."""
    return math.ceil(2 * tile / 3)


def predict_tiled(model: nn.Module, images: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    """Class probabilities from square tiles: each tile's softmax summed into place, divided by the per-pixel count."""
    n, _, height, width = images.shape
    total = count = None
    for top in window_starts(height, tile, stride):
        for left in window_starts(width, tile, stride):
            logits = model(images[:, :, top : top + tile, left : left + tile]).float()
            if total is None:
                total = logits.new_zeros(n, logits.shape[1], height, width)
                count = logits.new_zeros(1, 1, height, width)
            total[:, :, top : top + tile, left : left + tile] += logits.softmax(dim=1)
            count[:, :, top : top + tile, left : left + tile] += 1
    return total / count


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = len(TRAIN_CLASSES)) -> torch.Tensor:
    """num_classes x num_classes counts (rows: true class, columns: predicted); pixels labelled 255 are skipped."""
    valid = target != IGNORE
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index.cpu(), minlength=num_classes**2).view(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """IoU = diag / (row + col - diag) per class; NaN for a class neither present nor predicted."""
    confusion = confusion.double()
    diag = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - diag
    return torch.where(union > 0, diag / union.clamp(min=1), torch.full_like(diag, math.nan))


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean IoU in percent over the classes that are not NaN (the thesis' and NVIDIA's mIoU)."""
    iou = iou_per_class(confusion)
    return 100.0 * iou[~iou.isnan()].mean().item() if (~iou.isnan()).any() else math.nan


# data --------------------------------------------------------------------------------------------------------------


class JointTransform:
    """Image + raw labelIds PIL pair -> normalized tensor and train-id tensor; random scale, crop and flip in training.

    The crop is `crop` pixels square, clipped to the (scaled) image, so a small synthetic image trains whole; a
    scaled image smaller than the crop is padded with zeros and label 255.
    """

    def __init__(self, crop: int | None, scale_range: tuple[float, float] = (1.0, 1.0), train: bool = False) -> None:
        self.crop, self.scale_range, self.train = crop, scale_range, train

    def __call__(self, image: Image.Image, target: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = TF.normalize(TF.to_tensor(image.convert("RGB")), IMAGENET_MEAN, IMAGENET_STD)
        label = to_train_ids(torch.from_numpy(np.array(target, dtype=np.uint8)))[None]
        if self.train:
            height, width = image.shape[-2:]
            scale = random.uniform(*self.scale_range)
            if scale != 1.0:
                size = [max(1, round(height * scale)), max(1, round(width * scale))]
                image = TF.resize(image, size, antialias=True)
                label = TF.resize(label, size, interpolation=TF.InterpolationMode.NEAREST)
            if self.crop:
                ch, cw = min(self.crop, height), min(self.crop, width)  # the unscaled image bounds the crop
                height, width = image.shape[-2:]
                if height < ch or width < cw:
                    pad = [0, 0, max(0, cw - width), max(0, ch - height)]
                    image, label = TF.pad(image, pad, fill=0), TF.pad(label, pad, fill=IGNORE)
                    height, width = image.shape[-2:]
                top, left = random.randint(0, height - ch), random.randint(0, width - cw)
                image, label = image[:, top : top + ch, left : left + cw], label[:, top : top + ch, left : left + cw]
            if random.random() < 0.5:
                image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label[0].contiguous()


class SegmentationTask:
    """Cityscapes-style semantic segmentation with 19 train ids, DeepLabV3+ on a torchvision ResNet."""

    name: ClassVar[str] = "segmentation"
    metric: ClassVar[str] = "val/miou"
    table_metrics: ClassVar[tuple[str, ...]] = tuple(EVAL_MODES.values())
    variants: ClassVar[tuple[str, ...]] = ("zero", "partial", "gated", "edge", "affine")
    layout: ClassVar[str] = (
        "ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
        "     e.g. ROOT/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png\n"
        "ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (raw Cityscapes label ids)\n"
        "     e.g. ROOT/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    )
    presets: ClassVar[dict[str, Preset]] = {}  # filled below the class

    # data ----------------------------------------------------------------------------------------------------------

    def check_layout(self, root: Path) -> None:
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
                f"{root} does not look like a Cityscapes dataset: {'; '.join(problems)}.\n"
                f"Expected layout:\n{self.layout}"
            )

    def dataset(self, root: Path, preset: Preset, split: str) -> Dataset:
        """The real loader: torchvision's Cityscapes (fine, semantic), files in sorted order, ids -> train ids."""
        self.check_layout(root)
        transform = JointTransform(preset.image_size, preset.scale_range, train=split == "train")
        data = torchvision.datasets.Cityscapes(
            str(root), split=split, mode="fine", target_type="semantic", transforms=transform
        )
        pairs = sorted(zip(data.images, data.targets, strict=True))  # os.listdir order differs between machines
        data.images, data.targets = [p[0] for p in pairs], [p[1] for p in pairs]
        return data

    def build_loaders(
        self, root: Path, preset: Preset, *, rank: int, world_size: int, seed: int, workers: int
    ) -> tuple[DataLoader, DataLoader]:
        """Train loader sharded over the Ray Train workers (seeded order); the whole validation split, full size."""
        train, val = self.dataset(root, preset, "train"), self.dataset(root, preset, "val")
        common = dict(rank=rank, world_size=world_size, seed=seed, workers=workers)
        return sharded_loaders(train, val, preset, **common, where=f"{root}/leftImg8bit/train")

    def num_classes(self, root: Path) -> int:
        return len(TRAIN_CLASSES)

    def write_synthetic(self, root: Path, preset: Preset, *, seed: int = 0) -> None:
        """Write a small dataset in the real Cityscapes layout: street scenes whose labels depend on the border.

        Sky, buildings, vegetation, sidewalk and road in horizontal bands (position tells them apart as much as
        colour), an ego-vehicle strip at the bottom (ignored, as in Cityscapes), and vehicles that all look alike:
        a vehicle cut by the left or right image border is a `car`, one wholly inside the frame is a `bus`. Only
        a network that knows where the image ends can tell them apart, so border handling changes the score, and
        tiles cut vehicles at artificial borders.
        """
        spec = {
            "cities": {"train": ["aachen", "bochum"], "val": ["frankfurt"]},
            "per_city": 8,
            "width": 128,
            "height": 64,
            **preset.synthetic,
        }
        rng = np.random.default_rng(seed)
        root = Path(root)
        for split, cities in spec["cities"].items():
            for city in cities:
                images = root / "leftImg8bit" / split / city
                labels = root / "gtFine" / split / city
                images.mkdir(parents=True, exist_ok=True)
                labels.mkdir(parents=True, exist_ok=True)
                frame = int(rng.integers(10, 500))
                for i in range(spec["per_city"]):
                    image, label_ids = _street_scene(rng, spec["height"], spec["width"])
                    frame += int(rng.integers(1, 40))
                    stem = f"{city}_{i:06d}_{frame:06d}"
                    Image.fromarray(image).save(images / f"{stem}_leftImg8bit.png")
                    Image.fromarray(label_ids).save(labels / f"{stem}_gtFine_labelIds.png")
                    color = np.zeros((*label_ids.shape, 3), np.uint8)
                    for label_id in np.unique(label_ids):
                        color[label_ids == label_id] = _COLORS[int(label_id)]
                    Image.fromarray(color).save(labels / f"{stem}_gtFine_color.png")
                    # 16-bit like Cityscapes' instanceIds; every pixel keeps its label id (no per-vehicle ids here)
                    instance_ids = label_ids.astype(np.uint16)
                    Image.fromarray(instance_ids).save(labels / f"{stem}_gtFine_instanceIds.png")
                    polygons = {"imgHeight": spec["height"], "imgWidth": spec["width"], "objects": []}
                    (labels / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons))

    # model, loss, metrics ------------------------------------------------------------------------------------------

    def build_model(self, preset: Preset, *, num_classes: int) -> nn.Module:
        return DeepLabV3Plus(preset.model, num_classes=num_classes, **preset.model_options)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, preset: Preset) -> dict[str, Any]:
        """mIoU (%) in the thesis' three modes from confusion matrices accumulated over the split, plus per-class IoU.

        whole: the full image in one pass. tile: square tiles of `preset.tile_size` (clipped to the image) without
        overlap. tile_overlap: the same tiles with 1/3 overlap. Tile probabilities are averaged where windows meet.
        """
        model.eval()
        n = len(TRAIN_CLASSES)
        confusions = {mode: torch.zeros(n, n, dtype=torch.long) for mode in EVAL_MODES}
        loss_sum, pixels = 0.0, 0
        for images, targets in itertools.islice(loader, preset.max_batches):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            tile = min(preset.tile_size or images.shape[-2], *images.shape[-2:])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(images).float()
                predictions = {
                    "whole": logits.argmax(1),
                    "tile": predict_tiled(model, images, tile, tile).argmax(1),
                    "tile_overlap": predict_tiled(model, images, tile, overlap_stride(tile)).argmax(1),
                }
            loss_sum += F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum").item()
            pixels += (targets != IGNORE).sum().item()
            for mode, pred in predictions.items():
                confusions[mode] += confusion_matrix(pred, targets, n)
        result: dict[str, Any] = {key: mean_iou(confusions[mode]) for mode, key in EVAL_MODES.items()}
        whole = confusions["whole"]
        result["val/pixel_acc"] = 100.0 * whole.diag().sum().item() / max(whole.sum().item(), 1)
        result["val/loss"] = loss_sum / max(pixels, 1)
        result["confusion"] = whole
        result["classes"] = list(TRAIN_CLASSES)
        result["per_class_iou"] = {mode: (100.0 * iou_per_class(c)).tolist() for mode, c in confusions.items()}
        return result


# model ---------------------------------------------------------------------------------------------------------------


def _dilate(layer: nn.Module, dilation: int) -> None:
    """Turn a ResNet stage's stride into dilation (DeepLab's output-stride trick) for Basic and Bottleneck blocks."""
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride != (1, 1):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation, module.padding = (dilation, dilation), (dilation, dilation)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al. 2018): a dilated torchvision ResNet encoder, ASPP, and a decoder that merges the
    stride-4 low-level features. `output_stride` 8 dilates the last two stages, 16 the last one."""

    def __init__(
        self,
        backbone: str = "resnet50",
        *,
        num_classes: int = len(TRAIN_CLASSES),
        output_stride: int = 16,
        aspp_rates: tuple[int, ...] = (6, 12, 18),
        aspp_channels: int = 256,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        builder = getattr(torchvision.models, backbone, None)
        if builder is None or not backbone.startswith(("resnet", "wide_resnet", "resnext")):
            raise ValueError(
                f"Unknown backbone {backbone!r}: expected a torchvision ResNet, e.g. resnet18, "
                "resnet50, wide_resnet50_2"
            )
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        net = builder(weights=None)
        if output_stride <= 16:
            _dilate(net.layer4, 2 if output_stride == 16 else 4)
        if output_stride == 8:
            _dilate(net.layer3, 2)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        low_in = (
            net.layer1[-1].conv3.out_channels if hasattr(net.layer1[-1], "conv3") else net.layer1[-1].conv2.out_channels
        )
        high_in = net.fc.in_features
        self.aspp = ASPP(high_in, list(aspp_rates), aspp_channels)
        self.low_level = nn.Sequential(
            nn.Conv2d(low_in, low_level_channels, 1, bias=False), nn.BatchNorm2d(low_level_channels), nn.ReLU(True)
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(aspp_channels + low_level_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(True),
            nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(True),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low = self.layer1(self.stem(x))
        high = self.aspp(self.layer4(self.layer3(self.layer2(low))))
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.classifier(self.decoder(torch.cat([high, self.low_level(low)], dim=1)))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


# synthetic scenes ------------------------------------------------------------------------------------------------


def _street_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB street scene and its raw Cityscapes labelIds (see `SegmentationTask.write_synthetic`)."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    labels = np.full((height, width), SKY, np.uint8)
    wave = lambda amp: amp * height * np.sin(xx[0] / width * rng.uniform(2, 7) + rng.uniform(0, 6))  # noqa: E731
    horizon = rng.uniform(0.25, 0.35) * height + wave(0.04)
    curb = rng.uniform(0.55, 0.62) * height + wave(0.02)
    road = curb + rng.uniform(0.05, 0.1) * height
    labels[yy >= horizon] = BUILDING
    for _ in range(int(rng.integers(1, 4))):  # trees in front of the buildings
        cx, cy, r = rng.uniform(0, width), rng.uniform(0.3, 0.5) * height, rng.uniform(0.06, 0.14) * height
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) & (yy < curb)] = VEGETATION
    labels[yy >= curb] = SIDEWALK
    labels[yy >= road] = ROAD
    labels[yy >= height - max(1, round(0.06 * height))] = EGO  # the ego vehicle's bonnet: ignored in evaluation
    colours = {
        SKY: (110, 150, 205),
        BUILDING: (95, 85, 80),
        VEGETATION: (60, 115, 45),
        SIDEWALK: (170, 150, 160),
        ROAD: (90, 80, 95),
        EGO: (20, 20, 25),
    }
    image = np.zeros((height, width, 3), np.float32)
    for label_id, colour in colours.items():
        image[labels == label_id] = np.asarray(colour) + rng.normal(0, 10, 3)
    # Vehicles on the road that look alike: cut by the left/right border -> car, wholly inside the frame -> bus.
    for _ in range(int(rng.integers(1, 4))):
        h = rng.uniform(0.16, 0.26) * height
        w = h * rng.uniform(1.6, 2.4)
        bottom = rng.uniform(road.mean() + 0.1 * height, height * 0.92)
        if rng.random() < 0.5:  # cut by a side border
            cut = rng.uniform(0.2, 0.6) * w
            left = -cut if rng.random() < 0.5 else width - w + cut
            label_id = CAR
        else:
            left = rng.uniform(0.05 * width, 0.95 * width - w)
            label_id = BUS
        body = (xx >= left) & (xx < left + w) & (yy >= bottom - h) & (yy < bottom) & (labels != EGO)
        labels[body] = label_id
        image[body] = rng.uniform(60, 240, 3) * rng.permutation([1.0, 0.7, 0.35])
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _presets() -> dict[str, Preset]:
    cpu = Preset(
        model="resnet18",
        epochs=12,
        batch_size=8,
        eval_batch_size=8,
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        schedule="poly",
        poly_power=1.0,
        image_size=128,  # clipped to the 64 x 128 synthetic images: they train whole
        tile_size=64,  # square tiles of the image height, as 1024 x 1024 tiles of Cityscapes' 1024 x 2048
        scale_range=(1.0, 1.0),
        model_options={  # output stride 16: a third of the time of stride 8 at this size
            "output_stride": 16,
            "aspp_rates": (2, 4, 6),
            "aspp_channels": 64,
            "decoder_channels": 64,
            "low_level_channels": 24,
        },
        synthetic={
            "cities": {"train": ["aachen", "bochum", "bremen"], "val": ["frankfurt"]},
            "per_city": 24,
            "width": 128,
            "height": 64,
        },
    )
    return {
        # Thesis Table 4.3 / 4.4 recipe (NVIDIA semantic-segmentation): 175 epochs, SGD 1e-3, poly 1.0, crop 536,
        # SyncBN across workers, no backbone pretraining; wide_resnet50_2 is torchvision's closest to WideResNet38.
        "thesis": Preset(
            model="wide_resnet50_2",
            epochs=175,
            batch_size=2,
            eval_batch_size=1,
            lr=1e-3,
            weight_decay=1e-4,
            schedule="poly",
            poly_power=1.0,
            image_size=536,
            tile_size=1024,
            scale_range=(0.5, 2.0),
            sync_bn=True,
            model_options={"output_stride": 8, "aspp_rates": (12, 24, 36)},
        ),
        "cpu": cpu,
        # The cpu recipe on fewer, smaller images with a few batches per epoch: for tests and a first try.
        "smoke": cpu.updated(
            epochs=4,
            batch_size=8,
            max_batches=6,
            synthetic={
                "cities": {"train": ["aachen", "bochum"], "val": ["frankfurt"]},
                "per_city": 24,
                "width": 64,
                "height": 32,
            },
            tile_size=32,
        ),
    }


SegmentationTask.presets = _presets()

__all__ = ["DeepLabV3Plus", "SegmentationTask", "TRAIN_CLASSES", "ID_TO_TRAIN", "to_train_ids"]
