"""The hotel-recognition task: ties the Hotels-50K layout, synthetic stand-in, embedding net, triplet loss and
retrieval metrics together."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import LayoutError, default_cache_dir, loader_options, per_worker_batch, shard, training_loader
from ..evaluation import Evaluation
from ..preset import PresetError
from ..published import Published
from . import data, metrics, synthetic
from .loss import TripletLoss
from .model import build_model, load_backbone_state
from .presets import PRESETS, HotelsPreset
from .published import PUBLISHED
from .sampler import SourceBalancedBatchSampler


class HotelsTask:
    """Hotels-50K retrieval: embed the training images (the gallery) and each occlusion level's test images, and
    score the 100 nearest gallery images per query by hotel (instance) and by chain."""

    name: ClassVar[str] = "hotels"
    preset_class: ClassVar[type[HotelsPreset]] = HotelsPreset
    presets: ClassVar[dict[str, HotelsPreset]] = PRESETS
    metric: ClassVar[str] = "test_unoccluded/instance_top1"
    # Thesis tables 4.5 (instance top-1/10/100) and 4.6 (chain top-1/3/5), per occlusion level.
    # The thesis' (and its sources') numbers the sweep report shows beside this sweep's: docs/published.md.
    published: ClassVar[tuple[Published, ...]] = PUBLISHED
    table_metrics: ClassVar[tuple[str, ...]] = tuple(
        f"test_{level}/{kind}_top{k}"
        for kind, ks in (("instance", metrics.INSTANCE_K), ("chain", metrics.CHAIN_K))
        for level in data.LEVELS
        for k in ks
    )
    # The closing tables in the thesis' layout: title -> (column header, table metric), occlusion level x k.
    closing_tables: ClassVar[dict[str, tuple[tuple[str, str], ...]]] = {
        f"{kind} top-k (%) per occlusion level, as thesis table {table}": tuple(
            (f"{'none' if level == 'unoccluded' else level} {k}", f"test_{level}/{kind}_top{k}")
            for level in data.LEVELS
            for k in ks
        )
        for kind, ks, table in (("instance", metrics.INSTANCE_K, "4.5"), ("chain", metrics.CHAIN_K, "4.6"))
    }
    # The sweep report's line plots: title -> (x labels, {series: one table metric per x}): top-k against occlusion.
    report_series: ClassVar[dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]]] = {
        f"{kind} top-k (%) against occlusion, mean ± std over seeds": (
            tuple("none" if level == "unoccluded" else level for level in data.LEVELS),
            {f"top-{k}": tuple(f"test_{level}/{kind}_top{k}" for level in data.LEVELS) for k in ks},
        )
        for kind, ks in (("instance", metrics.INSTANCE_K), ("chain", metrics.CHAIN_K))
    }
    variants: ClassVar[tuple[str, ...]] = ("zero", "partial", "gated", "edge", "affine")
    layout: ClassVar[str] = data.LAYOUT
    takes_masks: ClassVar[bool] = True  # occlusion masks reach partial, gated and affine layers (convs.Masked)
    # Every worker embeds its shard of the gallery and test sets, rank 0 searches and scores (metrics.evaluate).
    collective_eval: ClassVar[bool] = True

    def check_layout(self, root: Path) -> None:
        """Raise `LayoutError` showing the expected layout unless `root` holds the Hotels-50K tree."""
        data.check_layout(root)

    def write_synthetic(self, root: Path, preset: HotelsPreset, *, seed: int = 0) -> None:
        """Write the synthetic stand-in, sized by `preset.synthetic`, in the real Hotels-50K layout."""
        synthetic.write_synthetic(root, preset.synthetic, seed=seed)

    def data_report(self, root: Path, preset: HotelsPreset) -> dict[str, str]:
        """What cleaning did, as files for the sweep's run: `data/cleaning.json` (the count of every step) and
        `data/skipped_images.csv` (every image listed but missing or unreadable on disk). The cleaned index is
        cached in `default_cache_dir()`, where every trial's `build_loaders` then finds it."""
        index = data.load_index(root, min_images=preset.min_images, cache_dir=default_cache_dir())
        return {
            "data/cleaning.json": json.dumps(index.counts, indent=1),
            "data/skipped_images.csv": index.skipped_csv(),
        }

    def build_loaders(
        self, root: Path, preset: HotelsPreset, *, rank: int, world_size: int, seed: int, workers: int
    ) -> tuple[DataLoader, metrics.RetrievalLoaders]:
        """Train batches of `hotels_per_batch` hotels x `images_per_hotel` images (the global batch, each worker
        loading its slice); the gallery and the test set of each occlusion level, for the evaluation: with several
        workers each one's loaders read only its contiguous shard of each set (`tasks.data.shard`), in order, and the
        evaluation gathers the shards; one worker reads the whole sets. Loader settings: `tasks.data.loader_options`
        (pinned memory on CUDA machines; the training loader's workers persist across epochs)."""
        per_worker = per_worker_batch(preset, world_size)  # before reading any data
        train, gallery, tests = data.build_datasets(root, preset, cache_dir=default_cache_dir())
        try:
            sampler = SourceBalancedBatchSampler(
                train.hotel_ids,
                train.sources,
                hotels_per_batch=preset.hotels_per_batch,
                images_per_hotel=preset.images_per_hotel,
                rank=rank,
                world_size=world_size,
                seed=seed,
            )
        except PresetError:
            raise
        except ValueError as error:  # too few usable hotels: the data, not the recipe
            raise LayoutError(f"{root}/images/train: {error}") from None
        train_loader = training_loader(train, seed, workers, batch_sampler=sampler)
        eval_batch = preset.eval_batch_size or per_worker

        def loader(dataset: Dataset) -> DataLoader:
            # Not persistent: five evaluation loaders would keep five times the workers alive, idle through
            # training; starting them costs about a second per evaluation, which embeds whole sets.
            if world_size > 1:
                dataset = Subset(dataset, shard(len(dataset), rank, world_size))
            options = loader_options(workers, persistent=False)
            return DataLoader(dataset, batch_size=eval_batch, shuffle=False, **options)

        evaluation = metrics.RetrievalLoaders(
            gallery=loader(gallery),
            queries={level: loader(ds) for level, ds in tests.items()},
            rank=rank,
            world_size=world_size,
        )
        return train_loader, evaluation

    def num_classes(self, root: Path) -> int:
        """The hotels listed in train_set.csv (before cleaning). Not a classifier: the model ignores it, the
        embedding's width is `preset.embedding_dim`."""
        with open(root / "input" / "dataset" / "train_set.csv", newline="") as f:
            return len({row["hotel_id"] for row in csv.DictReader(f)})

    def build_model(self, preset: HotelsPreset, *, num_classes: int) -> nn.Module:
        """torchvision's `preset.model`, untrained, its classifier replaced by an L2-normalised embedding."""
        return build_model(preset)

    def load_pretrained(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load pretrained weights by name (`--init`): a classifier's backbone (its `fc` left out) or a whole
        hotels model; returns the names of the tensors not loaded."""
        return load_backbone_state(model, state)

    def loss(self, output: torch.Tensor, target: torch.Tensor, preset: HotelsPreset) -> torch.Tensor:
        """Online triplet loss with a random margin-violating negative per anchor-positive pair."""
        return TripletLoss(preset.margin)(output, target)

    def evaluate(
        self, model: nn.Module, loaders: metrics.RetrievalLoaders, device: torch.device, preset: HotelsPreset
    ) -> Evaluation:
        """Instance top-1/10/100 and chain top-1/3/5 (%) at each occlusion level, by faiss search in the gallery.

        The gallery and the test sets are embedded whole, whatever `max_batches` says (it caps training batches
        here): a capped gallery would leave queries whose hotel it does not hold. Collective (`collective_eval`)
        with several workers: every rank calls it with its shard's loaders, rank 0 gets the scores of the whole
        sets and the others an empty `Evaluation` (`metrics.evaluate`)."""
        return metrics.evaluate(model, loaders, device, preset.updated(max_batches=None))
