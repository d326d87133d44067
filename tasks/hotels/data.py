"""Hotels-50K on disk: the layout and its check, the cleaning index, the people-crop occluders and the datasets.

Layout, cleaning and transforms: docs/datasets.md, "Hotels-50K hotel recognition". The CSVs say which images exist
and what they are (hotel, source); the image files are found by walking the tree once and indexing every file by its
image id (the file name before the first dot), so the chain folder ("-1", "Unknown", ...), the source folder and the
extension (the download script keeps the URL's) never have to be rebuilt from the CSV.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import gzip
import hashlib
import io
import json
import logging
import os
import re
import stat
import tarfile
import time
import uuid
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .. import images
from ..common import IMAGENET_MEAN, IMAGENET_STD, log_progress
from ..data import LayoutError
from .presets import HotelsPreset

logger = logging.getLogger(__name__)

LEVELS = ("unoccluded", "low", "medium", "high")  # the occlusion levels, as metric keys name them
LEVEL_FOLDERS = {
    "unoccluded": "unoccluded",
    "low": "low_occlusions",
    "medium": "medium_occlusions",
    "high": "high_occlusions",
}
SOURCES = ("traffickcam", "travel_website")  # `sources` arrays index into this
# Spellings of the two sources seen in folder names and hand-made CSVs (lower case, "-" and " " read as "_").
SOURCE_ALIASES = {
    "traffickcam": "traffickcam",
    "traffick_cam": "traffickcam",
    "trafficcam": "traffickcam",
    "traffic_cam": "traffickcam",
    "tc": "traffickcam",
    "travel_website": "travel_website",
    "travel_websites": "travel_website",
    "travelwebsite": "travel_website",
    "travel": "travel_website",
    "website": "travel_website",
}
CSV_COLUMNS = {
    "chain_info.csv": ("chain_id", "chain_name"),
    "hotel_info.csv": ("hotel_id", "hotel_name", "chain_id", "latitude", "longitude"),
    "train_set.csv": ("image_id", "hotel_id", "image_url", "image_source", "upload_timestamp"),
    "test_set.csv": ("image_id", "hotel_id", "image_url", "image_source", "upload_timestamp"),
}
UNKNOWN_CHAIN = -1
CROPS = "images/people_crops.tar.gz"
LAYOUT = (
    "ROOT/input/dataset/{chain_info,hotel_info,train_set,test_set}.csv   with header rows:\n"
    "     chain_info: chain_id,chain_name   hotel_info: hotel_id,hotel_name,chain_id,latitude,longitude\n"
    "     train_set/test_set: image_id,hotel_id,image_url,image_source,upload_timestamp\n"
    "ROOT/images/train/<chain_id>/<hotel_id>/<image_source>/<image_id>.<ext>\n"
    "     e.g. ROOT/images/train/-1/79733/traffickcam/2587571.jpg (chain folder 'Unknown' for hotels\n"
    "     missing from hotel_info.csv; ext as in the image URL)\n"
    "ROOT/images/test/{unoccluded,low_occlusions,medium_occlusions,high_occlusions}/<chain_id>/<hotel_id>/"
    "<image_source>/<image_id>.jpg\n"
    "     occluded levels also .../<image_source>/masks/<image_id>.png (pixels < 255 occluded)\n"
    "ROOT/images/people_crops.tar.gz   grayscale PNG people crops (pixels < 255 occluded), at any depth"
)
PEOPLE_MIN_VALID = 255  # a people-crop or test-mask pixel below this is occluded


class Record(NamedTuple):
    """One image of the cleaned index: ids, its canonical source, its file and (occluded test levels) its mask.

    Paths are plain strings: a Path object costs ~4x the memory, which counts at a million records.
    """

    image_id: int
    hotel_id: int
    chain_id: int  # from hotel_info.csv; -1 unknown or hotel not listed there
    source: str  # "traffickcam" or "travel_website"
    path: str
    mask_path: str | None = None


def normalise_source(name: str) -> str:
    """A source name (CSV value or folder name, any case, aliases such as "travel") -> "traffickcam" or
    "travel_website"; anything else raises `LayoutError` listing the accepted names."""
    key = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    try:
        return SOURCE_ALIASES[key]
    except KeyError:
        raise LayoutError(
            f"unknown image source {name!r}: expected one of {', '.join(SOURCES)} "
            f"(also accepted: {', '.join(sorted(set(SOURCE_ALIASES) - set(SOURCES)))}; case, '-' and ' ' ignored)"
        ) from None


# layout --------------------------------------------------------------------------------------------------------------


def _csv_path(root: Path, name: str) -> Path:
    return Path(root) / "input" / "dataset" / name


def _header_problem(path: Path) -> str | None:
    """Why the CSV's header row lacks the expected columns, or None."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = [c.strip().lower() for c in next(csv.reader(f), [])]
    missing = [c for c in CSV_COLUMNS[path.name] if c not in header]
    if missing:
        return f"{path} has header {','.join(header) or '(empty)'}, lacking column(s) {', '.join(missing)}"
    return None


