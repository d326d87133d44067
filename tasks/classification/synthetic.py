"""The synthetic stand-in for ImageNet: real layout, four classes told apart by where an object meets the border."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..common import disc, noisy_canvas, pixel_grid, to_uint8

logger = logging.getLogger(__name__)

# The synthetic stand-in's classes, named after real ImageNet synsets so the layout looks like the real one.
# A class is decided by where a large object meets the image border (horizontal flips keep every label).
SYNTHETIC_CLASSES = {
    "n01440764": "touches the top border",
    "n01443537": "touches the bottom border",
    "n01484850": "touches the left or right border",
    "n01491361": "touches no border",
}
DEFAULT_SPEC = {"train_per_class": 32, "val_per_class": 8, "size": 64}  # a preset's `synthetic` overrides these


def border_scene(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """A noisy scene with distractor blobs inside and one large disc placed by class: top, bottom, side, none."""
    yy, xx = pixel_grid(size, size)
    image = noisy_canvas(rng, yy, xx)
    for _ in range(int(rng.integers(1, 3))):  # distractors strictly inside the frame
        r = rng.uniform(0.06, 0.12) * size
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        image[disc(yy, xx, cy, cx, r)] = rng.uniform(0, 255, 3)
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
    image[disc(yy, xx, cy, cx, r)] = colour
    return to_uint8(image)


def write_synthetic(root: Path, synthetic: dict[str, Any], *, seed: int = 0) -> None:
    """Write a small dataset in the real ImageNet layout (with meta.bin) whose labels depend on the image border."""
    spec = {**DEFAULT_SPEC, **synthetic}
    rng = np.random.default_rng(seed)
    root = Path(root)
    val_index = 1
    val_wnids = []
    for label, wnid in enumerate(sorted(SYNTHETIC_CLASSES)):
        for split, count in (("train", spec["train_per_class"]), ("val", spec["val_per_class"])):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = border_scene(rng, spec["size"], label)
                if split == "train":
                    name = f"{wnid}_{int(rng.integers(1, 99999))}{i:03d}.JPEG"
                else:
                    name = f"ILSVRC2012_val_{val_index:08d}.JPEG"
                    val_index += 1
                    val_wnids.append(wnid)
                Image.fromarray(image).save(folder / name, format="JPEG", quality=92)
        logger.info(
            "class %d/%d %s: %d train + %d val images of %d px",
            label + 1,
            len(SYNTHETIC_CLASSES),
            wnid,
            spec["train_per_class"],
            spec["val_per_class"],
            spec["size"],
        )
    wnid_to_classes = {w: (c,) for w, c in SYNTHETIC_CLASSES.items()}
    torch.save((wnid_to_classes, val_wnids), root / "meta.bin")
