"""Hotels-50K data: the layout check, the cleaning index (its four steps, exact ids), source names, the people-crop
occluders, the training and evaluation items, determinism, and the cache of the cleaned index."""

import csv
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import shutil
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import LayoutError
from tasks.hotels.data import (
    LEVEL_FOLDERS,
    LEVELS,
    SOURCES,
    EvalImages,
    HotelsIndex,
    Record,
    TrainImages,
    build_datasets,
    check_layout,
    index_cache_path,
    load_index,
    load_people_crops,
    normalise_source,
    paste_occluder,
)

CSV_DIR = ("input", "dataset")


def _rows(root, name):
    with open(root.joinpath(*CSV_DIR, name), newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(root, name, rows):
    with open(root.joinpath(*CSV_DIR, name), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def datasets(root, preset, index):
    return build_datasets(root, preset, index=index)


def test_the_generated_dataset_passes_the_layout_check_and_loads(root, preset, index, datasets):
    check_layout(root)
    train, gallery, tests = datasets
    assert isinstance(train, TrainImages) and isinstance(gallery, EvalImages) and list(tests) == list(LEVELS)
    assert len(train) == len(gallery) == len(index.train) == index.counts["train/images"]
    assert all(len(tests[level]) == len(index.test[level]) > 0 for level in LEVELS)
    assert len(index.train_hotels) >= preset.hotels_per_batch
    assert np.array_equal(train.hotel_ids, gallery.hotel_ids) and set(index.train_hotels) == set(train.hotel_ids)


def test_cleaning_removes_exactly_the_duplicated_the_small_and_the_untrained_hotels(root, plan, preset, index):
    copies = {h.hotel_id: h.copy_of for h in plan.hotels if h.copy_of is not None}
    dropped = {max(pair): min(pair) for pair in copies.items()}  # the smallest id of a group stays
    few = {h.hotel_id for h in plan.hotels if h.role == "few"}
    test_only = {h.hotel_id for h in plan.hotels if h.role == "test_only"}
    kept = {h.hotel_id for h in plan.hotels if h.role in ("regular", "duplicate")} - set(dropped)
    assert dropped and few and test_only
    assert index.duplicates == dropped
    assert set(index.too_few) == few
    assert index.untrained == few | test_only
    assert set(index.train_hotels) == kept
    for level in LEVELS:
        assert {r.hotel_id for r in index.test[level]} == kept
    # the same, read independently from the files: rows per hotel, hotels per CSV, image contents per hotel
    train_rows = _rows(root, "train_set.csv")
    per_hotel = defaultdict(int)
    for row in train_rows:
        per_hotel[int(row["hotel_id"])] += 1
    assert {h for h, n in per_hotel.items() if n < preset.min_images} == few
    assert {int(r["hotel_id"]) for r in _rows(root, "test_set.csv")} - set(per_hotel) == test_only
    contents = defaultdict(set)
    for path in (root / "images" / "train").rglob("*.*"):
        contents[int(path.parts[-3])].add(hashlib.sha1(path.read_bytes()).hexdigest())
    groups = defaultdict(list)
    for hotel, hashes in contents.items():
        groups[frozenset(hashes)].append(hotel)
    assert [sorted(g) for g in groups.values() if len(g) > 1] == [sorted(p) for p in dropped.items()]
    counts = index.counts
    assert counts["step2/hotels_dropped"] == len(dropped) and counts["step3/hotels_dropped"] == len(few)
    assert counts["step2/train_images_dropped"] == sum(per_hotel[h] for h in dropped)
    assert counts["step4/hotels_dropped"] == len(few | test_only)
    expected_images = sum(per_hotel[h] for h in kept) - len(plan.missing) - len(plan.corrupt)
    assert counts["train/images"] == len(index.train) == expected_images


def test_missing_and_corrupt_files_are_listed_and_skipped_not_fatal(plan, index, tmp_path):
    listed = {(s["split"], s["image_id"]): s["reason"] for s in index.skipped}
    expected = {("train", i) for i in plan.missing} | {("train", i) for i in plan.corrupt}
    expected |= {(f"test/{level}", i) for level, ids in plan.missing_test.items() for i in ids}
    assert set(listed) == expected
    assert all(listed["train", i] == "missing" for i in plan.missing)
    assert all(listed["train", i].startswith("unreadable: ") for i in plan.corrupt)
    assert index.counts["step1/train/missing"] == 1 and index.counts["step1/train/unreadable"] == 1
    assert index.counts["step1/test/high/missing"] == 1 and index.counts["step1/test/low/missing"] == 0
    gone = set(plan.missing) | set(plan.corrupt)
    assert not gone & {r.image_id for r in index.train}
    (test_id,) = plan.missing_test["high"]
    assert test_id not in {r.image_id for r in index.test["high"]}
    assert test_id in {r.image_id for r in index.test["medium"]}  # only the level whose file is missing loses it
    index.write_skipped(tmp_path / "skipped.csv")
    with open(tmp_path / "skipped.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == ["split", "image_id", "hotel_id", "reason", "path"] and len(written) == len(expected)


def test_missing_and_unreadable_test_masks_are_skipped(root, preset, plan, index, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    hotel = next(h for h in plan.hotels if h.hotel_id in index.train_hotels and h.listed)

    def mask(level, image_id):
        level_folder = copy / "images" / "test" / LEVEL_FOLDERS[level]
        return level_folder / str(hotel.chain_id) / str(hotel.hotel_id) / "traffickcam" / "masks" / f"{image_id}.png"

    mask("low", hotel.test[1]).unlink()
    mask("medium", hotel.test[2]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    damaged = load_index(copy, min_images=preset.min_images)
    listed = {(s["split"], s["image_id"]): s["reason"] for s in damaged.skipped}
    assert listed["test/low", hotel.test[1]] == "mask missing"
    assert listed["test/medium", hotel.test[2]].startswith("mask unreadable: ")
    assert hotel.test[1] in {r.image_id for r in damaged.test["unoccluded"]}  # the unoccluded level needs no mask
    assert len(damaged.test["low"]) == len(index.test["low"]) - 1


def _break(what):
    def apply(root):
        if what == "empty":
            shutil.rmtree(root)
            root.mkdir()
        elif what == "csv":
            root.joinpath(*CSV_DIR, "test_set.csv").unlink()
        elif what == "header":
            root.joinpath(*CSV_DIR, "train_set.csv").write_text("id,hotel,url\n1,2,x\n")
        elif what == "train":
            shutil.rmtree(root / "images" / "train")
            (root / "images" / "train" / "-1").mkdir(parents=True)
        elif what == "level":
            shutil.rmtree(root / "images" / "test" / "medium_occlusions")
        elif what == "crops":
            (root / "images" / "people_crops.tar.gz").unlink()

    return apply


@pytest.mark.parametrize(
    "what, message",
    [
        ("empty", r"missing CSV .*chain_info\.csv; missing CSV .*hotel_info\.csv.*missing folder .*images/train"),
        ("csv", r"missing CSV \S*input/dataset/test_set\.csv\b"),
        ("header", r"train_set\.csv has header id,hotel,url, lacking column\(s\) image_id, hotel_id, image_url"),
        ("train", r"no images under \S*images/train\b"),
        ("level", r"missing test folder \S*images/test/medium_occlusions \(medium occlusion\)"),
        ("crops", r"missing people crops tarball \S*images/people_crops\.tar\.gz"),
    ],
)
def test_a_missing_part_gives_a_layout_error_naming_it(root, tmp_path, what, message):
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    _break(what)(copy)
    with pytest.raises(LayoutError, match=message) as error:
        check_layout(copy)
    assert "Expected layout:\nROOT/input/dataset/{chain_info,hotel_info,train_set,test_set}.csv" in str(error.value)


def test_source_names_accept_aliases_and_refuse_unknown_ones(root, preset, index, tmp_path):
    for name in ("traffickcam", "TraffickCam", " traffick-cam ", "tc"):
        assert normalise_source(name) == "traffickcam"
    for name in ("travel_website", "travel_websites", "Travel Website", "travel", "TRAVEL-WEBSITE"):
        assert normalise_source(name) == "travel_website"
    with pytest.raises(
        LayoutError, match=r"unknown image source 'flickr': expected one of traffickcam, travel_website"
    ):
        normalise_source("flickr")
    # a copy whose CSV spells the sources differently, with a blank cell whose folder name (an alias) decides
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    rows = _rows(copy, "train_set.csv")
    spelling = {"traffickcam": "TraffickCam", "travel_website": "travel"}
    for row in rows:
        row["image_source"] = spelling[row["image_source"]]
    blank = next(r for r in rows if r["image_id"] == str(index.train[0].image_id))
    blank["image_source"] = ""
    old = Path(index.train[0].path).relative_to(root)
    folder = {"traffickcam": "Traffick-Cam", "travel_website": "travel_websites"}[index.train[0].source]
    new = copy / old.parent.parent / folder / old.name
    new.parent.mkdir()
    (copy / old).rename(new)
    _write_rows(copy, "train_set.csv", rows)
    aliased = load_index(copy, min_images=preset.min_images)
    strip = lambda records: [(r.image_id, r.hotel_id, r.chain_id, r.source) for r in records]  # noqa: E731
    assert strip(aliased.train) == strip(index.train) and aliased.train[0].path == str(new)
    assert set(strip(aliased.train)) and {r.source for r in aliased.train} == set(SOURCES)
    rows[3]["image_source"] = "flickr"
    _write_rows(copy, "train_set.csv", rows)
    with pytest.raises(LayoutError, match=r"'flickr': expected one of traffickcam, travel_website \(also accepted"):
        load_index(copy, min_images=preset.min_images)


def test_the_unknown_chain_folder_and_unchained_hotels(plan, index, datasets):
    unlisted = next(h for h in plan.hotels if not h.listed)
    records = [r for r in index.train if r.hotel_id == unlisted.hotel_id]
    assert records and all(r.chain_id == -1 and Path(r.path).parts[-4] == "Unknown" for r in records)
    tested = [r for level in LEVELS for r in index.test[level] if r.hotel_id == unlisted.hotel_id]
    assert len(tested) >= 4 and all(r.chain_id == -1 and Path(r.path).parts[-4] == "Unknown" for r in tested)
    listed_unchained = next(h for h in plan.hotels if h.listed and h.chain_id == -1 and h.role == "regular")
    records = [r for r in index.train if r.hotel_id == listed_unchained.hotel_id]
    assert records and all(r.chain_id == -1 and Path(r.path).parts[-4] == "-1" for r in records)
    _, gallery, tests = datasets
    at = int(np.flatnonzero(gallery.hotel_ids == unlisted.hotel_id)[0])
    assert gallery[at][1].tolist() == [unlisted.hotel_id, -1]
    chained = next(h for h in plan.hotels if h.role == "regular" and h.chain_id >= 0)
    at = int(np.flatnonzero(tests["low"].hotel_ids == chained.hotel_id)[0])
    assert tests["low"][at][1].tolist() == [chained.hotel_id, chained.chain_id]
    assert set(index.chains) == set(plan.chains)


def test_training_items_shapes_masks_and_occluders(root, preset, index, datasets):
    train = datasets[0]
    side = preset.image_size
    assert train.hotel_ids.dtype == np.int64 and train.sources.dtype == np.int8 and len(train.sources) == len(train)
    for hotel in index.train_hotels:  # both sources in every hotel, for source-balanced batches
        assert set(train.sources[train.hotel_ids == hotel]) == {0, 1}
    torch.manual_seed(0)
    fractions = []
    for i in range(0, len(train), 3):
        (image, mask), hotel = train[i]
        assert image.shape == (3, side, side) and image.dtype == torch.float32
        assert mask.shape == (1, side, side) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and isinstance(hotel, int) and hotel == train.hotel_ids[i]
        assert (image[:, mask[0] == 0] == 0).all()  # the image never shows what lies under the mask
        assert image.abs().max() < 3.5 and image.std() > 0.1  # normalised
        fractions.append(1 - mask.mean().item())
    fractions = np.array(fractions)
    # one person of 30-70% of the side, cut by the border: a few to a few tens of percent of the crop
    assert (fractions > 0).mean() > 0.9 and 0.02 < fractions.mean() < 0.25 and fractions.max() < 0.6
    plain = TrainImages(root, index.train, preset.updated(occlusion_prob=0.0), train.crops)
    assert all(plain[i][0][1].min() == 1 for i in range(0, len(plain), 10))


def test_the_occluder_is_a_people_crop_at_the_preset_scale(root):
    """The crops come from the tarball (two folder depths); an occluder spans a fraction of the side in range."""
    crops = load_people_crops(root)
    assert len(crops) == 40
    torch.manual_seed(1)
    for i in range(30):
        valid = paste_occluder(torch.ones(1, 100, 100), crops[i], (0.3, 0.7))
        occluded = (valid[0] == 0).nonzero()
        if len(occluded):
            extent = max(occluded[:, 0].max() - occluded[:, 0].min(), occluded[:, 1].max() - occluded[:, 1].min())
            assert extent <= 71


def test_evaluation_items_and_level_masks(preset, index, datasets):
    _, gallery, tests = datasets
    side = preset.image_size
    for i in range(0, len(gallery), 7):
        (image, mask), target = gallery[i]
        assert image.shape == (3, side, side) and mask.shape == (1, side, side) and (mask == 1).all()
        assert target.dtype == torch.long and target.tolist() == [gallery.hotel_ids[i], gallery.chain_ids[i]]
    covered = {}
    for level in LEVELS:
        fractions = []
        for i in range(len(tests[level])):
            (image, mask), target = tests[level][i]
            assert set(mask.unique().tolist()) <= {0.0, 1.0} and (image[:, mask[0] == 0] == 0).all()
            assert target[0] == index.test[level][i].hotel_id
            fractions.append(1 - mask.mean().item())
        covered[level] = np.mean(fractions)
    assert covered["unoccluded"] == 0 and 0.08 < covered["low"] < covered["medium"] < covered["high"] < 0.9
    assert covered["high"] > 0.5
    # the same image at every level: equal outside the mask up to JPEG noise
    low = tests["low"]
    at = int(np.flatnonzero(tests["unoccluded"].image_ids == low.image_ids[0])[0])
    (clean, _), _ = tests["unoccluded"][at]
    (masked, mask), _ = low[0]
    visible = mask[0] == 1
    assert (clean[:, visible] - masked[:, visible]).abs().mean() < 0.25


def test_items_are_deterministic_for_a_seed_and_vary_across_seeds(root, preset, index, datasets):
    train = datasets[0]
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append([train[i][0] for i in range(4)])
    for (image_a, mask_a), (image_b, mask_b) in zip(draws[0], draws[1], strict=True):
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    assert any(not torch.equal(a[1], c[1]) for a, c in zip(draws[0], draws[2], strict=True))
    again = load_index(root, min_images=preset.min_images)
    assert again.train == index.train and again.test == index.test and again.counts == index.counts


# the index cache -----------------------------------------------------------------------------------------------------

CACHE_LOGGER = "tasks.hotels.data"


def _files(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_the_cached_index_equals_a_fresh_one_and_the_next_call_reads_it(root, preset, index, tmp_path, caplog):
    cache = tmp_path / "cache"
    path = index_cache_path(root, min_images=preset.min_images, cache_dir=cache)
    data_before = _files(root)
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        build_datasets(root, preset, cache_dir=cache)  # passes the cache on to load_index
    assert "hotels index: computed in " in caplog.text and f"cached at {path}" in caplog.text
    assert path.is_file() and os.listdir(path.parent) == [path.name]  # the entry alone, no temporary file left
    written = path.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        cached = load_index(root, min_images=preset.min_images, cache_dir=cache)
    assert f"hotels index: loaded from the cache {path}" in caplog.text and "cleaning 1" not in caplog.text
    assert path.stat().st_mtime_ns == written
    assert cached == index  # every field; and field by field, with the types a JSON round trip could change
    for field in dataclasses.fields(HotelsIndex):
        assert getattr(cached, field.name) == getattr(index, field.name), field.name
    assert all(type(r) is Record for r in cached.train + [r for level in LEVELS for r in cached.test[level]])
    assert cached.test["low"][0].mask_path and cached.test["unoccluded"][0].mask_path is None
    assert {type(k) for k in cached.duplicates} == {int} and isinstance(cached.untrained, set) and cached.skipped
    assert _files(root) == data_before  # nothing written under the data root


def test_the_cache_is_read_until_its_key_changes(root, preset, tmp_path):
    """An image deleted deep in the tree is not seen (the cached index still lists it) until a CSV's mtime moves."""
    copy, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(root, copy)
    cached = load_index(copy, min_images=preset.min_images, cache_dir=cache)
    gone = cached.train[0]
    Path(gone.path).unlink()
    assert gone.image_id not in {r.image_id for r in load_index(copy, min_images=preset.min_images).train}
    assert load_index(copy, min_images=preset.min_images, cache_dir=cache) == cached  # read back, stale
    train_csv = copy.joinpath(*CSV_DIR, "train_set.csv")
    info = train_csv.stat()
    os.utime(train_csv, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    again = load_index(copy, min_images=preset.min_images, cache_dir=cache)
    assert gone.image_id not in {r.image_id for r in again.train}
    missing = dict(split="train", image_id=gone.image_id, hotel_id=gone.hotel_id, reason="missing", path="")
    assert missing in again.skipped and missing not in cached.skipped
    assert load_index(copy, min_images=preset.min_images, cache_dir=cache) == again  # the entry was replaced


def _chain_folder(copy, tree):
    return next(p for p in sorted((copy / "images" / tree).iterdir()) if p.is_dir())


@pytest.mark.parametrize(
    "change",
    [
        "hotel folder added to a training chain folder",
        "chain folder added to a test level",
        "test_set.csv rewritten, one byte longer",
        "people crops tarball touched",
    ],
)
def test_what_the_cache_key_sees(root, preset, tmp_path, change):
    copy, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(root, copy)
    cached = load_index(copy, min_images=preset.min_images, cache_dir=cache)
    gone = cached.train[0]
    Path(gone.path).unlink()  # unseen by itself: the cached index still lists it
    assert load_index(copy, min_images=preset.min_images, cache_dir=cache) == cached
    if change.startswith("hotel folder"):
        (_chain_folder(copy, "train") / "999999").mkdir()
    elif change.startswith("chain folder"):
        (copy / "images" / "test" / LEVEL_FOLDERS["high"] / "12345").mkdir()
    elif change.startswith("test_set.csv"):
        test_csv = copy.joinpath(*CSV_DIR, "test_set.csv")
        test_csv.write_text(test_csv.read_text() + "\n")  # a blank line: the same rows
    else:
        crops = copy / "images" / "people_crops.tar.gz"
        os.utime(crops, ns=(crops.stat().st_atime_ns, crops.stat().st_mtime_ns + 10**9))
    again = load_index(copy, min_images=preset.min_images, cache_dir=cache)
    assert gone.image_id not in {r.image_id for r in again.train}
    assert again == load_index(copy, min_images=preset.min_images)


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "empty", "not our JSON", "a field missing", "a folder"])
def test_a_corrupt_cache_file_is_recomputed_with_a_warning(root, preset, index, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    path = index_cache_path(root, min_images=preset.min_images, cache_dir=cache)
    load_index(root, min_images=preset.min_images, cache_dir=cache)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "not gzip":
        path.write_bytes(b"not a cache file")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not our JSON":
        path.write_bytes(gzip.compress(b"[1, 2, 3]"))
    elif damage == "a field missing":  # the key still matches: the damage is found only while rebuilding
        document = json.loads(gzip.decompress(good))
        del document["test"]["high"]
        path.write_bytes(gzip.compress(json.dumps(document).encode()))
    else:
        path.unlink()
        path.mkdir()
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        again = load_index(root, min_images=preset.min_images, cache_dir=cache)
    assert again == index
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and str(path) in warnings[0] and "recomputing" in warnings[0]
    if damage == "a folder":  # neither readable nor replaceable: computed every time, never fatal
        assert path.is_dir() and "could not cache it" in warnings[1]
        assert sorted(os.listdir(path.parent)) == [path.name]  # the temporary file removed
    else:
        assert path.read_bytes() == good  # rewritten whole (the same bytes: same key, same index)


def test_each_min_images_gets_its_own_entry(root, preset, index, tmp_path):
    stricter = preset.min_images + 4  # drops some of the 10-16 image hotels too
    entries = {m: index_cache_path(root, min_images=m, cache_dir=tmp_path) for m in (preset.min_images, stricter)}
    assert len(set(entries.values())) == 2
    first = {m: load_index(root, min_images=m, cache_dir=tmp_path) for m in entries}
    assert all(path.is_file() for path in entries.values())
    cached = {m: load_index(root, min_images=m, cache_dir=tmp_path) for m in entries}
    assert cached == first
    assert cached[preset.min_images] == index
    assert cached[stricter] == load_index(root, min_images=stricter)
    assert set(cached[stricter].too_few) > set(index.too_few) and cached[stricter].min_images == stricter


def test_another_spelling_of_the_root_reads_the_same_entry(root, preset, tmp_path, caplog):
    """The key holds the resolved root: a symlink to the data finds the entry, and gets its own paths back."""
    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    load_index(root, min_images=preset.min_images, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        through_link = load_index(link, min_images=preset.min_images, cache_dir=tmp_path / "cache")
    assert "loaded from the cache" in caplog.text
    assert through_link == load_index(link, min_images=preset.min_images)
    assert through_link.train[0].path.startswith(str(link / "images" / "train"))


def test_concurrent_writers_and_a_crashed_write_leave_a_valid_entry(root, preset, index, tmp_path):
    cache = tmp_path / "cache"
    path = index_cache_path(root, min_images=preset.min_images, cache_dir=cache)
    start = threading.Barrier(4)
    results = [None] * 4

    def worker(i):
        start.wait()
        results[i] = load_index(root, min_images=preset.min_images, cache_dir=cache)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result == index for result in results)
    assert os.listdir(path.parent) == [path.name]
    # a write cut short leaves its temporary file beside the entry; it is never read as one
    path.with_name(f".{path.name}.deadbeef.tmp").write_bytes(path.read_bytes()[:100])
    assert load_index(root, min_images=preset.min_images, cache_dir=cache) == index
    path.unlink()  # and without the entry, the leftover is not taken for it either
    assert load_index(root, min_images=preset.min_images, cache_dir=cache) == index and path.is_file()
