"""Hotel-recognition metrics: top-k accuracy against a brute-force reading of the dataset's evaluate/retrieval.py,
the faiss indexes (exact order, recall of the approximate defaults, tiny galleries, bad options) and `evaluate`."""

import math

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks import Evaluation
from tasks.hotels import metrics
from tasks.hotels.metrics import (
    CHAIN_K,
    EXACT_BELOW,
    INSTANCE_K,
    TOP,
    RetrievalLoaders,
    build_index,
    embed,
    evaluate,
    index_gallery,
    ivf_lists,
    search,
    search_by_list,
    search_index,
    topk_accuracy,
)
from tasks.hotels.presets import PRESETS

KEYS = [f"instance_top{k}" for k in INSTANCE_K] + [f"chain_top{k}" for k in CHAIN_K]


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def hotel_data(rng, gallery: int, queries: int, dim: int, hotels: int, spread: float = 0.8):
    """Clustered embeddings: hotels around random centres, a third of the hotels (and some queries) of unknown chain."""
    centres = rng.standard_normal((hotels, dim))
    hotel_chains = rng.integers(0, 4, hotels)
    hotel_chains[rng.random(hotels) < 0.3] = -1
    gallery_hotels = rng.integers(0, hotels, gallery)
    query_hotels = rng.integers(0, hotels, queries)
    g = normalised(centres[gallery_hotels] + spread * rng.standard_normal((gallery, dim)))
    q = normalised(centres[query_hotels] + spread * rng.standard_normal((queries, dim)))
    return g, q, gallery_hotels, hotel_chains[gallery_hotels], query_hotels, hotel_chains[query_hotels]


def brute_force(gallery, queries, gallery_hotels, gallery_chains, query_hotels, query_chains) -> dict[str, float]:
    """The dataset's evaluate/retrieval.py, query by query: the rank of the first right hotel (chain) among the 100
    nearest by inner product; chain accuracy over the queries of a known chain only."""
    instance = {k: [] for k in INSTANCE_K}
    chain = {k: [] for k in CHAIN_K}
    for q, hotel, chain_id in zip(queries, query_hotels, query_chains, strict=True):
        order = np.argsort(-(gallery @ q), kind="stable")[:TOP]
        hotels, chains = list(gallery_hotels[order]), list(gallery_chains[order])
        first_hotel = hotels.index(hotel) if hotel in hotels else math.inf
        for k in INSTANCE_K:
            instance[k].append(first_hotel < k)
        if chain_id > -1:
            first_chain = chains.index(chain_id) if chain_id in chains else math.inf
            for k in CHAIN_K:
                chain[k].append(first_chain < k)
    out = {f"instance_top{k}": 100 * np.mean(v) for k, v in instance.items()}
    return out | {f"chain_top{k}": 100 * np.mean(v) if v else math.nan for k, v in chain.items()}