def _any_file(folder: Path) -> bool:
    """Whether any regular file lies anywhere under `folder` (stops at the first one)."""
    for _, _, files in os.walk(folder):
        if files:
            return True
    return False


def check_layout(root: Path) -> None:
    """Raise `LayoutError` showing the expected layout unless `root` holds the Hotels-50K files: the four CSVs (with
    their columns), images under images/train, the four test level folders and the people crops tarball."""
    root = Path(root)
    problems = []
    for name in CSV_COLUMNS:
        path = _csv_path(root, name)
        if not path.is_file():
            problems.append(f"missing CSV {path}")
        elif problem := _header_problem(path):
            problems.append(problem)
    train = root / "images" / "train"
    if not train.is_dir():
        problems.append(f"missing folder {train}")
    elif not _any_file(train):
        problems.append(f"no images under {train}")
    for level, folder in LEVEL_FOLDERS.items():
        path = root / "images" / "test" / folder
        if not path.is_dir():
            problems.append(f"missing test folder {path} ({level} occlusion)")
    if not (root / CROPS).is_file():
        problems.append(f"missing people crops tarball {root / CROPS}")
    if problems:
        raise LayoutError(
            f"{root} does not look like a Hotels-50K dataset: {'; '.join(problems)}.\nExpected layout:\n{LAYOUT}"
        )


# the index and its cleaning ------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV as dicts keyed by the stripped, lower-cased header names."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [c.strip().lower() for c in next(reader, [])]
        for row in reader:
            if row and any(cell.strip() for cell in row):
                yield dict(zip(header, (cell.strip() for cell in row), strict=False))


def _int(value: str | None, default: int = UNKNOWN_CHAIN) -> int:
    """An id cell as an int ("12", "12.0"); a blank cell -> `default`."""
    if value is None or not value.strip():
        return default
    return int(float(value))


def _walk_files(folder: Path) -> tuple[dict[int, str], dict[int, str], int]:
    """Index every file under `folder` by image id (the name before the first dot; non-numeric names skipped):
    images, and the masks (files in a folder named "masks"). Folders are walked in sorted order, so when two
    files carry the same id the first in path order wins, on every machine; the third value counts the others."""
    images: dict[int, str] = {}
    masks: dict[int, str] = {}
    clashes = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        target = masks if os.path.basename(dirpath) == "masks" else images
        for name in sorted(filenames):
            stem = name.split(".", 1)[0]
            if not stem.isdigit():
                continue  # .DS_Store, Thumbs.db, bad_files.txt, ...
            if int(stem) in target:
                clashes += 1
                continue
            target[int(stem)] = os.path.join(dirpath, name)
    return images, masks, clashes


def _check_file(path: str) -> tuple[str | None, int]:
    """(None, size) for a regular file PIL opens and verifies, else (why not, -1). Reads headers only: a JPEG
    truncated after its header passes (verify() does not decode JPEG data); a broken link is "missing"."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a fifo or device would block open()
            return "unreadable: not a regular file", -1
        with Image.open(path) as image:
            image.verify()
        return None, info.st_size
    except FileNotFoundError:
        return "missing", -1
    except Exception as error:  # PIL raises UnidentifiedImageError, SyntaxError, OSError, ValueError, ...
        return f"unreadable: {type(error).__name__}: {error}", -1


def _parallel(function, items: list, *, what: str, workers: int, chunk: int = 4096) -> list:
    """`function` over `items` in threads (file I/O releases the GIL), in order, with progress logging; submitted
    a chunk at a time, so a million items never hold a million futures."""

    def chunks() -> Iterator:
        for start in range(0, len(items), chunk):
            yield from pool.map(function, items[start : start + chunk])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(log_progress(chunks(), total=len(items), what=what, logger=logger))


def _sha1(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


@dataclass
class HotelsIndex:
    """The cleaned dataset: training records, test records per level, what each cleaning step removed.

    `counts` holds every step's numbers (also logged); `skipped` lists the images of step 1 as dicts (split,
    image_id, hotel_id, reason, path); `duplicates` maps each dropped duplicate hotel to the hotel kept in its place;
    `too_few` maps each training hotel dropped for fewer than `min_images` images to its image count; `untrained`
    holds the test hotels dropped because they are not in the cleaned training set.
    """

    root: Path
    min_images: int
    train: list[Record]
    test: dict[str, list[Record]]
    counts: dict[str, int]
    skipped: list[dict[str, object]] = field(default_factory=list)
    duplicates: dict[int, int] = field(default_factory=dict)
    too_few: dict[int, int] = field(default_factory=dict)
    untrained: set[int] = field(default_factory=set)
    chains: dict[int, str] = field(default_factory=dict)

    @property
    def train_hotels(self) -> list[int]:
        """The cleaned training hotels, sorted."""
        return sorted({r.hotel_id for r in self.train})

    def skipped_csv(self) -> str:
        """The images skipped in step 1 (missing or unreadable) as CSV text, e.g. to log as an artifact."""
        return skipped_csv(self.skipped)

    def write_skipped(self, path: Path) -> None:
        """Write `skipped_csv()` to `path`."""
        Path(path).write_text(self.skipped_csv())


SKIPPED_COLUMNS = ("split", "image_id", "hotel_id", "reason", "path")


def skipped_csv(skipped: Iterable[dict[str, object]]) -> str:
    """The skipped-image list as CSV text with columns split, image_id, hotel_id, reason, path."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SKIPPED_COLUMNS)
    writer.writeheader()
    writer.writerows(skipped)
    return text.getvalue()


