"""Damaged files in each task's real loaders: `bad_images="fail"` stops at the first one, naming it; `"skip"` runs the
epoch with full batches on every worker, the damaged files left out and each named in one warning.

Each test damages a copy of the task's smoke stand-in (never the cached one): in the first batch the training
loader reads, one image cut to half its bytes, one overwritten with garbage, and for segmentation also a label PNG
cut in half. The files are damaged after the loaders are built, as a file goes bad on a disk: hotels' cleaning,
which reads headers, would otherwise drop the garbled one before any loader sees it.
"""

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import ensure_synthetic, get_task, images
from tasks.data import unsharded
from tasks.images import CorruptImageError

TASKS = ("classification", "segmentation", "hotels")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bad-images-cache")


@pytest.fixture(autouse=True)
def private(monkeypatch, tmp_path):
    """Hotels' index cache in the test's folder, and no file warned about yet in this process."""
    monkeypatch.setenv("INVALID_PIXELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(images, "_logged", set())


@pytest.fixture
def decoded(monkeypatch):
    """The files `read_image` decoded, in order (the loaders run in this process: workers=0)."""
    paths: list[str] = []
    original = images.read_image

    def recording(path, mode=None):
        image = original(path, mode)
        paths.append(os.fspath(path))
        return image

    monkeypatch.setattr(images, "read_image", recording)
    return paths


def copy_of(name: str, cache: Path, tmp_path: Path) -> Path:
    task = get_task(name)
    return Path(shutil.copytree(ensure_synthetic(task, task.presets["smoke"], cache), tmp_path / name))


def first_batch(name: str, loader) -> list[int]:
    """The dataset indices of the first batch `loader` yields this epoch (its sampler gives (epoch, index) keys)."""
    keys = next(iter(loader.batch_sampler)) if name == "hotels" else list(loader.sampler)[: loader.batch_size]
    return [index for _, index in keys]


def files(name: str, dataset, index: int) -> tuple[Path, Path | None]:
    """(image, label PNG or None) of item `index`."""
    if name == "classification":
        return Path(dataset.samples[index][0]), None
    if name == "segmentation":
        return Path(dataset.images[index]), Path(dataset.targets[index][0])
    return dataset.root / os.fsdecode(dataset.paths[index]), None


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def damage(name: str, loader) -> list[Path]:
    """Damage files of the first batch, in batch order: a cut image (segmentation: a cut label first), a garbled
    image. Returns the damaged files, in that order."""
    dataset, batch = unsharded(loader.dataset), first_batch(name, loader)
    assert len(set(batch)) == len(batch)
    damaged = []
    if name == "segmentation":
        damaged.append(files(name, dataset, batch.pop(0))[1])
        truncate(damaged[-1])
    damaged.append(files(name, dataset, batch[0])[0])
    truncate(damaged[-1])
    damaged.append(files(name, dataset, batch[1])[0])
    garble(damaged[-1])
    return damaged


def build(name: str, root: Path, bad_images: str, *, rank: int = 0, world_size: int = 1, workers: int = 0):
    task = get_task(name)
    preset = task.presets["smoke"].updated(bad_images=bad_images)
    return task.build_loaders(root, preset, rank=rank, world_size=world_size, seed=0, workers=workers)


@pytest.mark.parametrize("name", TASKS)
def test_fail_stops_at_the_first_damaged_file_naming_it(name, cache, tmp_path):
    root = copy_of(name, cache, tmp_path)
    train, _ = build(name, root, "fail")
    first, *_ = damage(name, train)
    with pytest.raises(CorruptImageError) as error:
        for _ in train:
            pass
    assert error.value.path == str(first)
    assert str(error.value).startswith(f"Cannot decode the image {first} (") and 'bad_images="skip"' in str(error.value)


def test_fail_names_the_file_from_a_dataloader_worker_process(cache, tmp_path):
    root = copy_of("classification", cache, tmp_path)
    train, _ = build("classification", root, "fail", workers=2)
    first, second = damage("classification", train)
    with pytest.raises(
        CorruptImageError, match=rf"Cannot decode the image ({re.escape(str(first))}|{re.escape(str(second))}) "
    ):
        for _ in train:
            pass


@pytest.mark.parametrize("name", TASKS)
def test_skip_runs_the_epoch_with_full_batches_and_names_each_damaged_file_once(name, cache, tmp_path, decoded, caplog):
    root = copy_of(name, cache, tmp_path)
    task = get_task(name)
    preset = task.presets["smoke"]
    ranks = [build(name, root, "skip", rank=rank, world_size=2)[0] for rank in (0, 1)]
    first = first_batch(name, ranks[0])
    damaged = damage(name, ranks[0])
    per_worker = preset.batch_size // 2
    with caplog.at_level(logging.WARNING, logger="tasks.images"):
        batches = [[targets for _, targets in train] for train in ranks]
    # DDP: every worker runs as many batches as its loader promised, each full; a damaged file costs no sample.
    for train, targets in zip(ranks, batches, strict=True):
        assert len(targets) == len(train) > 0
        assert [len(t) for t in targets] == [per_worker] * len(train)
    samples = sum(len(t) for targets in batches for t in targets)
    opens = 2 if name == "segmentation" else 1  # an image, and its label PNG
    labels = sum("gtFine" in path.parts for path in damaged)  # each one's image was decoded before it failed
    assert len(decoded) == samples * opens + labels
    assert not {str(path) for path in damaged} & set(decoded)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "tasks.images"]
    for path in damaged:
        assert sum(f"damaged image {path} (" in message for message in warned) == 1, path
    assert len(warned) == len(damaged)
    if name == "classification":  # a damaged image's place goes to another of its class
        assert batches[0][0].tolist() == [unsharded(ranks[0].dataset).targets[i] for i in first]
    if name == "hotels":  # ... of its hotel: the batches keep their hotels x images shape
        for targets in batches[0] + batches[1]:
            counts = torch.unique(targets, return_counts=True)[1].tolist()
            assert counts == [preset.images_per_hotel] * (preset.hotels_per_batch // 2)


@pytest.mark.parametrize("bad_images", ["fail", "skip"])
def test_a_damaged_hotels_test_mask_in_evaluation(cache, tmp_path, decoded, caplog, bad_images):
    root = copy_of("hotels", cache, tmp_path)
    _, evaluation = build("hotels", root, bad_images)
    queries = evaluation.queries["high"]
    mask = root / os.fsdecode(queries.dataset.masks[0])
    truncate(mask)
    with caplog.at_level(logging.WARNING, logger="tasks.images"):
        if bad_images == "fail":
            with pytest.raises(CorruptImageError, match=rf"^Cannot decode the image {re.escape(str(mask))} "):
                next(iter(queries))
            return
        targets = torch.cat([batch[1] for batch in queries])
    assert len(targets) == len(queries.dataset)  # the test set keeps its size: another image stands in
    hotel = queries.dataset.hotel_ids[0]
    assert targets[0, 0] == hotel  # an image of the same hotel
    assert str(mask) not in decoded
    assert [r.getMessage() for r in caplog.records if r.name == "tasks.images"] == [
        f"bad_images=skip: leaving out the damaged image {mask} (OSError: image file is truncated)"
    ]


def test_classification_without_meta_bin_handles_damaged_files_alike(cache, tmp_path, caplog):
    """ImageFolder, not ImageNet, reads a tree without meta.bin: the same opener and the same choice."""
    root = copy_of("classification", cache, tmp_path)
    (root / "meta.bin").unlink()
    train, _ = build("classification", root, "skip")
    assert type(unsharded(train.dataset)).__name__ == "ImageFolder"
    damaged = damage("classification", train)
    with caplog.at_level(logging.WARNING, logger="tasks.images"):
        assert sum(len(targets) for _, targets in train) == len(train) * train.batch_size
    assert [m for m in caplog.messages if "damaged image" in m] == [
        m for path in damaged for m in caplog.messages if f"damaged image {path} (" in m
    ]
    with pytest.raises(CorruptImageError, match=re.escape(str(damaged[0]))):
        next(iter(build("classification", root, "fail")[0]))
