"""The synthetic stand-in for Hotels-50K: real layout, hotel rooms recognised by motifs that occluders can hide.

Every hotel has its own set of framed motifs (shape + two colours), 2-4 of them drawn at new random places in each
of its images beside 1-2 random ones, so the cues that tell hotels apart are spread over the image and a person in
front hides some of them (a high occlusion most). Chains share a palette and décor (wall, floor, stripes, headboard,
bedspread); the window side, bed place and floor line are weak per-hotel cues, blurred by each photo's own view.
TraffickCam images are dark, warm and noisy phone photos in portrait; travel-website images clean, bright and
landscape. Pasted people are drawn independently of the hotel, so they carry no hotel information.

`synthetic_plan` (pure, cheap) decides ids, roles and the planted faults; `write_synthetic` draws and writes them.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import string
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..common import disc, pixel_grid, to_uint8
from .data import CROPS, LEVEL_FOLDERS, LEVELS, SOURCES

logger = logging.getLogger(__name__)

DEFAULT_SPEC = {  # a preset's `synthetic` overrides these
    "hotels": 48,  # hotels in train_set.csv, the duplicate and the too-small ones included
    "chains": 6,
    "size": 80,  # the shorter image side; the longer one is round(1.25 * size)
    "images": (10, 16),  # training images per hotel (inclusive)
    "few_images": (3, 6),  # training images of the hotels that cleaning drops as too small
    "few": None,  # how many such hotels (None: max(1, hotels // 16))
    "duplicates": 1,  # hotels whose training images are byte-identical copies of another hotel's
    "test_only": None,  # hotels only in test_set.csv (None: max(1, hotels // 24))
    "unchained": None,  # hotels without a chain (None: max(2, hotels // 6)); one of them absent from hotel_info.csv
    "test_images": 3,  # TraffickCam test images per hotel (each at every occlusion level)
    "people_crops": 40,  # PNGs in people_crops.tar.gz
}
# Fraction of a test image the people cover, per level (the unoccluded level has no mask).
OCCLUSION = {"low": (0.10, 0.25), "medium": (0.25, 0.50), "high": (0.50, 0.80)}
SHAPES = ("disc", "square", "diamond", "ring", "triangle", "cross", "hbars", "vbars", "checker")
PALETTE = np.array(  # saturated, well-separated colours for motifs and décor
    [
        (220, 40, 40), (240, 140, 30), (235, 215, 40), (120, 200, 50), (30, 150, 70), (40, 190, 190),
        (40, 100, 220), (110, 60, 200), (200, 60, 180), (250, 250, 245), (25, 25, 30), (140, 90, 50),
    ],
    dtype=np.float32,
)  # fmt: skip
BEDSPREADS = np.array([(235, 235, 230), (200, 60, 60), (60, 90, 160), (210, 190, 140), (90, 140, 90)], np.float32)


@dataclass(frozen=True)
class PlannedHotel:
    """One hotel of the synthetic dataset: ids, chain, its role for cleaning and its images."""

    hotel_id: int
    chain_id: int  # -1: no chain
    listed: bool  # in hotel_info.csv; an unlisted hotel's chain folder is "Unknown"
    role: str  # "regular", "few" (under min_images), "duplicate" (a byte copy of `copy_of`), "test_only"
    train: tuple[tuple[int, str, str], ...]  # (image_id, source, extension) per training image
    test: tuple[int, ...]  # TraffickCam test image ids (the same ids at every level)
    copy_of: int | None = None


@dataclass(frozen=True)
class SyntheticPlan:
    """What `write_synthetic` writes, fixed before any drawing: chains, hotels, and the faults it plants."""

    chains: dict[int, str]
    hotels: tuple[PlannedHotel, ...]
    missing: tuple[int, ...]  # training image ids listed in train_set.csv whose file is not written
    corrupt: tuple[int, ...]  # training image ids whose file holds bytes no image reader accepts
    missing_test: dict[str, tuple[int, ...]]  # level -> test image ids listed but without a file at that level

    def hotel(self, hotel_id: int) -> PlannedHotel:
        """The planned hotel with this id."""
        return next(h for h in self.hotels if h.hotel_id == hotel_id)

    def folder(self, hotel: PlannedHotel) -> str:
        """The chain folder of a hotel, as the download script names it."""
        return str(hotel.chain_id) if hotel.listed else "Unknown"


def _spec(synthetic: dict[str, Any]) -> dict[str, Any]:
    """The spec with defaults filled in and checked; an unknown key is an error (a typo would pass unnoticed)."""
    unknown = sorted(set(synthetic) - set(DEFAULT_SPEC))
    if unknown:
        raise ValueError(f"unknown synthetic spec key(s) {unknown}; known: {', '.join(DEFAULT_SPEC)}")
    spec = {**DEFAULT_SPEC, **synthetic}
    hotels = spec["hotels"]
    spec["few"] = max(1, hotels // 16) if spec["few"] is None else spec["few"]
    spec["test_only"] = max(1, hotels // 24) if spec["test_only"] is None else spec["test_only"]
    spec["unchained"] = max(2, hotels // 6) if spec["unchained"] is None else spec["unchained"]
    regular = hotels - spec["few"] - 2 * spec["duplicates"]
    if regular < 4 or spec["chains"] < 1 or spec["unchained"] < 1 or spec["unchained"] > regular:
        raise ValueError(
            f"synthetic spec {synthetic}: needs chains >= 1 and hotels >= few + 2 * duplicates + 4, with "
            f"1 <= unchained <= the {regular} regular hotels"
        )
    return spec


def _name(rng: np.random.Generator, syllables: int) -> str:
    letters = [rng.choice(list("bcdfghklmnprstvz")) + rng.choice(list("aeiou")) for _ in range(syllables)]
    return "".join(letters).capitalize()


def synthetic_plan(synthetic: dict[str, Any], *, seed: int = 0) -> SyntheticPlan:
    """The ids, chains, roles and planted faults of the dataset `write_synthetic(root, synthetic, seed=seed)`
    writes; pure and cheap, so tests can state exactly what cleaning must remove."""
    spec = _spec(synthetic)
    rng = np.random.default_rng([seed, 0])
    n_train, n_test_only = spec["hotels"], spec["test_only"]
    chain_ids = sorted(int(c) for c in rng.choice(92, size=spec["chains"], replace=False))
    chains = {c: f"{_name(rng, 2)} {rng.choice(['Hotels', 'Inns', 'Suites', 'Resorts'])}" for c in chain_ids}
    hotel_ids = [int(h) for h in rng.choice(np.arange(1000, 200000), size=n_train + n_test_only, replace=False)]
    roles = ["regular"] * (n_train - spec["few"] - 2 * spec["duplicates"])
    roles += ["few"] * spec["few"] + ["original", "duplicate"] * spec["duplicates"]
    order = rng.permutation(len(roles))  # mix roles over the hotel ids, keeping originals before their copies
    slots = sorted(range(len(roles)), key=lambda i: (roles[i] == "duplicate", order[i]))
    roles = [roles[i] for i in slots] + ["test_only"] * n_test_only
    # Chains: round-robin over the chained hotels so each chain has several; unchained ones among the regular
    # (the first of them absent from hotel_info.csv, so it must survive cleaning to test the "Unknown" folder).
    regular = [i for i, role in enumerate(roles) if role == "regular"]
    unchained = {int(i) for i in rng.choice(regular, size=spec["unchained"], replace=False)}
    unlisted = min(unchained)
    chained = [i for i in range(len(roles)) if i not in unchained]
    chain_of = {i: chain_ids[k % len(chain_ids)] for k, i in enumerate(rng.permutation(chained).tolist())}
    copies = dict(
        zip(
            [i for i, role in enumerate(roles) if role == "duplicate"],
            [i for i, role in enumerate(roles) if role == "original"],
            strict=True,
        )
    )  # copy's index -> original's index
    for copy, original in copies.items():
        chain_of[copy] = chain_of[original]  # the same hotel listed twice: same chain
    counts = []
    for role in roles:
        low, high = spec["few_images"] if role == "few" else spec["images"]
        counts.append(0 if role == "test_only" else int(rng.integers(low, high + 1)))
    for copy, original in copies.items():
        counts[copy] = counts[original]
    n_images = sum(counts) + len(roles) * spec["test_images"]
    image_ids = iter(int(i) for i in rng.choice(np.arange(1_000_000, 4_000_000), size=n_images, replace=False))
    hotels: list[PlannedHotel] = []
    for i, role in enumerate(roles):
        n = counts[i]
        original = hotels[copies[i]] if i in copies else None
        if original is not None:
            train = tuple((next(image_ids), source, ext) for _, source, ext in original.train)
        else:
            traffickcam = int(np.clip(round(n * rng.uniform(0.3, 0.5)), min(2, n // 2), max(n - 2, 0)))
            sources = [SOURCES[0]] * traffickcam + [SOURCES[1]] * (n - traffickcam)
            exts = [
                "jpg" if s == SOURCES[0] else str(rng.choice(["jpg", "jpg", "jpg", "jpeg", "png"])) for s in sources
            ]
            train = tuple((next(image_ids), s, e) for s, e in zip(sources, exts, strict=True))
        hotels.append(
            PlannedHotel(
                hotel_id=hotel_ids[i],
                chain_id=-1 if i in unchained else chain_of[i],
                listed=i != unlisted,
                role="regular" if role == "original" else role,
                train=train,
                test=tuple(next(image_ids) for _ in range(spec["test_images"])),
                copy_of=None if original is None else original.hotel_id,
            )
        )
    # Faults, on regular hotels that are not duplicated and keep >= 9 images: one missing and one corrupt training
    # file, one test image missing at the high level.
    copied = {h.copy_of for h in hotels if h.copy_of is not None}
    hosts = [h for h in hotels if h.role == "regular" and h.hotel_id not in copied and len(h.train) >= 10]
    hosts = hosts or [h for h in hotels if h.role == "regular" and h.hotel_id not in copied]
    picks = rng.choice(len(hosts), size=min(3, len(hosts)), replace=False)
    missing_host, corrupt_host, test_host = (hosts[int(p)] for p in np.resize(picks, 3))
    return SyntheticPlan(
        chains=chains,
        hotels=tuple(hotels),
        missing=(missing_host.train[-1][0],),
        corrupt=(corrupt_host.train[-2][0],),
        missing_test={"high": (test_host.test[0],)},
    )


# drawing -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Look:
    """How a hotel's rooms look: the chain's palette and décor (or the hotel's own when unchained), the hotel's
    carpet (tinting the chain's floor), layout and motifs (shape, frame colour, shape colour)."""

    wall: np.ndarray
    floor: np.ndarray
    accent: np.ndarray  # headboard and wall-stripe colour
    stripes: float  # wall stripe period as a fraction of the width; 0: plain walls
    headboard: str  # "flat", "arched" or "tall"
    horizon: float  # floor line, fraction of the height
    bed_x: float  # bed centre, fraction of the width
    bedspread: np.ndarray
    window_x: float  # window centre, fraction of the width
    motifs: tuple[tuple[str, np.ndarray, np.ndarray], ...]


def _chain_style(rng: np.random.Generator, *, stripes: bool) -> dict[str, Any]:
    return {
        "wall": rng.uniform(110, 215, 3).astype(np.float32),
        "floor": rng.uniform(40, 150, 3).astype(np.float32),
        "accent": PALETTE[int(rng.integers(len(PALETTE)))] * rng.uniform(0.6, 0.9),
        "stripes": float(rng.uniform(0.06, 0.16)) if stripes else 0.0,
        "headboard": str(rng.choice(["flat", "arched", "tall"])),
        "bedspread": BEDSPREADS[int(rng.integers(len(BEDSPREADS)))],
    }


def _hotel_look(rng: np.random.Generator, style: dict[str, Any], motifs: int = 4) -> Look:
    drawn = []
    shapes = rng.choice(len(SHAPES), size=motifs, replace=False)
    for shape in shapes:
        frame, colour = rng.choice(len(PALETTE), size=2, replace=False)
        drawn.append((SHAPES[int(shape)], PALETTE[int(frame)], PALETTE[int(colour)]))
    # The hotel's own carpet, tinting the chain's floor colour: a cue of the hotel spread over the lower part of
    # every photo, so that some of it usually shows around an occluder (the motifs, small, are hidden more often).
    carpet = rng.uniform(30, 170, 3).astype(np.float32)
    return Look(
        **{**style, "floor": (0.35 * style["floor"] + 0.65 * carpet).astype(np.float32)},
        horizon=float(rng.uniform(0.58, 0.72)),
        bed_x=float(rng.uniform(0.3, 0.7)),
        window_x=float(rng.choice([rng.uniform(0.1, 0.25), rng.uniform(0.75, 0.9)])),
        motifs=tuple(drawn),
    )


def _shape(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean (H, W) mask of a motif shape of radius `r` around (`cy`, `cx`)."""
    dy, dx = yy - cy, xx - cx
    box = (np.abs(dy) < r) & (np.abs(dx) < r)
    if kind == "disc":
        return disc(yy, xx, cy, cx, r)
    if kind == "square":
        return (np.abs(dy) < 0.8 * r) & (np.abs(dx) < 0.8 * r)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) < r
    if kind == "ring":
        return disc(yy, xx, cy, cx, r) & ~disc(yy, xx, cy, cx, 0.5 * r)
    if kind == "triangle":
        return (dy > -r) & (dy < 0.8 * r) & (np.abs(dx) < 0.6 * (dy + r))
    if kind == "cross":
        return box & ((np.abs(dx) < 0.3 * r) | (np.abs(dy) < 0.3 * r))
    if kind == "hbars":
        return box & (np.floor((dy + r) / (0.5 * r)) % 2 == 0)
    if kind == "vbars":
        return box & (np.floor((dx + r) / (0.5 * r)) % 2 == 0)
    return box & ((np.floor((dy + r) / (0.67 * r)) + np.floor((dx + r) / (0.67 * r))) % 2 == 0)  # checker


def _motif(image, yy, xx, cy, cx, r, motif, rng) -> None:
    """A framed motif (a painting, a cushion, a lamp shade) drawn in place."""
    kind, frame, colour = motif
    light = rng.uniform(0.85, 1.1)
    frame_box = (np.abs(yy - cy) < 1.25 * r) & (np.abs(xx - cx) < 1.25 * r)
    image[frame_box] = frame * light + rng.normal(0, 4, 3)
    image[_shape(kind, yy, xx, cy, cx, r)] = colour * light + rng.normal(0, 4, 3)


def room_image(rng: np.random.Generator, look: Look, source: str, height: int, width: int) -> np.ndarray:
    """One photo (uint8 (H, W, 3)) of one of the hotel's rooms, taken as `source` takes them.

    Wall (chain colour, stripes) over floor; a window and a bed with the chain's headboard; 2-4 of the hotel's 4
    motifs and 1-2 random ones (distractors from the same shapes and colours), each at a random non-overlapping
    place anywhere in the picture; a random camera pan. TraffickCam: darker, warm cast, strong noise.
    """
    yy, xx = pixel_grid(height, width)
    image = np.empty((height, width, 3), np.float32)
    pan = rng.uniform(-0.2, 0.2) * width  # each photo a different view of the room: pan, zoom, tilt
    zoom = rng.uniform(0.8, 1.25)
    horizon = (look.horizon + rng.uniform(-0.08, 0.08)) * height
    image[:] = look.wall + rng.normal(0, 6, 3)
    if look.stripes:
        period = look.stripes * width
        stripes = ((xx - pan) / period) % 1 < 0.35
        image[stripes] = 0.75 * image[stripes] + 0.25 * look.accent
    image[yy >= horizon] = look.floor + rng.normal(0, 6, 3)
    image += (yy / height * rng.uniform(-25, 10))[..., None]  # light falling off towards the floor
    # window: sky and frame, on the hotel's side of the room
    wx, ww = look.window_x * width + pan, 0.18 * zoom * width
    window = (np.abs(xx - wx) < ww / 2) & (yy > 0.1 * height) & (yy < horizon - 0.25 * height)
    image[window] = np.array((190, 215, 240)) + rng.normal(0, 5, 3)
    image[window & ((np.abs(xx - wx) < 0.02 * width) | (np.abs(xx - wx) > ww / 2 - 0.02 * width))] = 235
    # bed: headboard against the wall, bedspread over the floor line (both chain décor)
    bx, bw = look.bed_x * width + pan, 0.45 * zoom * width
    head_top = horizon - {"flat": 0.12, "arched": 0.16, "tall": 0.26}[look.headboard] * zoom * height
    headboard = (np.abs(xx - bx) < bw / 2) & (yy > head_top) & (yy < horizon)
    if look.headboard == "arched":
        headboard &= (xx - bx) ** 2 / (bw / 2) ** 2 + (yy - horizon) ** 2 / (horizon - head_top) ** 2 < 1
    image[headboard] = look.accent
    bed = (np.abs(xx - bx) < bw / 2) & (yy > horizon - 0.04 * height) & (yy < horizon + 0.22 * zoom * height)
    image[bed] = look.bedspread + rng.normal(0, 5, 3)
    # motifs: the hotel's (identity) and distractors, spread over the whole picture
    side = min(height, width)
    shown = [look.motifs[int(i)] for i in rng.choice(len(look.motifs), size=int(rng.integers(2, 5)), replace=False)]
    for _ in range(int(rng.integers(1, 3))):
        frame, colour = rng.choice(len(PALETTE), size=2, replace=False)
        shown.append((SHAPES[int(rng.integers(len(SHAPES)))], PALETTE[int(frame)], PALETTE[int(colour)]))
    placed: list[tuple[float, float, float]] = []
    for motif in shown:
        r = rng.uniform(0.075, 0.1) * zoom * side
        for _ in range(20):  # rejection sampling for a free place
            cy, cx = rng.uniform(1.3 * r, height - 1.3 * r), rng.uniform(1.3 * r, width - 1.3 * r)
            if all((cy - y) ** 2 + (cx - x) ** 2 > (1.3 * (r + q) * 1.2) ** 2 for y, x, q in placed):
                break
        placed.append((cy, cx, r))
        _motif(image, yy, xx, cy, cx, r, motif, rng)
    if source == "traffickcam":  # a phone at night: dark, warm light, sensor noise
        image *= rng.uniform(0.5, 0.8) * np.array([1.0, rng.uniform(0.85, 0.95), rng.uniform(0.65, 0.85)])
        image += rng.normal(0, rng.uniform(9, 15), image.shape)
    else:  # a professional photo: bright and clean
        image = (image - 128) * rng.uniform(1.0, 1.15) + 128 * rng.uniform(1.0, 1.12)
        image += rng.normal(0, 2.5, image.shape)
    return to_uint8(image)


def _capsule(mask: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], r: float) -> None:
    """Mark in `mask` the pixels within `r` of the segment p0-p1 (points as (y, x)), computed in its bounding box."""
    (y0, x0), (y1, x1) = p0, p1
    top, bottom = max(int(min(y0, y1) - r), 0), min(int(max(y0, y1) + r) + 2, mask.shape[0])
    left, right = max(int(min(x0, x1) - r), 0), min(int(max(x0, x1) + r) + 2, mask.shape[1])
    if bottom <= top or right <= left:
        return
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32)
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
    mask[top:bottom, left:right] |= (yy - y0 - t * dy) ** 2 + (xx - x0 - t * dx) ** 2 < r * r


def person_pose(rng: np.random.Generator) -> dict[str, float]:
    """A random standing pose, in fractions of the figure's height."""
    return {
        "head": rng.uniform(0.075, 0.095),
        "head_dx": rng.uniform(-0.03, 0.03),
        "shoulders": rng.uniform(0.11, 0.15),
        "hips": rng.uniform(0.08, 0.11),
        "waist": rng.uniform(0.5, 0.56),
        "arm_left": rng.uniform(-0.2, 1.5),  # radians away from hanging straight down
        "arm_right": rng.uniform(-0.2, 1.5),
        "arm": rng.uniform(0.035, 0.05),
        "leg_left": rng.uniform(0.0, 0.3),
        "leg_right": rng.uniform(0.0, 0.3),
        "leg": rng.uniform(0.05, 0.065),
    }


def person_silhouette(pose: dict[str, float], height: int) -> np.ndarray:
    """Boolean (height, ~0.8 height) mask of a person: a head disc on a torso, arms and legs (capsules), cut to
    the columns it covers."""
    h = float(height)
    width = max(3, round(0.8 * h))
    yy, xx = pixel_grid(height, width)
    cx = width / 2
    head_r = pose["head"] * h
    head = (0.01 * h + head_r, cx + pose["head_dx"] * h)
    mask = disc(yy, xx, *head, head_r)
    _capsule(mask, head, (0.24 * h, cx), 0.035 * h)  # neck
    top, waist = 0.2 * h, pose["waist"] * h
    t = np.clip((yy - top) / (waist - top), 0, 1)
    half = pose["shoulders"] * h * (1 - t) + pose["hips"] * h * t
    mask |= (yy >= top) & (yy <= waist) & (np.abs(xx - cx) < half)
    arm_length, leg_length = 0.36 * h, 0.97 * h - waist
    for side, key in ((-1, "arm_left"), (1, "arm_right")):
        shoulder = (top + 0.03 * h, cx + side * (pose["shoulders"] * h - pose["arm"] * h))
        angle = pose[key]
        hand = (shoulder[0] + arm_length * np.cos(angle), shoulder[1] + side * arm_length * np.sin(angle))
        _capsule(mask, shoulder, hand, pose["arm"] * h)
    for side, key in ((-1, "leg_left"), (1, "leg_right")):
        hip = (waist - 0.02 * h, cx + side * 0.5 * pose["hips"] * h)
        angle = pose[key]
        foot = (hip[0] + leg_length * np.cos(angle), hip[1] + side * leg_length * np.sin(angle))
        _capsule(mask, hip, foot, pose["leg"] * h)
    columns = np.flatnonzero(mask.any(0))
    return mask[:, columns[0] : columns[-1] + 1]


def people_crop(rng: np.random.Generator, height: int) -> np.ndarray:
    """A people crop as the tarball holds them: grayscale uint8, white (255) around a dark figure (< 255)."""
    mask = person_silhouette(person_pose(rng), height)
    margin = max(1, height // 20)
    crop = np.full((mask.shape[0] + 2 * margin, mask.shape[1] + 2 * margin), 255, np.uint8)
    figure = rng.uniform(10, 90) + rng.normal(0, 12, mask.shape)
    crop[margin:-margin, margin:-margin][mask] = np.clip(figure, 0, 200).astype(np.uint8)[mask]
    return crop


def occlusion_people(
    rng: np.random.Generator, height: int, width: int, fraction: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """People in front of a test image covering a fraction drawn uniformly from `fraction` of it: an occluded
    mask (bool (H, W)) and the people's colours (float (H, W, 3)), drawn independently of the hotel.

    Figures are added, each sized for the area still missing (large ones are cut by the border), until the target
    is reached; a figure that would overshoot the range is redrawn smaller.
    """
    low, high = fraction
    target = rng.uniform(low, high)
    occluded = np.zeros((height, width), bool)
    colours = np.zeros((height, width, 3), np.float32)
    for _ in range(12):
        covered = occluded.mean()
        if covered >= target:
            break
        pose = person_pose(rng)
        probe = person_silhouette(pose, 40)
        area = probe.sum() / 40**2  # the figure's area / its height squared
        need = (target - covered) * height * width * rng.uniform(1.0, 1.6)  # border cuts and overlaps
        size = max(float(np.sqrt(need / area)), 0.4 * height)  # no specks: people are large in a room photo
        for _ in range(8):
            figure = person_silhouette(pose, max(8, min(round(size), 4 * max(height, width))))
            fh, fw = figure.shape
            top = int(rng.integers(-fh // 3, height - fh // 2 + 1)) if fh < 2 * height else int(-fh // 4)
            left = int(rng.integers(-fw // 2, width - fw // 2 + 1))
            placed = np.zeros_like(occluded)
            y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + fh, height), min(left + fw, width)
            if y1 <= y0 or x1 <= x0:
                continue
            placed[y0:y1, x0:x1] = figure[y0 - top : y1 - top, x0 - left : x1 - left]
            if (occluded | placed).mean() <= high:
                new = placed & ~occluded
                clothes = rng.uniform(20, 220, 3)
                colours[new] = clothes + rng.normal(0, 10, (int(new.sum()), 3))
                occluded |= placed
                break
            size *= 0.75
    return occluded, colours


# writing -------------------------------------------------------------------------------------------------------------


def _encode(image: np.ndarray, ext: str, source: str) -> bytes:
    buffer = io.BytesIO()
    if ext == "png":
        Image.fromarray(image).save(buffer, format="PNG")
    else:
        Image.fromarray(image).save(buffer, format="JPEG", quality=80 if source == "traffickcam" else 92)
    return buffer.getvalue()


def _url(rng: np.random.Generator, hotel_id: int, source: str, ext: str) -> tuple[str, str]:
    """A plausible image URL and upload timestamp (m/d/yy H:MM) for one image."""
    year, month, day = int(rng.integers(2015, 2019)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    hour, minute, second = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    stamp = f"{month}/{day}/{year % 100} {hour}:{minute:02d}"
    token = "".join(rng.choice(list(string.ascii_uppercase + string.digits), size=6))
    if source == "traffickcam":
        taken = f"{year}{month:02d}{day:02d}_{hour:02d}{minute:02d}{second:02d}"
        return f"https://traffickcam.com/images/{year}/{month}/{taken}_{token}.jpg", stamp
    a, b = hotel_id // 1000 * 1000, hotel_id // 100 * 100
    return f"https://i.travelapi.com/hotels/{a}/{b}/{hotel_id}/{hotel_id}_{token.lower()}_b.{ext}", stamp


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_synthetic(root: Path, synthetic: dict[str, Any], *, seed: int = 0) -> None:
    """Write a small dataset in the real Hotels-50K layout: the four CSVs, training images (both sources, file
    extensions from the URLs), the test images at the four levels with people masks (pre-masked), the people crops
    tarball, and the faults cleaning must handle (see `synthetic_plan`)."""
    spec = _spec(synthetic)
    plan = synthetic_plan(synthetic, seed=seed)
    root = Path(root)
    size = spec["size"]
    shapes = {"travel_website": (size, round(1.25 * size)), "traffickcam": (round(1.25 * size), size)}
    rng = np.random.default_rng([seed, 1])
    styles = {c: _chain_style(rng, stripes=True) for c in plan.chains}
    looks: dict[int, Look] = {}
    for hotel in plan.hotels:
        if hotel.copy_of is not None:
            looks[hotel.hotel_id] = looks[hotel.copy_of]
            continue
        style = styles[hotel.chain_id] if hotel.chain_id >= 0 else _chain_style(rng, stripes=rng.random() < 0.3)
        looks[hotel.hotel_id] = _hotel_look(rng, style)

    hotel_rows = [
        (h.hotel_id, f"{_name(rng, 3)} {rng.choice(['Hotel', 'Inn', 'Suites', 'Lodge'])}, {_name(rng, 2)}",
         h.chain_id, f"{rng.uniform(-60, 70):.6f}", f"{rng.uniform(-180, 180):.6f}")
        for h in plan.hotels if h.listed
    ]  # fmt: skip
    _write_csv(root / "input/dataset/chain_info.csv", ("chain_id", "chain_name"), sorted(plan.chains.items()))
    _write_csv(
        root / "input/dataset/hotel_info.csv",
        ("hotel_id", "hotel_name", "chain_id", "latitude", "longitude"),
        hotel_rows,
    )
    header = ("image_id", "hotel_id", "image_url", "image_source", "upload_timestamp")
    train_rows, test_rows = [], []
    encoded: dict[int, list[bytes]] = {}
    for hotel in plan.hotels:
        folder = root / "images" / "train" / plan.folder(hotel) / str(hotel.hotel_id)
        files = []
        for k, (image_id, source, ext) in enumerate(hotel.train):
            url, stamp = _url(rng, hotel.hotel_id, source, ext)
            train_rows.append((image_id, hotel.hotel_id, url, source, stamp))
            if hotel.copy_of is not None:
                data = encoded[hotel.copy_of][k]  # byte-identical to the original's image
            else:
                draw = np.random.default_rng([seed, 2, image_id])
                data = _encode(room_image(draw, looks[hotel.hotel_id], source, *shapes[source]), ext, source)
            files.append(data)
            if image_id in plan.missing:
                continue
            path = folder / source / f"{image_id}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"<html>404 Not Found</html>" if image_id in plan.corrupt else data)
        encoded[hotel.hotel_id] = files
        for image_id in hotel.test:
            url, stamp = _url(rng, hotel.hotel_id, "traffickcam", "jpg")
            test_rows.append((image_id, hotel.hotel_id, url, "traffickcam", stamp))
            draw = np.random.default_rng([seed, 3, image_id])
            base = room_image(draw, looks[hotel.hotel_id], "traffickcam", *shapes["traffickcam"])
            for level in LEVELS:
                if image_id in plan.missing_test.get(level, ()):
                    continue
                folder = root / "images" / "test" / LEVEL_FOLDERS[level] / plan.folder(hotel) / str(hotel.hotel_id)
                folder = folder / "traffickcam"
                folder.mkdir(parents=True, exist_ok=True)
                image = base
                if level != "unoccluded":
                    occluded, colours = occlusion_people(draw, *base.shape[:2], OCCLUSION[level])
                    image = base.copy()
                    image[occluded] = to_uint8(colours[occluded])
                    (folder / "masks").mkdir(exist_ok=True)
                    mask = np.where(occluded, 0, 255).astype(np.uint8)
                    Image.fromarray(mask).save(folder / "masks" / f"{image_id}.png")
                Image.fromarray(image).save(folder / f"{image_id}.jpg", format="JPEG", quality=85)
    _write_csv(root / "input/dataset/train_set.csv", header, train_rows)
    _write_csv(root / "input/dataset/test_set.csv", header, test_rows)

    crops = root / CROPS
    # gzip with mtime 0 and fixed member times: the same bytes for the same seed
    with gzip.GzipFile(crops, "wb", mtime=0) as packed, tarfile.open(fileobj=packed, mode="w") as tar:
        for k in range(spec["people_crops"]):
            crop = people_crop(rng, int(rng.integers(size // 2, 2 * size + 1)))
            buffer = io.BytesIO()
            Image.fromarray(crop).save(buffer, format="PNG")
            name = f"people_crops/{'coco/' if k % 2 else ''}{k:04d}.png"  # two folder depths, as any tar may
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(buffer.getvalue()), 1_500_000_000
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    logger.info(
        "synthetic Hotels-50K: %d hotels (%d chains), %d training and %d test images per level, %d people crops",
        len(plan.hotels),
        len(plan.chains),
        len(train_rows),
        len(test_rows),
        spec["people_crops"],
    )