def load_index(
    root: Path, *, min_images: int, workers: int | None = None, cache_dir: Path | None = None
) -> HotelsIndex:
    """Read the CSVs, find every listed image on disk and clean the dataset (the thesis' steps, in this order):

    1. images listed but missing on disk, or unreadable (PIL cannot open/verify them; a test mask likewise):
       skipped, counted and listed in `skipped`, never fatal;
    2. duplicated hotels, whose sets of training images are identical in content (sha1 of the file bytes): one
       hotel per group is kept (the smallest hotel_id); the others' training and test images are dropped;
    3. training hotels with fewer than `min_images` training images are dropped;
    4. only hotels of the cleaned training set are tested.

    Scale (Hotels-50K: ~1M training images, 50K hotels): one os.walk of the tree, one CSV pass, a header check of
    every listed file (threads), and content hashes only for hotels whose set of file sizes (from the same stat)
    equals another hotel's: equal image sets have equal size sets, and distinct photos rarely share every size,
    so only likely duplicates are read in full. That still takes minutes, and the sweep driver and every training
    worker of every trial need the index, so with `cache_dir` the result is stored there once per dataset and
    `min_images` (`index_cache_path`, gzip'ed JSON, written atomically) and read back while `index_cache_key` is
    unchanged; a missing, stale or unreadable entry is recomputed (the last with a warning) and rewritten. One log
    line says which happened, with the file's path. Without `cache_dir` the index is always computed. Nothing is
    ever written under `root` (it may be read-only).
    """
    if cache_dir is None:
        return _clean_index(Path(root), min_images=min_images, workers=workers)
    path = index_cache_path(root, min_images=min_images, cache_dir=cache_dir)
    key = index_cache_key(root, min_images=min_images)  # before cleaning: a change made meanwhile is seen next time
    index, why = _read_index_cache(path, Path(root), key)
    if index is not None:
        logger.info("hotels index: loaded from the cache %s (delete the file to force a recompute)", path)
        return index
    started = time.perf_counter()
    index = _clean_index(Path(root), min_images=min_images, workers=workers)
    stored = _write_index_cache(path, key, index)
    logger.info(
        "hotels index: computed in %.1f s (%s); %s",
        time.perf_counter() - started,
        why,
        f"cached at {path}" if stored else f"not cached, see the warning above ({path})",
    )
    return index


