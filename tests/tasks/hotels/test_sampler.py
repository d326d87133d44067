"""SourceBalancedBatchSampler: hotels x images batches balanced between the sources, the same global batches on
every rank split into contiguous slices, seeded epochs, hotels visited evenly, and the refusals."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tasks.data import LayoutError
from tasks.hotels.sampler import SourceBalancedBatchSampler
from tasks.preset import PresetError


def _dataset(counts: list[tuple[int, int]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled items of hotels 100, 101, ... with (images of source 0, images of source 1) each."""
    hotel_ids = np.concatenate([np.full(a + b, 100 + h) for h, (a, b) in enumerate(counts)])
    sources = np.concatenate([np.r_[np.zeros(a), np.ones(b)] for a, b in counts]).astype(np.int8)
    order = np.random.default_rng(seed).permutation(len(hotel_ids))
    return hotel_ids[order], sources[order]


# both sources balanced or not, one source only, too few images (drawn with replacement), one image (unusable)
COUNTS = [(6, 6), (1, 12), (12, 2), (0, 9), (9, 0), (4, 5), (2, 3), (10, 10), (3, 8), (7, 7), (1, 0), (5, 5)]


def _check_batch(batch: list[int], hotel_ids, sources, hotels: int, images: int) -> None:
    assert len(batch) == hotels * images
    per_hotel = Counter(hotel_ids[batch].tolist())
    assert len(per_hotel) == hotels and set(per_hotel.values()) == {images}
    for hotel in per_hotel:
        mine = [i for i in batch if hotel_ids[i] == hotel]
        available = np.flatnonzero(hotel_ids == hotel)
        assert set(mine) <= set(available.tolist())
        if len(available) >= images:  # without replacement
            assert len(set(mine)) == images
        else:  # every image, then repeats
            assert set(mine) == set(available.tolist())
        used = np.bincount(sources[mine], minlength=2)
        have = np.bincount(sources[available], minlength=2)
        if have.min() > 0:  # balanced, or all of the minority source used
            assert abs(used[0] - used[1]) <= 1 or used[have.argmin()] >= have.min()


@pytest.mark.parametrize("hotels, images", [(4, 4), (5, 3), (13, 8)])
def test_batches_are_hotels_times_images_balanced_between_sources(hotels, images):
    counts = COUNTS if hotels < 13 else COUNTS + [(4, 6)] * 4
    hotel_ids, sources = _dataset(counts)
    sampler = SourceBalancedBatchSampler(hotel_ids, sources, hotels_per_batch=hotels, images_per_hotel=images)
    batches = list(sampler)
    assert len(batches) == len(sampler) == (len(hotel_ids) - 1) // (hotels * images)  # the 1-image hotel left out
    for batch in batches:
        _check_batch(batch, hotel_ids, sources, hotels, images)
    lonely = np.flatnonzero(hotel_ids == 110)  # the hotel with a single image never appears
    assert not set(lonely.tolist()) & {i for b in batches for i in b}


def test_balance_is_exact_where_both_sources_suffice_and_the_minority_is_used_up_elsewhere():
    hotel_ids, sources = _dataset([(6, 6), (1, 12), (12, 2), (20, 20)])
    sampler = SourceBalancedBatchSampler(hotel_ids, sources, hotels_per_batch=4, images_per_hotel=8, batches=30)
    for batch in sampler:
        for hotel, expected in ((100, (4, 4)), (101, (1, 7)), (102, (6, 2)), (103, (4, 4))):
            mine = [i for i in batch if hotel_ids[i] == hotel]
            assert tuple(np.bincount(sources[mine], minlength=2)) == expected


def test_odd_images_per_hotel_give_the_extra_image_to_either_source():
    hotel_ids, sources = _dataset([(10, 10)] * 3)
    sampler = SourceBalancedBatchSampler(hotel_ids, sources, hotels_per_batch=3, images_per_hotel=5, batches=40)
    zeros = Counter(int((sources[b] == 0).sum()) for b in sampler)  # 3 hotels x (2 or 3 from source 0)
    assert set(zeros) <= set(range(6, 10)) and len(zeros) > 1