# top-k accuracy ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gallery_size", [400, 150, 60, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_accuracy_agrees_with_brute_force(gallery_size, seed):
    rng = np.random.default_rng(seed)
    data = hotel_data(rng, gallery_size, 80, 16, hotels=max(gallery_size // 6, 3))
    gallery, queries, *labels = data
    neighbours = search(gallery, queries)
    assert neighbours.shape == (80, TOP) and neighbours.dtype == np.int64
    assert (neighbours[:, min(gallery_size, TOP) :] == -1).all()  # a gallery under 100: the rest is -1
    ours = topk_accuracy(neighbours, *labels)
    expected = brute_force(*data)
    assert list(ours) == KEYS
    for key in KEYS:
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key
    assert 0 < ours["instance_top1"] < 100  # the labels are neither hopeless nor trivial
    assert (labels[1] == -1).any() and (labels[3] == -1).any()  # unknown chains on both sides


def test_topk_accuracy_by_hand():
    gallery_hotels = np.array([10, 11, 12, 13, 14])
    gallery_chains = np.array([1, -1, 2, 2, -1])
    neighbours = np.full((4, TOP), -1)
    neighbours[0, :3] = [1, 0, 4]  # hotel 11 first; chain 1 at rank 2 (the unknown chain at rank 1 never matches)
    neighbours[1, :5] = [4, 1, 3, 2, 0]  # hotel 12 at rank 4; query chain unknown: excluded from the chain numbers
    neighbours[2, :2] = [3, 2]  # hotel 14 never found; chain 2 first
    neighbours[3, :1] = [1]  # a query of unknown chain -1 beside a gallery image of unknown chain: no match anyway
    query_hotels = np.array([11, 12, 14, 99])
    query_chains = np.array([1, -1, 2, -1])
    result = topk_accuracy(neighbours, gallery_hotels, gallery_chains, query_hotels, query_chains)
    assert result["instance_top1"] == 25.0  # query 0
    assert result["instance_top10"] == result["instance_top100"] == 50.0  # queries 0 and 1
    assert result["chain_top1"] == 50.0  # of the 2 queries of known chain, query 2 at rank 1
    assert result["chain_top3"] == result["chain_top5"] == 100.0  # query 0 at rank 2


def test_topk_accuracy_undefined_cases():
    neighbours = np.zeros((2, TOP), np.int64)
    result = topk_accuracy(neighbours, np.array([5]), np.array([3]), np.array([5, 6]), np.array([-1, -1]))
    assert result["instance_top1"] == 50.0
    assert all(math.isnan(result[f"chain_top{k}"]) for k in CHAIN_K)  # no query of a known chain
    empty = topk_accuracy(np.zeros((0, TOP), np.int64), np.array([5]), np.array([3]), np.array([]), np.array([]))
    assert list(empty) == KEYS and all(math.isnan(v) for v in empty.values())
    nothing = topk_accuracy(np.full((1, TOP), -1), np.array([]), np.array([]), np.array([5]), np.array([1]))
    assert nothing["instance_top100"] == 0.0 and nothing["chain_top5"] == 0.0  # an empty gallery finds nothing
    with pytest.raises(ValueError, match="neighbours must be"):
        topk_accuracy(np.zeros((2, 10), np.int64), np.array([5]), np.array([3]), np.array([5, 6]), np.array([1, 1]))
    with pytest.raises(ValueError, match="outside a gallery"):
        topk_accuracy(np.full((1, TOP), 3), np.array([5]), np.array([3]), np.array([5]), np.array([1]))


# the indexes ---------------------------------------------------------------------------------------------------------


def test_flat_search_is_the_exact_order():
    rng = np.random.default_rng(0)
    gallery = normalised(rng.standard_normal((700, 24)))
    queries = normalised(rng.standard_normal((40, 24)))
    found = search(gallery, queries, k=50)
    scores = queries @ gallery.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :50]
    found_scores = np.take_along_axis(scores, found, axis=1)
    assert np.allclose(found_scores, np.take_along_axis(scores, expected, axis=1), atol=1e-6)
    assert (found == expected).mean() > 0.999  # the same indices, up to a tie in float rounding


def clustered(rng, size: int, queries: int, dim: int = 48):
    """Hotel-like clusters: 20 images per hotel, hotels around 10 chain centres, queries noisier than images."""
    chains = normalised(rng.standard_normal((10, dim)))
    hotels = normalised(
        chains[rng.integers(0, 10, size // 20)] + 0.8 * normalised(rng.standard_normal((size // 20, dim)))
    )
    gallery = normalised(hotels[np.arange(size) % len(hotels)] + 0.9 * normalised(rng.standard_normal((size, dim))))
    picked = hotels[rng.integers(0, len(hotels), queries)]
    return gallery, normalised(picked + 1.1 * normalised(rng.standard_normal((queries, dim))))


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return np.mean(
        [len(np.intersect1d(f[f >= 0], e[e >= 0])) / (e >= 0).sum() for f, e in zip(found, exact, strict=True)]
    )


@pytest.fixture(scope="module")
def clustered_gallery():
    rng = np.random.default_rng(0)
    gallery, queries = clustered(rng, 20_000, 300)
    return gallery, queries, search(gallery, queries)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_defaults_keep_recall(kind, clustered_gallery):
    gallery, queries, exact = clustered_gallery
    assert recall(search(gallery, queries, kind=kind), exact) >= 0.99


def test_ivf_options_reach_the_index_and_it_is_approximate(clustered_gallery):
    gallery, queries, exact = clustered_gallery
    index = index_gallery(gallery, "ivf", {"nlist": 64, "nprobe": 2, "train_size": 5000})
    assert isinstance(index, faiss.IndexIVFFlat) and (index.nlist, index.nprobe, index.ntotal) == (64, 2, 20_000)
    assert recall(search_index(index, queries), exact) < 0.99  # two lists of 64 miss neighbours: the control
    hnsw = index_gallery(gallery[:2000], "hnsw", {"m": 8, "ef_construction": 20, "ef_search": 30})
    assert isinstance(hnsw, faiss.IndexHNSWFlat) and (hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch) == (20, 30)


@pytest.mark.parametrize("nprobe,k", [(8, 100), (1, 300)])
def test_search_by_list_equals_faiss_search(nprobe, k, clustered_gallery):
    gallery, queries, _ = clustered_gallery
    index = index_gallery(gallery, "ivf", {"nlist": 128, "nprobe": nprobe})
    _, expected = index.search(queries, k)
    found = search_by_list(index, queries, k)
    assert found.shape == expected.shape and found.dtype == np.int64
    assert np.array_equal(found == -1, expected == -1)  # nprobe=1, k=300: fewer than k probed, -1 alike
    assert (found == expected).mean() > 0.999


def test_large_ivf_searches_list_by_list(clustered_gallery, monkeypatch):
    gallery, queries, _ = clustered_gallery
    index = index_gallery(gallery, "ivf", {"nlist": 128, "nprobe": 16})
    _, expected = index.search(queries, TOP)
    calls = []
    monkeypatch.setattr(metrics, "search_by_list", lambda *args: calls.append(args) or search_by_list(*args))
    assert (search_index(index, queries) == expected).mean() > 0.999 and not calls  # a small gallery: faiss' search
    monkeypatch.setattr(metrics, "LIST_GALLERY_BYTES", gallery.nbytes)  # as if it outgrew the caches
    assert (search_index(index, queries) == expected).mean() > 0.999 and len(calls) == 1
    search_index(index, queries[:10])  # too few queries per list: faiss' search again
    assert len(calls) == 1


def test_ivf_sizes_itself_to_the_gallery(capfd):
    assert ivf_lists(1_000_000) == ivf_lists(None) == 1024
    assert ivf_lists(100_000) == 256 and ivf_lists(20_000) == 128
    assert ivf_lists(EXACT_BELOW) == EXACT_BELOW // 39  # capped: 39 training points per list
    assert ivf_lists(5000, nlist=4096) == 5000 // 39
    assert build_index(8, "ivf").nlist == 1024
    rng = np.random.default_rng(0)
    gallery = normalised(rng.standard_normal((EXACT_BELOW, 8)))
    index = index_gallery(gallery, "ivf")
    assert isinstance(index, faiss.IndexIVFFlat) and index.ntotal == EXACT_BELOW
    assert "WARNING" not in capfd.readouterr().err  # faiss' warning about too few training points
    assert type(build_index(8, "ivf", size=EXACT_BELOW - 1)) is faiss.IndexFlatIP
    assert type(build_index(8, "hnsw", size=5)) is faiss.IndexFlatIP


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("size", [0, 1, 5, 150])
def test_tiny_galleries_work_for_every_kind(kind, size):
    rng = np.random.default_rng(size)
    gallery = normalised(rng.standard_normal((size, 8))) if size else np.zeros((0, 8), np.float32)
    queries = normalised(rng.standard_normal((6, 8)))
    found = search(gallery, queries, kind=kind)
    assert found.shape == (6, TOP) and found.dtype == np.int64
    expected = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :TOP]
    assert np.array_equal(found[:, :size], expected) and (found[:, size:] == -1).all()
    assert search(gallery, queries[:0], kind=kind).shape == (0, TOP)


def test_bad_kinds_and_options_are_errors():
    with pytest.raises(ValueError, match="unknown index kind 'annoy'; valid kinds: flat, ivf, hnsw"):
        build_index(8, "annoy")
    with pytest.raises(ValueError, match="unknown option.*nprobes.*valid options: nlist, nprobe, train_size"):
        build_index(8, "ivf", {"nprobes": 4})
    with pytest.raises(ValueError, match="valid options: m, ef_construction, ef_search"):
        build_index(8, "hnsw", {"nlist": 4})
    with pytest.raises(ValueError, match="valid options: none"):
        build_index(8, "flat", {"nprobe": 4})
    for value in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="positive integer"):
            build_index(8, "ivf", {"nprobe": value})
    gallery = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="dimension"):
        search(gallery, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="unknown index kind"):
        search(gallery, gallery, kind="exact")