def _clean_index(root: Path, *, min_images: int, workers: int | None) -> HotelsIndex:
    """`load_index`'s work, the four cleaning steps, always computed; nothing cached."""
    root = Path(root)
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    counts: dict[str, int] = {}
    chains = {_int(r.get("chain_id")): r.get("chain_name", "") for r in _read_csv(_csv_path(root, "chain_info.csv"))}
    hotel_chain = {_int(r["hotel_id"]): _int(r.get("chain_id")) for r in _read_csv(_csv_path(root, "hotel_info.csv"))}

    def rows(name: str) -> list[tuple[int, int, str]]:
        """(image_id, hotel_id, canonical source) of a CSV's rows; an unknown source or a non-numeric id is an
        error naming the file and row."""
        out = []
        for number, row in enumerate(_read_csv(_csv_path(root, name)), 1):
            source = row.get("image_source", "")
            try:
                out.append((_int(row["image_id"]), _int(row["hotel_id"]), normalise_source(source) if source else ""))
            except (KeyError, ValueError) as error:
                raise LayoutError(f"{_csv_path(root, name)}, data row {number} {row}: {error}") from None
        return out

    train_rows, test_rows = rows("train_set.csv"), rows("test_set.csv")
    counts["csv/train_images"], counts["csv/test_images"] = len(train_rows), len(test_rows)
    counts["csv/train_hotels"] = len({h for _, h, _ in train_rows})
    counts["csv/test_hotels"] = len({h for _, h, _ in test_rows})

    # Step 1: find each listed file, check it opens. Test rows are looked up in every level's tree.
    trees = {"train": root / "images" / "train"}
    trees.update({f"test/{level}": root / "images" / "test" / LEVEL_FOLDERS[level] for level in LEVELS})
    skipped: list[dict[str, object]] = []
    found: dict[str, list[Record]] = {}
    sizes: dict[str, int] = {}
    for split, tree in trees.items():
        images, masks, clashes = _walk_files(tree)
        if clashes:
            logger.warning(
                "%s: %d files share an image id with another file; the first in path order is used", tree, clashes
            )
        wanted = train_rows if split == "train" else test_rows
        masked = split not in ("train", "test/unoccluded")
        candidates, checks = [], []
        for image_id, hotel_id, source in wanted:
            path = images.get(image_id)
            mask = masks.get(image_id) if masked else None
            if path is None or (masked and mask is None):
                what = "missing" if path is None else "mask missing"
                where = path or ""
                skipped.append(dict(split=split, image_id=image_id, hotel_id=hotel_id, reason=what, path=where))
                continue
            if not source:  # a blank CSV cell: the source folder names it
                source = normalise_source(os.path.basename(os.path.dirname(path)))
            chain = hotel_chain.get(hotel_id, UNKNOWN_CHAIN)
            candidates.append(Record(image_id, hotel_id, chain, source, path, mask))
            checks.extend([path, mask] if masked else [path])
        checked = _parallel(_check_file, checks, what=f"checking {split} files", workers=workers)
        results = dict(zip(checks, checked, strict=True))
        kept = []
        for record in candidates:
            problems = [(p, results[p][0]) for p in (record.path, record.mask_path) if p is not None and results[p][0]]
            if problems:
                where, why = problems[0]
                why = why if where == record.path else f"mask {why}"
                skipped.append(
                    dict(split=split, image_id=record.image_id, hotel_id=record.hotel_id, reason=why, path=where)
                )
                continue
            kept.append(record)
            sizes[record.path] = results[record.path][1]
        found[split] = kept
    for split in trees:
        of_split = [s for s in skipped if s["split"] == split]
        counts[f"step1/{split}/missing"] = sum(s["reason"] in ("missing", "mask missing") for s in of_split)
        counts[f"step1/{split}/unreadable"] = len(of_split) - counts[f"step1/{split}/missing"]
    logger.info(
        "cleaning 1 (missing or unreadable files): %d of %d training images skipped (%d missing, %d unreadable); "
        "test: %s",
        len([s for s in skipped if s["split"] == "train"]),
        len(train_rows),
        counts["step1/train/missing"],
        counts["step1/train/unreadable"],
        ", ".join(f"{level} {len(test_rows) - len(found[f'test/{level}'])} of {len(test_rows)}" for level in LEVELS),
    )

    # Step 2: duplicated hotels. Size sets first (free), content hashes only where size sets collide.
    train = found["train"]
    by_hotel: dict[int, list[Record]] = defaultdict(list)
    for record in train:
        by_hotel[record.hotel_id].append(record)
    by_sizes: dict[frozenset[int], list[int]] = defaultdict(list)
    for hotel, records in by_hotel.items():
        by_sizes[frozenset(sizes[r.path] for r in records)].append(hotel)
    suspects = sorted(h for hotels in by_sizes.values() if len(hotels) > 1 for h in hotels)
    to_hash = [r.path for h in suspects for r in by_hotel[h]]
    hashed = _parallel(_sha1, to_hash, what="hashing possible duplicate hotels", workers=workers)
    hashes = dict(zip(to_hash, hashed, strict=True))
    by_content: dict[frozenset[str], list[int]] = defaultdict(list)
    for hotel in suspects:
        by_content[frozenset(hashes[r.path] for r in by_hotel[hotel])].append(hotel)
    duplicates = {h: min(group) for group in by_content.values() if len(group) > 1 for h in group if h != min(group)}
    test = {level: found[f"test/{level}"] for level in LEVELS}
    counts["step2/groups"] = sum(len(g) > 1 for g in by_content.values())
    counts["step2/hotels_dropped"] = len(duplicates)
    counts["step2/train_images_dropped"] = sum(r.hotel_id in duplicates for r in train)
    counts["step2/test_images_dropped"] = sum(r.hotel_id in duplicates for level in LEVELS for r in test[level])
    train = [r for r in train if r.hotel_id not in duplicates]
    test = {level: [r for r in records if r.hotel_id not in duplicates] for level, records in test.items()}
    logger.info(
        "cleaning 2 (duplicated hotels): %d groups of hotels with identical training images (%d hotels hashed); "
        "%d hotels dropped with %d training and %d test images (all levels): %s",
        counts["step2/groups"],
        len(suspects),
        len(duplicates),
        counts["step2/train_images_dropped"],
        counts["step2/test_images_dropped"],
        ", ".join(f"{d} (as {k})" for d, k in sorted(duplicates.items())) or "none",
    )

    # Step 3: hotels with too few training images.
    per_hotel: dict[int, int] = defaultdict(int)
    for record in train:
        per_hotel[record.hotel_id] += 1
    too_few = {h: n for h, n in sorted(per_hotel.items()) if n < min_images}
    counts["step3/hotels_dropped"] = len(too_few)
    counts["step3/train_images_dropped"] = sum(too_few.values())
    train = [r for r in train if r.hotel_id not in too_few]
    logger.info(
        "cleaning 3 (fewer than %d training images): %d hotels dropped with %d images",
        min_images,
        len(too_few),
        sum(too_few.values()),
    )

    # Step 4: test only hotels of the cleaned training set.
    trained = {r.hotel_id for r in train}
    untrained = {r.hotel_id for level in LEVELS for r in test[level]} - trained
    for level in LEVELS:
        counts[f"step4/{level}/images_dropped"] = sum(r.hotel_id not in trained for r in test[level])
    counts["step4/hotels_dropped"] = len(untrained)
    test = {level: [r for r in records if r.hotel_id in trained] for level, records in test.items()}
    logger.info(
        "cleaning 4 (test hotels absent from the cleaned training set): %d hotels, %s images dropped",
        len(untrained),
        "/".join(str(counts[f"step4/{level}/images_dropped"]) for level in LEVELS),
    )

    counts["train/hotels"], counts["train/images"] = len(trained), len(train)
    for level in LEVELS:
        counts[f"test/{level}/images"] = len(test[level])
        counts[f"test/{level}/hotels"] = len({r.hotel_id for r in test[level]})
    logger.info(
        "cleaned: %d training images of %d hotels; test images %s (%s)",
        len(train),
        len(trained),
        "/".join(str(len(test[level])) for level in LEVELS),
        "/".join(LEVELS),
    )
    return HotelsIndex(
        root=root,
        min_images=min_images,
        train=train,
        test=test,
        counts=counts,
        skipped=skipped,
        duplicates=duplicates,
        too_few=too_few,
        untrained=untrained,
        chains=chains,
    )