@pytest.mark.parametrize(
    "hotels, images, world_size", [(4, 4, 2), (4, 4, 4), (6, 4, 4), (13, 8, 2), (13, 8, 4), (13, 8, 8)]
)
def test_every_rank_draws_the_same_global_batches_and_their_slices_partition_them(hotels, images, world_size):
    hotel_ids, sources = _dataset(COUNTS + [(5, 5)] * 6)
    options = dict(hotels_per_batch=hotels, images_per_hotel=images, seed=3, batches=5)
    reference = SourceBalancedBatchSampler(hotel_ids, sources, **options)
    reference.set_epoch(2)
    whole = list(reference)
    ranks = []
    for rank in range(world_size):
        sampler = SourceBalancedBatchSampler(hotel_ids, sources, rank=rank, world_size=world_size, **options)
        sampler.set_epoch(2)
        assert list(sampler.global_batches()) == whole
        ranks.append(list(sampler))
    for step, batch in enumerate(whole):
        slices = [r[step] for r in ranks]
        assert all(len(s) == hotels * images // world_size for s in slices)
        assert sum(slices, []) == batch  # contiguous slices, in rank order
        # a hotel's images together: each hotel on at most ceil(images / slice) + 1 ranks
        for hotel in set(hotel_ids[batch].tolist()):
            on = sum(hotel in set(hotel_ids[s].tolist()) for s in slices)
            assert on <= -(-images // len(slices[0])) + 1


def test_a_global_batch_that_does_not_split_and_too_few_hotels_are_refused():
    hotel_ids, sources = _dataset(COUNTS + [(5, 5)] * 6)
    with pytest.raises(PresetError, match=r"13 x 8 = 104 .* across 3 workers"):
        SourceBalancedBatchSampler(hotel_ids, sources, hotels_per_batch=13, images_per_hotel=8, world_size=3)
    hotel_ids, sources = _dataset([(4, 4), (3, 3), (1, 0), (0, 1), (2, 0)])
    with pytest.raises(LayoutError, match="Only 3 of the 5 training hotels have at least 2 images"):
        SourceBalancedBatchSampler(hotel_ids, sources, hotels_per_batch=4, images_per_hotel=2)
    with pytest.raises(ValueError, match="sources"):
        SourceBalancedBatchSampler(hotel_ids, sources + 2, hotels_per_batch=2, images_per_hotel=2)


def test_epochs_change_the_order_reproducibly():
    hotel_ids, sources = _dataset(COUNTS)
    make = lambda seed: SourceBalancedBatchSampler(  # noqa: E731
        hotel_ids, sources, hotels_per_batch=4, images_per_hotel=4, seed=seed
    )
    sampler = make(0)
    first = list(sampler)
    assert list(sampler) == first  # the same epoch again
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    other = make(0)
    other.set_epoch(1)
    assert list(other) == second
    assert list(make(1)) != first


def test_hotels_are_visited_evenly_over_an_epoch():
    hotel_ids, sources = _dataset(COUNTS + [(5, 5)] * 9)  # 20 usable hotels, 6 per batch: cycles straddle batches
    sampler = SourceBalancedBatchSampler(hotel_ids, sources, hotels_per_batch=6, images_per_hotel=2, batches=47)
    visits = Counter(h for batch in sampler for h in set(hotel_ids[batch].tolist()))
    assert len(visits) == 20 and max(visits.values()) - min(visits.values()) <= 1
    assert sum(visits.values()) == 47 * 6


def test_as_a_data_loader_batch_sampler():
    hotel_ids, sources = _dataset(COUNTS)
    sampler = SourceBalancedBatchSampler(
        hotel_ids, sources, hotels_per_batch=4, images_per_hotel=4, rank=1, world_size=2, batches=3
    )
    loader = DataLoader(TensorDataset(torch.arange(len(hotel_ids))), batch_sampler=sampler)
    assert len(loader) == 3
    assert [b[0].tolist() for b in loader] == list(sampler)