def test_gpu_index_only_where_faiss_has_one():
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    assert ("Gpu" in type(build_index(8, "flat")).__name__) == has_gpu  # gpu=None: a GPU index where possible
    assert type(build_index(8, "flat", gpu=False)) is faiss.IndexFlatIP
    if not has_gpu:
        with pytest.raises(ValueError, match="no GPU support"):
            build_index(8, "flat", gpu=True)


# evaluate ------------------------------------------------------------------------------------------------------------


class Embedder(nn.Module):
    """(images, masks) -> L2-normalised embeddings of the masked images."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, dim)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear((images * masks).flatten(1)), dim=1)


class HotelImages(TensorDataset):
    """Images, masks and (hotel, chain) labels, served as the hotels loaders do: ((image, mask), label)."""

    def __getitem__(self, index):
        image, mask, label = super().__getitem__(index)
        return (image, mask), label


def hotel_loader(generator: torch.Generator, n: int, hotels: int, batch_size: int) -> DataLoader:
    hotel = torch.randint(0, hotels, (n,), generator=generator)
    chain = torch.where(hotel % 3 == 0, -1, hotel % 2)  # a third of the hotels of unknown chain
    base = torch.randn(hotels, 3, 4, 4, generator=generator)
    images = base[hotel] + 0.7 * torch.randn(n, 3, 4, 4, generator=generator)
    masks = (torch.rand(n, 1, 4, 4, generator=generator) > 0.2).float()
    return DataLoader(HotelImages(images, masks, torch.stack([hotel, chain], 1)), batch_size=batch_size)


@pytest.mark.parametrize("index,amp", [("flat", None), ("hnsw", None), ("flat", "bf16")])
def test_evaluate_matches_topk_accuracy_of_the_embeddings(index, amp):
    g = torch.Generator().manual_seed(0)
    loaders = RetrievalLoaders(
        gallery=hotel_loader(g, 1500, 40, 64),
        queries={"unoccluded": hotel_loader(g, 90, 40, 32), "high": hotel_loader(g, 50, 40, 32)},
    )
    torch.manual_seed(0)
    model = Embedder().train()
    preset = PRESETS["cpu"].updated(index=index, amp=amp)
    device = torch.device("cpu")
    result = evaluate(model, loaders, device, preset)
    assert isinstance(result, Evaluation) and result.confusion is None and result.tables == []
    assert model.training  # the train/eval mode is restored
    assert set(result.scalars) == {
        f"test_{level}/{key}" for level in ("unoccluded", "high") for key in [*KEYS, "queries"]
    }
    gallery, gallery_labels = embed(model, loaders.gallery, device, preset)
    assert gallery.shape == (1500, 12) and gallery.dtype == np.float32 and gallery_labels.dtype == np.int64
    assert np.allclose(np.linalg.norm(gallery, axis=1), 1, atol=1e-2)
    for level, loader in loaders.queries.items():
        queries, labels = embed(model, loader, device, preset)
        expected = topk_accuracy(
            search(gallery, queries, kind=index), gallery_labels[:, 0], gallery_labels[:, 1], labels[:, 0], labels[:, 1]
        )
        assert result.scalars[f"test_{level}/queries"] == len(queries)
        for key, value in expected.items():
            assert result.scalars[f"test_{level}/{key}"] == pytest.approx(value), (level, key)
    assert 0 < result.scalars["test_unoccluded/instance_top10"] < 100


def test_embed_keeps_to_max_batches_and_eval_mode():
    g = torch.Generator().manual_seed(1)
    loader = hotel_loader(g, 100, 5, 16)
    model = Embedder().eval()
    embeddings, labels = embed(model, loader, torch.device("cpu"), PRESETS["cpu"].updated(max_batches=2))
    assert embeddings.shape == (32, 12) and labels.shape == (32, 2)
    assert np.array_equal(labels, loader.dataset.tensors[2][:32].numpy())
    assert not model.training


def test_evaluate_with_empty_sets():
    g = torch.Generator().manual_seed(2)
    empty = DataLoader(HotelImages(torch.zeros(0, 3, 4, 4), torch.zeros(0, 1, 4, 4), torch.zeros(0, 2).long()))
    preset = PRESETS["cpu"]
    loaders = RetrievalLoaders(
        gallery=hotel_loader(g, 200, 10, 50), queries={"low": empty, "high": hotel_loader(g, 7, 10, 4)}
    )
    result = evaluate(Embedder(), loaders, torch.device("cpu"), preset).scalars
    assert result["test_low/queries"] == 0 and all(math.isnan(result[f"test_low/{key}"]) for key in KEYS)
    assert result["test_high/queries"] == 7 and not math.isnan(result["test_high/instance_top100"])
    nothing = evaluate(
        Embedder(), RetrievalLoaders(empty, {"high": loaders.queries["high"]}), torch.device("cpu"), preset
    )
    assert nothing.scalars["test_high/instance_top100"] == 0.0 and nothing.scalars["test_high/chain_top5"] == 0.0
