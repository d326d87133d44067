"""The synthetic stand-in for Cityscapes: real layout, street scenes where only the image border tells car from bus."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..common import disc, pixel_grid, to_uint8
from .data import COLORS

logger = logging.getLogger(__name__)

# Raw Cityscapes label ids the synthetic scenes use.
UNLABELED, EGO, ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, BUS = 0, 1, 7, 8, 11, 21, 23, 26, 28
DEFAULT_SPEC = {  # a preset's `synthetic` overrides these
    "cities": {"train": ["aachen", "bochum"], "val": ["frankfurt"]},
    "per_city": 8,
    "width": 128,
    "height": 64,
}


def street_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB street scene (uint8 (H, W, 3)) and its raw Cityscapes labelIds (uint8 (H, W)).

    Sky, buildings, vegetation, sidewalk and road in horizontal bands (position tells them apart as much as
    colour), an ego-vehicle strip at the bottom (ignored, as in Cityscapes), and vehicles that all look alike:
    a vehicle cut by the left or right image border is a `car`, one wholly inside the frame is a `bus`. Only
    a network that knows where the image ends can tell them apart, so border handling changes the score, and
    tiles cut vehicles at artificial borders.
    """
    yy, xx = pixel_grid(height, width)
    labels = np.full((height, width), SKY, np.uint8)
    wave = lambda amp: amp * height * np.sin(xx[0] / width * rng.uniform(2, 7) + rng.uniform(0, 6))  # noqa: E731
    horizon = rng.uniform(0.25, 0.35) * height + wave(0.04)
    curb = rng.uniform(0.55, 0.62) * height + wave(0.02)
    road = curb + rng.uniform(0.05, 0.1) * height
    labels[yy >= horizon] = BUILDING
    for _ in range(int(rng.integers(1, 4))):  # trees in front of the buildings
        cx, cy, r = rng.uniform(0, width), rng.uniform(0.3, 0.5) * height, rng.uniform(0.06, 0.14) * height
        labels[disc(yy, xx, cy, cx, r) & (yy < curb)] = VEGETATION
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
    return to_uint8(image), labels


def write_synthetic(root: Path, synthetic: dict[str, Any], *, seed: int = 0) -> None:
    """Write a small dataset in the real Cityscapes layout (labelIds, color, instanceIds, polygons per image)."""
    spec = {**DEFAULT_SPEC, **synthetic}
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
                image, label_ids = street_scene(rng, spec["height"], spec["width"])
                frame += int(rng.integers(1, 40))
                stem = f"{city}_{i:06d}_{frame:06d}"
                Image.fromarray(image).save(images / f"{stem}_leftImg8bit.png")
                Image.fromarray(label_ids).save(labels / f"{stem}_gtFine_labelIds.png")
                color = np.zeros((*label_ids.shape, 3), np.uint8)
                for label_id in np.unique(label_ids):
                    color[label_ids == label_id] = COLORS[int(label_id)]
                Image.fromarray(color).save(labels / f"{stem}_gtFine_color.png")
                # 16-bit like Cityscapes' instanceIds; every pixel keeps its label id (no per-vehicle ids here)
                instance_ids = label_ids.astype(np.uint16)
                Image.fromarray(instance_ids).save(labels / f"{stem}_gtFine_instanceIds.png")
                polygons = {"imgHeight": spec["height"], "imgWidth": spec["width"], "objects": []}
                (labels / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons))
        logger.info(
            "%s: %d images of %d x %d from %s",
            split,
            spec["per_city"] * len(cities),
            spec["height"],
            spec["width"],
            ", ".join(cities),
        )