# the index cache -----------------------------------------------------------------------------------------------------

# Bump when the cleaning or the cache format changes: every cached index then fails its key and is recomputed.
INDEX_CACHE_VERSION = 1
INDEX_CACHE_FOLDER = "hotels-index"  # under the cache dir, e.g. tasks.default_cache_dir()


def index_cache_path(root: Path, *, min_images: int, cache_dir: Path) -> Path:
    """Where `load_index` caches the index of `root` for `min_images` in `cache_dir`:
    CACHE/hotels-index/<root's folder name>-<sha1 of the resolved root>-min<min_images>.json.gz. One entry per
    dataset and `min_images`; a changed key overwrites it, so entries do not pile up as the data changes."""
    resolved = Path(root).resolve()
    digest = hashlib.sha1(os.fsencode(resolved)).hexdigest()[:12]
    name = re.sub(r"[^\w.-]", "_", resolved.name)[:40] or "root"
    return Path(cache_dir) / INDEX_CACHE_FOLDER / f"{name}-{digest}-min{min_images}.json.gz"


def _stat(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file or folder (links followed), None when it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def index_cache_key(root: Path, *, min_images: int) -> dict[str, object]:
    """What decides whether a cached index of `root` is still good, from a few hundred stats (no walk of the images):
    the format version, the resolved root, `min_images`, each CSV's size and mtime_ns, the people-crops tarball's
    size and mtime_ns, and the mtime_ns of images/train, images/test, each test level folder and every folder
    directly inside those (the chain folders). A folder's mtime changes when an entry directly in it is added,
    removed or renamed, so a new download (new CSVs), a chain folder added or removed, a hotel folder added to or
    removed from a training chain folder, or a re-unpacked test tarball is seen.

    Not seen: changes deeper in the tree that leave those folders and the CSVs alone, e.g. an image file replaced,
    deleted or added inside an existing hotel's folder (only its source folder's mtime moves), or a hotel folder
    added inside a test level's chain folder. After such an edit, delete the cache file (`index_cache_path`;
    `load_index` logs it) to force a recompute. The workers count is left out: it does not change the result.
    """
    root = Path(root).resolve()
    csvs = {name: _stat(_csv_path(root, name)) for name in CSV_COLUMNS}
    folders: dict[str, int | None] = {}
    scanned = ["images/train", "images/test", *(f"images/test/{folder}" for folder in LEVEL_FOLDERS.values())]
    for relative in scanned:
        info = _stat(root / relative)
        folders[relative] = None if info is None else info[1]
        try:
            with os.scandir(root / relative) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.is_dir():
                        folders[f"{relative}/{entry.name}"] = entry.stat().st_mtime_ns
        except OSError:
            continue  # missing: None above (check_layout names it)
    return {
        "version": INDEX_CACHE_VERSION,
        "root": os.fsdecode(root),
        "min_images": min_images,
        "csvs": csvs,
        "crops": _stat(root / CROPS),
        "folders": folders,
    }


def _images_prefix(root: Path) -> str:
    """What every path of an index of `root` starts with (the walks start at root/images/...); the cache stores
    paths without it, so an entry is smaller and gives the same paths for another spelling of the same root."""
    return os.path.join(Path(root) / "images", "")


def _strip(path: str, prefix: str) -> str:
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under {prefix}")
    return path[len(prefix) :]


def _records_to_columns(records: list[Record], prefix: str) -> dict[str, list]:
    """Records as one list per field (JSON columns: no field names repeated a million times)."""
    return {
        "image_id": [r.image_id for r in records],
        "hotel_id": [r.hotel_id for r in records],
        "chain_id": [r.chain_id for r in records],
        "source": [r.source for r in records],
        "path": [_strip(r.path, prefix) for r in records],
        "mask_path": [None if r.mask_path is None else _strip(r.mask_path, prefix) for r in records],
    }


def _records_from_columns(columns: dict[str, list], prefix: str) -> list[Record]:
    paths = [prefix + p for p in columns["path"]]
    masks = [None if m is None else prefix + m for m in columns["mask_path"]]
    fields = (columns["image_id"], columns["hotel_id"], columns["chain_id"], columns["source"], paths, masks)
    return list(map(Record._make, zip(*fields, strict=True)))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: building a million small tuples and strings otherwise triggers its full
    passes over them again and again (measured: 1.1M records read back in 1 s instead of 4). None can be cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_index_cache(path: Path, key: dict[str, object], index: HotelsIndex) -> bool:
    """Store `index` under `key` at `path`: gzip'ed JSON written to a uniquely named temporary file in the same
    folder, then renamed over `path` (atomic), so a reader sees the old entry or the new one, never half of one;
    concurrent writers each replace it with a whole, valid entry (the last one wins). A crash leaves at most a
    `.<name>.<random>.tmp` file, which is never read. Failing to write (read-only or full cache folder) is a
    warning, not an error: the index is there, only the next call computes it again. Returns whether it was stored.
    """
    prefix = _images_prefix(index.root)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with _gc_paused():
            document = {
                "key": key,
                "prefix": prefix,
                "min_images": index.min_images,
                "train": _records_to_columns(index.train, prefix),
                "test": {level: _records_to_columns(records, prefix) for level, records in index.test.items()},
                "counts": index.counts,
                "skipped": [{**s, "path": s["path"] and _strip(str(s["path"]), prefix)} for s in index.skipped],
                "duplicates": sorted(index.duplicates.items()),
                "too_few": sorted(index.too_few.items()),
                "untrained": sorted(index.untrained),
                "chains": sorted(index.chains.items()),
            }
            data = gzip.compress(json.dumps(document, separators=(",", ":")).encode(), compresslevel=3, mtime=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        return True
    except (OSError, ValueError) as error:
        logger.warning("hotels index: could not cache it at %s: %s: %s", path, type(error).__name__, error)
        try:
            os.unlink(temporary)
        except OSError:
            pass
        return False


def _read_index_cache(path: Path, root: Path, key: dict[str, object]) -> tuple[HotelsIndex | None, str]:
    """The index cached at `path` when its key equals `key`, else None and why it is recomputed. An unreadable or
    corrupt file (truncated, not gzip, not our JSON) is a warning and a recompute, never an error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"no cache entry at {path}"
    except OSError as error:
        logger.warning("hotels index: cannot read the cache %s (%s); recomputing", path, error)
        return None, "cache unreadable"
    try:
        document = json.loads(gzip.decompress(data))
        if document["key"] != key:
            stored = document["key"] if isinstance(document["key"], dict) else {}
            changed = [part for part in key if stored.get(part) != key[part]]
            return None, f"cache key changed ({', '.join(changed)}) since {path} was written"
        with _gc_paused():
            return _index_from_document(document, Path(root)), "loaded"
    except Exception as error:  # gzip, zlib, JSON, a missing or mistyped field: whatever it is, recompute
        logger.warning(
            "hotels index: the cache %s is corrupt (%s: %s); recomputing it", path, type(error).__name__, error
        )
        return None, "cache corrupt"


def _index_from_document(document: dict, root: Path) -> HotelsIndex:
    """`_write_index_cache`'s document back as the index, its paths under `root` as spelt now (the entry is found
    by the resolved root, so another spelling of the same folder, e.g. through a symlink, reads it too)."""
    prefix = _images_prefix(root)
    skipped = [{**s, "path": s["path"] and prefix + s["path"]} for s in document["skipped"]]
    if document["prefix"] != prefix:  # PIL's messages in the reasons name the paths as spelt when cached
        for s in skipped:
            s["reason"] = s["reason"].replace(document["prefix"], prefix)
    return HotelsIndex(
        root=root,
        min_images=document["min_images"],
        train=_records_from_columns(document["train"], prefix),
        test={level: _records_from_columns(document["test"][level], prefix) for level in LEVELS},
        counts=document["counts"],
        skipped=skipped,
        duplicates=dict(map(tuple, document["duplicates"])),
        too_few=dict(map(tuple, document["too_few"])),
        untrained=set(document["untrained"]),
        chains=dict(map(tuple, document["chains"])),
    )


# people crops and transforms -----------------------------------------------------------------------------------------


def load_people_crops(root: Path) -> list[bytes]:
    """The PNGs of images/people_crops.tar.gz (any folder depth), as encoded bytes, in member-name order.

    Read once when the datasets are built and decoded per use, so DataLoader workers share one list. Members that
    are not PNGs PIL can open (macOS "._" files, broken ones) are left out and counted in the log.
    """
    crops: list[tuple[str, bytes]] = []
    rejected = 0
    with tarfile.open(Path(root) / CROPS, "r:*") as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not name.lower().endswith(".png"):
                continue
            if name.startswith("._"):  # macOS resource forks, not images
                rejected += 1
                continue
            data = tar.extractfile(member).read()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
            except Exception:
                rejected += 1
                continue
            crops.append((member.name, data))
    if not crops:
        raise LayoutError(f"{Path(root) / CROPS} holds no readable PNG people crops.\nExpected layout:\n{LAYOUT}")
    logger.info("people crops: %d PNGs read from %s (%d members left out)", len(crops), CROPS, rejected)
    return [data for _, data in sorted(crops)]


def resize_shorter(image: torch.Tensor, size: int, *, nearest: bool = False) -> torch.Tensor:
    """Resize an image tensor (C, H, W) so the shorter side is `size`: bilinear with antialiasing (as PIL resizes),
    or nearest for masks; uint8 stays uint8."""
    mode = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
    return F.resize(image, [size], interpolation=mode, antialias=True)


def _normalised(pixels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (3, S, S) -> ImageNet-normalised float (3, S, S), occluded pixels (valid == 0) set to 0 (the mean
    colour)."""
    pixels = F.to_dtype(pixels, torch.float32, scale=True)
    return (F.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD) * valid).contiguous()


