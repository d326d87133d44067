"""The thesis' triplet batches: `hotels_per_batch` hotels x `images_per_hotel` images, balanced between the two image
sources (traffickcam, travel_website), drawn identically on every Ray Train worker and split between them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from ..data import LayoutError
from ..preset import PresetError


class SourceBalancedBatchSampler(Sampler[list[int]]):
    """Yields this worker's share of each global batch of `hotels_per_batch` distinct hotels x `images_per_hotel`
    images (the thesis: 13 x 8 = 104), as lists of dataset indices; use it as a DataLoader's `batch_sampler`.

    Hotels: each epoch walks a shuffled cycle over the usable hotels (those with at least 2 images: the others can
    never form a positive pair), each batch taking the next `hotels_per_batch`, a new shuffled cycle when one runs
    out (never a hotel twice in a batch), so every hotel is visited equally often, within one, over an epoch.

    Images of a hotel: half from each source where the hotel has both (the odd one from a random source), as far as
    the minority source has images, the rest from the other; without replacement. A hotel with fewer than
    `images_per_hotel` images (cleaning should have dropped it) gives all its images once and repeats random ones,
    each repeat from the source with fewer picks so far.

    Workers: every rank draws the same global batches from a generator seeded by (seed, epoch) and takes the
    `rank`-th contiguous slice of `hotels_per_batch * images_per_hotel // world_size` images. A batch lists a hotel's
    images together, so a hotel's images land on as few ranks as the split allows (one, or two where a rank's slice
    ends inside it). The metric loss gathers all workers' embeddings, so its triplets span the global batch.

    Args:
        hotel_ids: (N,) the hotel of each dataset item.
        sources: (N,) the source of each item, 0 or 1.
        hotels_per_batch, images_per_hotel: the global batch's shape, both >= 2.
        rank, world_size: this worker among the trial's Ray Train workers.
        seed: the trial's seed; with the epoch (`set_epoch`) it fixes the batches.
        batches: batches per epoch; None: the usable hotels' images // the global batch, at least 1.

    Raises:
        PresetError: a global batch that does not split evenly across `world_size` workers.
        LayoutError: fewer usable hotels (>= 2 images) than `hotels_per_batch`.
        ValueError: malformed arguments.
    """

    def __init__(
        self,
        hotel_ids: np.ndarray,
        sources: np.ndarray,
        *,
        hotels_per_batch: int,
        images_per_hotel: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batches: int | None = None,
    ) -> None:
        hotel_ids, sources = np.asarray(hotel_ids), np.asarray(sources)
        if hotel_ids.ndim != 1 or hotel_ids.shape != sources.shape:
            raise ValueError(
                f"hotel_ids and sources must be 1-D arrays of the same length, got shapes {hotel_ids.shape} and "
                f"{sources.shape}"
            )
        if not np.isin(sources, (0, 1)).all():
            raise ValueError(f"sources must hold 0 or 1 for each item, got values {np.unique(sources)[:10]}")
        if hotels_per_batch < 2 or images_per_hotel < 2:
            raise ValueError(
                f"A triplet batch needs hotels_per_batch >= 2 and images_per_hotel >= 2, got {hotels_per_batch} x "
                f"{images_per_hotel}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batches is not None and batches < 1:
            raise ValueError(f"batches must be None or >= 1, got {batches}")
        global_batch = hotels_per_batch * images_per_hotel
        if global_batch % world_size:
            raise PresetError(
                f"batch_size = hotels_per_batch x images_per_hotel = {hotels_per_batch} x {images_per_hotel} = "
                f"{global_batch} is the global batch of all Ray Train workers and does not split evenly across "
                f"{world_size} workers; choose hotels_per_batch and images_per_hotel whose product is a multiple of "
                f"{world_size}, or run a number of workers per trial that divides {global_batch}"
            )
        # Per usable hotel: its item indices of source 0 and of source 1 (in dataset order; shuffled when drawn).
        order = np.argsort(hotel_ids, kind="stable")
        hotels, starts, counts = np.unique(hotel_ids[order], return_index=True, return_counts=True)
        self.groups: list[tuple[np.ndarray, np.ndarray]] = []
        for start, count in zip(starts, counts, strict=True):
            if count < 2:
                continue
            items = order[start : start + count]
            self.groups.append((items[sources[items] == 0], items[sources[items] == 1]))
        if len(self.groups) < hotels_per_batch:
            raise LayoutError(
                f"Only {len(self.groups)} of the {len(hotels)} training hotels have at least 2 images (a positive "
                f"pair), fewer than hotels_per_batch={hotels_per_batch} distinct hotels per batch"
            )
        self.hotels_per_batch, self.images_per_hotel = hotels_per_batch, images_per_hotel
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch, self.per_rank = global_batch, global_batch // world_size
        usable_images = sum(len(a) + len(b) for a, b in self.groups)
        self.batches = batches if batches is not None else max(1, usable_images // global_batch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the batches of `epoch` next (the same on every rank for the same seed)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.per_rank
        for batch in self.global_batches():
            yield batch[lo : lo + self.per_rank]

    def global_batches(self) -> Iterator[list[int]]:
        """This epoch's whole global batches (what all ranks' slices make up together)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        for hotels in self._hotel_batches(rng):
            yield np.concatenate([self._images(rng, *self.groups[h]) for h in hotels]).tolist()

    def _hotel_batches(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """`self.batches` arrays of `hotels_per_batch` distinct hotels (indices into `self.groups`) from shuffled
        cycles over all hotels. A batch that straddles two cycles takes the next cycle's first hotels that it does
        not already hold; the ones it skips stay in that cycle, which keeps each cycle a visit of every hotel."""
        n, size = len(self.groups), self.hotels_per_batch
        cycle, position = rng.permutation(n), 0
        for _ in range(self.batches):
            taken = cycle[position : position + size]
            position += len(taken)
            if len(taken) < size:  # the cycle ran out: a new one, its first picks not already in this batch
                cycle = rng.permutation(n)
                first = np.flatnonzero(~np.isin(cycle, taken))[: size - len(taken)]
                cycle = np.concatenate([cycle[first], np.delete(cycle, first)])
                position = len(first)
                taken = np.concatenate([taken, cycle[:position]])
            yield taken

    def _images(self, rng: np.random.Generator, zero: np.ndarray, one: np.ndarray) -> np.ndarray:
        """`images_per_hotel` item indices of one hotel, balanced between its sources (see the class docstring)."""
        k = self.images_per_hotel
        if len(zero) + len(one) < k:  # too few images: each once, then repeats from the source picked less so far
            picks = [list(zero), list(one)]
            for _ in range(k - len(zero) - len(one)):
                present = [s for s, pool in enumerate((zero, one)) if len(pool)]
                fewest = min(len(picks[s]) for s in present)
                source = rng.choice([s for s in present if len(picks[s]) == fewest])
                pool = zero if source == 0 else one
                picks[source].append(pool[rng.integers(len(pool))])
            chosen = np.array(picks[0] + picks[1], dtype=np.int64)
            return chosen[rng.permutation(k)]
        half = k // 2 + (k % 2) * int(rng.integers(2))  # source 0's share; the odd image from a random source
        k0 = min(len(zero), max(half, k - len(one)))
        chosen = np.concatenate([rng.choice(zero, k0, replace=False), rng.choice(one, k - k0, replace=False)])
        return chosen[rng.permutation(k)]
