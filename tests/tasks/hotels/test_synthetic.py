"""The Hotels-50K stand-in: real layout, names and CSVs, both sources per hotel, the planted faults, people-shaped
test masks growing with the level, people crops, cpu-preset sizes, and determinism."""

import csv
import hashlib
import io
import re
import tarfile
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from tasks.hotels.data import LEVEL_FOLDERS, LEVELS, build_datasets
from tasks.hotels.presets import PRESETS
from tasks.hotels.synthetic import OCCLUSION, synthetic_plan, write_synthetic

HEADERS = {
    "chain_info.csv": ["chain_id", "chain_name"],
    "hotel_info.csv": ["hotel_id", "hotel_name", "chain_id", "latitude", "longitude"],
    "train_set.csv": ["image_id", "hotel_id", "image_url", "image_source", "upload_timestamp"],
    "test_set.csv": ["image_id", "hotel_id", "image_url", "image_source", "upload_timestamp"],
}


def _csv(root, name):
    with open(root / "input" / "dataset" / name, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_csvs_and_file_names_follow_the_real_layout(root, plan):
    tables = {}
    for name, header in HEADERS.items():
        found, rows = _csv(root, name)
        assert found == header and rows
        tables[name] = rows
    listed = {int(r[0]): int(r[2]) for r in tables["hotel_info.csv"]}
    assert -1 in listed.values() and {int(r[0]) for r in tables["chain_info.csv"]} == set(plan.chains)
    unlisted = [h.hotel_id for h in plan.hotels if not h.listed]
    assert len(unlisted) == 1 and unlisted[0] not in listed
    stamp = re.compile(r"^\d{1,2}/\d{1,2}/\d{2} \d{1,2}:\d{2}$")
    traffickcam = re.compile(r"^https://traffickcam\.com/images/\d{4}/\d{1,2}/\d{8}_\d{6}_[A-Z0-9]{6}\.jpg$")
    extensions = set()
    for image_id, hotel_id, url, source, uploaded in tables["train_set.csv"]:
        assert source in ("traffickcam", "travel_website") and stamp.match(uploaded)
        assert traffickcam.match(url) if source == "traffickcam" else url.startswith("https://")
        ext = url.rsplit(".", 1)[-1]  # the download script keeps the URL's extension
        extensions.add(ext)
        chain = str(listed[int(hotel_id)]) if int(hotel_id) in listed else "Unknown"
        path = root / "images" / "train" / chain / hotel_id / source / f"{image_id}.{ext}"
        assert path.is_file() == (int(image_id) not in plan.missing)
    assert {"jpg", "jpeg", "png"} <= extensions
    assert {r[3] for r in tables["test_set.csv"]} == {"traffickcam"}
    for image_id, hotel_id, *_ in tables["test_set.csv"]:
        chain = str(listed[int(hotel_id)]) if int(hotel_id) in listed else "Unknown"
        for level, folder in LEVEL_FOLDERS.items():
            where = root / "images" / "test" / folder / chain / hotel_id / "traffickcam"
            present = int(image_id) not in plan.missing_test.get(level, ())
            assert (where / f"{image_id}.jpg").is_file() == present
            assert (where / "masks" / f"{image_id}.png").is_file() == (present and level != "unoccluded")
    assert not list(root.glob("*.*")) and sorted(p.name for p in root.iterdir()) == ["images", "input"]


def test_both_sources_per_hotel_phone_photos_darker_and_noisier(root, plan):
    size = PRESETS["smoke"].synthetic["size"]
    stats = defaultdict(list)
    for hotel in plan.hotels:
        sources = [source for _, source, _ in hotel.train]
        if hotel.role != "test_only":
            assert sources.count("traffickcam") >= (2 if len(sources) >= 8 else 1) and "travel_website" in sources
        for image_id, source, _ in hotel.train[:4]:
            paths = list(root.glob(f"images/train/*/{hotel.hotel_id}/{source}/{image_id}.*"))
            if not paths or image_id in plan.corrupt:
                continue
            pixels = np.asarray(Image.open(paths[0]).convert("RGB"), dtype=np.float32)
            height, width = pixels.shape[:2]
            assert (height, width) == (
                (size, round(1.25 * size)) if source == "travel_website" else (round(1.25 * size), size)
            )
            grey = pixels.mean(-1)
            stats[source, "brightness"].append(grey.mean())
            stats[source, "noise"].append(np.median(np.abs(np.diff(grey, axis=1))))  # edges are rare: noise
    assert np.mean(stats["traffickcam", "brightness"]) < 0.8 * np.mean(stats["travel_website", "brightness"])
    assert np.mean(stats["traffickcam", "noise"]) > 1.5 * np.mean(stats["travel_website", "noise"])


def test_planted_duplicates_small_hotels_and_faults(root, plan):
    def files(hotel):
        return {p.name.split(".")[0]: p.read_bytes() for p in root.glob(f"images/train/*/{hotel}/*/*")}

    copies = [h for h in plan.hotels if h.copy_of is not None]
    assert len(copies) == 1
    copy, original = files(copies[0].hotel_id), files(copies[0].copy_of)
    assert set(copy.values()) == set(original.values()) and len(copy) == len(original) >= 8
    assert not set(copy) & set(original)  # other image ids, same bytes
    few = [h for h in plan.hotels if h.role == "few"]
    assert few and all(len(h.train) < 8 for h in few)
    assert all(len(h.train) >= 10 for h in plan.hotels if h.role in ("regular", "duplicate"))
    assert all(not h.train and h.test for h in plan.hotels if h.role == "test_only")
    (corrupt,) = root.glob(f"images/train/*/*/*/{plan.corrupt[0]}.*")
    assert not corrupt.read_bytes().startswith((b"\xff\xd8", b"\x89PNG"))
    assert not list(root.glob(f"images/train/*/*/*/{plan.missing[0]}.*"))


def test_test_masks_are_people_covering_more_at_each_level_and_pre_masked(root, plan):
    covered = defaultdict(list)
    for mask_path in sorted(root.glob("images/test/*_occlusions/*/*/traffickcam/masks/*.png")):
        level = mask_path.parts[-6].removesuffix("_occlusions")
        mask = np.asarray(Image.open(mask_path))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        occluded = mask < 255
        covered[level].append(occluded.mean())
        if len(covered[level]) <= 3:  # pre-masked: the people are in the image, the rest is the unoccluded image
            image = np.asarray(Image.open(mask_path.parent.parent / f"{mask_path.stem}.jpg"), dtype=np.float32)
            clean_path = str(mask_path.parent.parent / f"{mask_path.stem}.jpg").replace(
                LEVEL_FOLDERS[level], "unoccluded"
            )
            clean = np.asarray(Image.open(clean_path), dtype=np.float32)
            difference = np.abs(image - clean).mean(-1)
            # away from the people (JPEG's 8 x 8 blocks ring along their edges), the unoccluded image
            padded = np.pad(occluded, 8)
            near = np.zeros_like(occluded)
            for dy in range(17):
                for dx in range(17):
                    near |= padded[dy : dy + occluded.shape[0], dx : dx + occluded.shape[1]]
            assert (~near).any() and difference[~near].mean() < 8 and difference[occluded].mean() > 20
    for level, (low, high) in OCCLUSION.items():
        fractions = np.array(covered[level])
        assert len(fractions) >= 40 and fractions.min() >= low - 0.02 and fractions.max() <= high + 1e-9
        assert np.median(fractions) > low
    assert np.mean(covered["low"]) < np.mean(covered["medium"]) < np.mean(covered["high"])


def test_people_crops_are_grayscale_figures_on_white(root):
    with tarfile.open(root / "images" / "people_crops.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        crops = [Image.open(io.BytesIO(tar.extractfile(m).read())) for m in members]
    assert len(crops) == 40 and len({m.name.count("/") for m in members}) == 2  # PNGs at two folder depths
    for crop in crops:
        pixels = np.asarray(crop)
        assert crop.format == "PNG" and crop.mode == "L" and pixels.shape[0] > pixels.shape[1]
        figure = pixels < 255
        assert (pixels[0] == 255).all() and (pixels[:, 0] == 255).all() and 0.15 < figure.mean() < 0.7
        assert pixels[figure].mean() < 130  # a dark figure
        rows = np.flatnonzero(figure.any(1))
        head = figure[rows[0] : rows[0] + max(1, len(rows) // 12)].sum(1).max()
        assert head < 0.7 * figure.sum(1).max()  # a head on top, narrower than the body


def test_hotel_cues_survive_resizing_and_are_hidden_by_occlusion(root):
    """Nearest gallery neighbours by raw pooled pixels already find the hotel often when nothing is hidden (14
    hotels: chance is 1/14), and less often when people hide most of the picture."""
    preset = PRESETS["smoke"]
    _, gallery, tests = build_datasets(root, preset)

    def features(data):
        images = torch.stack([data[i][0][0] for i in range(len(data))])
        pooled = torch.nn.functional.avg_pool2d(images, 8).flatten(1)
        return torch.nn.functional.normalize(pooled - pooled.mean(1, keepdim=True), dim=1)

    reference = features(gallery)
    top1 = {}
    for level in ("unoccluded", "high"):
        nearest = (features(tests[level]) @ reference.T).argmax(1).numpy()
        top1[level] = (gallery.hotel_ids[nearest] == tests[level].hotel_ids).mean()
    assert top1["unoccluded"] > 3 / 14 and top1["high"] < top1["unoccluded"]


def test_cpu_spec_sizes():
    """The cpu preset's stand-in: >= 30 hotels after cleaning, each with >= 8 (mostly 10-16) training images."""
    plan = synthetic_plan(PRESETS["cpu"].synthetic, seed=0)
    dropped = {max(h.hotel_id, h.copy_of) for h in plan.hotels if h.copy_of is not None}
    kept = [h for h in plan.hotels if h.role in ("regular", "duplicate") and h.hotel_id not in dropped]
    assert len(kept) >= 30 and len(plan.chains) == 6
    counts = [len(h.train) - sum(i in plan.missing + plan.corrupt for i, _, _ in h.train) for h in kept]
    assert min(counts) >= 8 and np.mean([10 <= n <= 16 for n in counts]) > 0.9
    assert sum(h.chain_id == -1 for h in kept) >= 2 and len({h.chain_id for h in kept}) == 7


def test_generation_is_deterministic_for_a_seed(tmp_path):
    spec = {"hotels": 8, "chains": 2, "size": 32, "people_crops": 4, "test_images": 1}

    def digest(root):
        return {
            p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_synthetic(tmp_path / name, spec, seed=seed)
    first = digest(tmp_path / "a")
    assert first == digest(tmp_path / "b")
    assert first != digest(tmp_path / "c")
    assert synthetic_plan(spec, seed=0) == synthetic_plan(spec, seed=0)
    assert LEVELS == tuple(LEVEL_FOLDERS)