def _valid_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """A people-crop or test-mask uint8 tensor (1, H, W) (pixels < 255 occluded) -> float (1, H, W), 1 valid, 0
    occluded."""
    return (mask >= PEOPLE_MIN_VALID).float()


def paste_occluder(valid: torch.Tensor, crop: bytes, scale: tuple[float, float]) -> torch.Tensor:
    """Mark a people crop's pixels (< 255) occluded in `valid` (float (1, S, S)), torch's RNG drawing everything:
    a horizontal flip, the crop's longer side as a uniform fraction in `scale` of S (aspect kept), and its centre
    uniformly over the image, the part outside the image cut off."""
    side = valid.shape[-1]
    person = images.decode_bytes(crop, "L")  # uint8 (1, h, w)
    if torch.rand(()).item() < 0.5:
        person = F.horizontal_flip(person)
    fraction = scale[0] + (scale[1] - scale[0]) * torch.rand(()).item()
    height, width = person.shape[-2:]
    longer = max(1, round(fraction * side))
    if height >= width:
        size = [longer, max(1, round(width * longer / height))]
    else:
        size = [max(1, round(height * longer / width)), longer]
    occluded = 1 - _valid_from_mask(F.resize(person, size, antialias=True))[0]
    top = torch.randint(side, ()).item() - size[0] // 2
    left = torch.randint(side, ()).item() - size[1] // 2
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + size[0], side), min(left + size[1], side)
    if y1 > y0 and x1 > x0:
        window = occluded[y0 - top : y1 - top, x0 - left : x1 - left]
        valid[0, y0:y1, x0:x1] *= 1 - window
    return valid


# datasets ------------------------------------------------------------------------------------------------------------


class _Images(Dataset, ABC):
    """Records as compact numpy arrays: paths relative to the root as fixed-width bytes (no per-item Python
    objects, so forked DataLoader workers do not copy them on access), ids as int64, sources as int8.

    Files are decoded whole into uint8 tensors (`images.read_image`, torchvision.io) and transformed as tensors; a
    damaged image or mask is handled as `preset.bad_images` says:
    "skip" serves the next image of the same hotel in its place (`images.BadImages`), so a training batch keeps its
    hotels x images shape. Cleaning (`load_index`) already left out the files whose headers PIL cannot read."""

    def __init__(self, root: Path, records: list[Record], preset: HotelsPreset) -> None:
        self.root = Path(root)
        self.image_size = preset.image_size
        self.resize = max(preset.eval_size, preset.image_size)
        relative = [os.fsencode(os.path.relpath(r.path, self.root)) for r in records]  # short: less memory
        self.paths = np.array(relative or [b""], dtype=bytes)[: len(records)]
        masks = [os.fsencode(os.path.relpath(r.mask_path, self.root)) if r.mask_path else b"" for r in records]
        self.masks = np.array(masks or [b""], dtype=bytes)[: len(records)]
        self.image_ids = np.array([r.image_id for r in records], dtype=np.int64)
        self.hotel_ids = np.array([r.hotel_id for r in records], dtype=np.int64)
        self.chain_ids = np.array([r.chain_id for r in records], dtype=np.int64)
        self.sources = np.array([SOURCES.index(r.source) for r in records], dtype=np.int8)
        self.bad_images = images.BadImages(preset.bad_images)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], object]:
        candidates = partial(images.substitutes, index, len(self), self.hotel_ids)
        return self.bad_images.get(self._load, index, candidates)

    @abstractmethod
    def _load(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], object]:
        """Item `index`; `CorruptImageError` for a damaged image or mask."""

    def _read(self, relative: bytes, mode: str) -> torch.Tensor:
        return images.read_image(self.root / os.fsdecode(relative), mode)


class TrainImages(_Images):
    """Cleaned training images: item -> ((image (3, S, S), mask (1, S, S)), hotel_id).

    Shorter side resized to `preset.eval_size`, a random S x S crop, a random horizontal flip, then with probability
    `preset.occlusion_prob` a people crop pasted as occluder (`paste_occluder`); occluded pixels are 0 after
    normalisation. Everything random comes from torch's RNG, seeded per DataLoader worker.
    `hotel_ids` (int64) and `sources` (int8, indices into SOURCES) are there for the batch sampler.
    """

    def __init__(self, root: Path, records: list[Record], preset: HotelsPreset, crops: list[bytes]) -> None:
        super().__init__(root, records, preset)
        self.crops = crops
        self.occlusion_prob, self.occluder_scale = preset.occlusion_prob, preset.occluder_scale

    def _load(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        image = resize_shorter(self._read(self.paths[index], "RGB"), self.resize)
        side = self.image_size
        height, width = image.shape[-2:]
        top, left = torch.randint(height - side + 1, ()).item(), torch.randint(width - side + 1, ()).item()
        image = F.crop(image, top, left, side, side)
        if torch.rand(()).item() < 0.5:
            image = F.horizontal_flip(image)
        valid = torch.ones(1, side, side)
        if self.crops and torch.rand(()).item() < self.occlusion_prob:
            valid = paste_occluder(valid, self.crops[torch.randint(len(self.crops), ()).item()], self.occluder_scale)
        return (_normalised(image, valid), valid), int(self.hotel_ids[index])


class EvalImages(_Images):
    """Gallery or test images: item -> ((image (3, S, S), mask (1, S, S)), tensor([hotel_id, chain_id])).

    Shorter side resized to `preset.eval_size`, centre S x S crop; the mask is the record's PNG (nearest, pixels
    < 255 occluded) or all ones, and occluded pixels are 0 after normalisation, as in training.
    """

    def _load(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        image = self._read(self.paths[index], "RGB")
        side = self.image_size
        pixels = F.center_crop(resize_shorter(image, self.resize), [side, side])
        if self.masks[index]:
            mask = self._read(self.masks[index], "L")
            if mask.shape[-2:] != image.shape[-2:]:
                mask = F.resize(mask, list(image.shape[-2:]), interpolation=InterpolationMode.NEAREST)
            valid = _valid_from_mask(F.center_crop(resize_shorter(mask, self.resize, nearest=True), [side, side]))
        else:
            valid = torch.ones(1, side, side)
        target = torch.tensor([self.hotel_ids[index], self.chain_ids[index]], dtype=torch.long)
        return (_normalised(pixels, valid), valid), target


def build_datasets(
    root: Path, preset: HotelsPreset, *, index: HotelsIndex | None = None, cache_dir: Path | None = None
) -> tuple[TrainImages, EvalImages, dict[str, EvalImages]]:
    """The training set, the gallery (the cleaned training images, evaluation transform, no occlusion) and one test
    set per level in LEVELS. `index`: a `load_index` result to reuse (e.g. after logging its skipped list); else
    `load_index` makes one, cached in `cache_dir` (None: computed, not cached)."""
    check_layout(root)
    if index is None:
        index = load_index(root, min_images=preset.min_images, cache_dir=cache_dir)
    crops = load_people_crops(root)
    train = TrainImages(root, index.train, preset, crops)
    gallery = EvalImages(root, index.train, preset)
    tests = {level: EvalImages(root, index.test[level], preset) for level in LEVELS}
    logger.info(
        "Hotels-50K: %d training images of %d hotels (%d traffickcam), gallery %d, test %s; skipped %d files; "
        "dropped %d duplicated, %d small and %d untrained hotels",
        len(train),
        len(index.train_hotels),
        int((train.sources == 0).sum()),
        len(gallery),
        ", ".join(f"{level} {len(d)}" for level, d in tests.items()),
        len(index.skipped),
        len(index.duplicates),
        len(index.too_few),
        len(index.untrained),
    )
    return train, gallery, tests
