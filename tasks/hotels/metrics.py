"""Hotel-recognition metrics as the dataset's evaluate/retrieval.py defines them: for each test image the 100 nearest
training images by inner product of L2-normalised embeddings (faiss), then instance top-1/10/100 (the query's hotel
among the first k) and chain top-1/3/5 (the query's chain among the first k neighbours' chains, over the queries of
a known chain), per occlusion level; docs/datasets.md, "Hotels-50K hotel recognition".

The index is exact (`flat`, the thesis' choice and the preset default) or approximate (`ivf`, `hnsw`). Defaults of the
approximate ones, chosen with `python -m benchmarks.retrieval` on clustered synthetic embeddings that score about as
the thesis' models (recall@100 against exact search, the thesis' 1M x 256 gallery and 18,000 queries):

- ivf: `nlist` = the power of two nearest sqrt(gallery size) (1024 for 1M images), capped so that every list has 39
  training points, as faiss asks; the quantizer is trained on `train_size` = 64 x nlist gallery vectors (a random
  sample; training and adding took 7 s at 1M on 2 cores); `nprobe` = 64 lists scanned (6% of the gallery): recall
  0.992 (on noisier embeddings nprobe 32, 48, 64 gave 0.970, 0.987, 0.994). Searched list by list (`search_by_list`).
- hnsw: `m` = 32 links, `ef_construction` = 40, `ef_search` = 512 (faiss searches max(ef_search, k)): recall 0.992
  (at 200k vectors ef_search 256, 384, 512 gave 0.991, 0.996, 0.997). ef_construction 80 gave lower recall than 40
  on these inner-product embeddings (0.977 against 0.991 at ef_search 256, 200k vectors).

A query's 100 nearest images belong to many hotels, so recall@100 >= 0.99 needs wide searches: on a 2-core CPU the
ivf search is 1.5-2x as fast as the exact one (5x the torch baseline), the hnsw search 1-5x (as noisy), but building the
graph takes 6-25 min at 1M, more than an exact evaluation; the exact `flat` index stays the sensible default there.

Galleries of fewer than `EXACT_BELOW` vectors are searched exactly whatever the kind: an IVF cannot train there, and
an exact search of so few vectors costs less than building any approximate index.

Under several Ray Train workers the embedding is sharded: each worker embeds its contiguous shard (`shard`) of the
gallery and of each level's queries, the shards are gathered to rank 0 (`gather_shards`), and rank 0 alone builds
the index once and scores; embedding the million-image gallery is what costs, the search is one index either way.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch
import torch.distributed as dist
from faiss.contrib.inspect_tools import get_invlist
from torch import nn
from torch.utils.data import DataLoader

from ..common import autocast, log_progress
from ..data import check_process_group
from ..evaluation import Evaluation
from .presets import HotelsPreset

logger = logging.getLogger(__name__)

TOP = 100  # neighbours retrieved per query, as the dataset's evaluation expects
INSTANCE_K = (1, 10, 100)  # instance (hotel) top-k
CHAIN_K = (1, 3, 5)  # chain top-k
LEVELS = ("unoccluded", "low", "medium", "high")  # the test sets, by occlusion level
EXACT_BELOW = 1000  # galleries smaller than this are searched exactly, whatever the index kind
MIN_POINTS_PER_LIST = 39  # faiss' k-means wants at least 39 training points per IVF list

# Options of each index kind and their defaults (None: derived from the gallery size, see `ivf_lists`).
INDEX_OPTIONS: dict[str, dict[str, int | None]] = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": 64, "train_size": None},
    "hnsw": {"m": 32, "ef_construction": 40, "ef_search": 512},
}
TRAIN_POINTS_PER_LIST = 64  # default IVF training sample: this many gallery vectors per list
THESIS_GALLERY = 1_000_000  # the gallery size `ivf_lists` assumes when it is not told one
LIST_BATCH = 20  # mean queries per IVF list from which `search_index` searches list by list ...
LIST_GALLERY_BYTES = 2**28  # ... in an IVF of at least this many bytes of vectors (256 MiB: beyond CPU caches)


def index_options(kind: str, options: dict[str, Any] | None = None) -> dict[str, int | None]:
    """The options of an index `kind` with its defaults filled in; ValueError for an unknown kind, option or value."""
    if kind not in INDEX_OPTIONS:
        raise ValueError(f"unknown index kind {kind!r}; valid kinds: {', '.join(INDEX_OPTIONS)}")
    defaults = INDEX_OPTIONS[kind]
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for index kind {kind!r}; valid options: {valid}")
    for name, value in options.items():
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ValueError(f"index option {name}={value!r} for kind {kind!r}: expected a positive integer")
    return {**defaults, **{name: int(value) for name, value in options.items()}}


def ivf_lists(size: int | None, nlist: int | None = None) -> int:
    """IVF lists for a gallery of `size` vectors: `nlist` if given, else the power of two nearest sqrt(size), in both
    cases at most size / 39 so that k-means has its 39 points per list (and at least 1)."""
    size = THESIS_GALLERY if size is None else size
    if nlist is None:
        nlist = 2 ** round(math.log2(max(math.sqrt(size), 1)))
    cap = max(size // MIN_POINTS_PER_LIST, 1)
    if nlist > cap:
        logger.info("IVF with %d lists for %d vectors: using %d lists (39 training points each)", nlist, size, cap)
    return min(nlist, cap)


def gpu_available() -> bool:
    """Whether this faiss build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.cache
def gpu_resources() -> faiss.StandardGpuResources:
    """One set of faiss GPU resources (streams, scratch memory) for all the GPU indexes of this process."""
    return faiss.StandardGpuResources()


def build_index(
    dim: int,
    kind: str = "flat",
    options: dict[str, Any] | None = None,
    *,
    gpu: bool | None = None,
    size: int | None = None,
) -> faiss.Index:
    """An empty inner-product index of `dim`-d vectors: `flat` (exact), `ivf` (IndexIVFFlat) or `hnsw` (IndexHNSWFlat).

    `options` override the kind's defaults (module docstring): ivf `nlist`, `nprobe`, `train_size`; hnsw `m`,
    `ef_construction`, `ef_search`; flat none. `size`, the number of vectors it will hold when known, sizes an IVF
    (`ivf_lists`) and makes ivf and hnsw flat below `EXACT_BELOW` vectors; without it the IVF is sized for the
    thesis' 1M images. An IVF must be trained before vectors are added (`index_gallery` does both). `gpu`: a GPU
    index (flat and ivf; hnsw stays on the CPU, faiss has no GPU HNSW); None: when faiss has GPU support and a GPU.
    """
    opts = index_options(kind, options)
    if size is not None and size < EXACT_BELOW and kind != "flat":
        logger.info("%s index of %d vectors: searching exactly (flat) below %d vectors", kind, size, EXACT_BELOW)
        kind = "flat"
    if gpu is None:
        gpu = gpu_available()
    elif gpu and not gpu_available():
        raise ValueError("gpu=True, but this faiss build has no GPU support or sees no GPU (use gpu=None or False)")
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, opts["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = opts["ef_construction"]
        index.hnsw.efSearch = opts["ef_search"]
        return index
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = ivf_lists(size, opts["nlist"])
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = opts["nprobe"]
        train_size = opts["train_size"] or TRAIN_POINTS_PER_LIST * nlist
        # k-means samples at most this many points per list from what `train` gets
        index.cp.max_points_per_centroid = max(train_size // nlist, MIN_POINTS_PER_LIST)
    if gpu:
        max_per_list = index.cp.max_points_per_centroid if kind == "ivf" else None
        index = faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
        if max_per_list is not None and hasattr(index, "cp"):
            index.cp.max_points_per_centroid = max_per_list
    return index


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) matrix, got shape {x.shape}")
    return x


def index_gallery(
    gallery: np.ndarray, kind: str = "flat", options: dict[str, Any] | None = None, *, gpu: bool | None = None
) -> faiss.Index:
    """An index of `kind` (see `build_index`) holding the (N, D) float32 `gallery`, trained on a sample of it."""
    gallery = _as_matrix(gallery, "gallery")
    index = build_index(gallery.shape[1], kind, options, gpu=gpu, size=len(gallery))
    if not index.is_trained:
        index.train(gallery)  # k-means on a random sample of at most cp.max_points_per_centroid x nlist vectors
    index.add(gallery)
    return index


def search_index(index: faiss.Index, queries: np.ndarray, k: int = TOP) -> np.ndarray:
    """int64 (M, k) indices of the `k` best gallery vectors per query in `index`, best first, -1 past its size.

    A CPU IVF of `LIST_GALLERY_BYTES` or more, with on average `LIST_BATCH` or more queries per list, is searched
    list by list (`search_by_list`): the same neighbours (ties aside), several times faster than faiss' own search
    there (about 4x at the thesis' scale); below that, faiss' search is as fast or faster.
    """
    queries = _as_matrix(queries, "queries")
    if queries.shape[1] != index.d:
        raise ValueError(f"queries of dimension {queries.shape[1]} for an index of dimension {index.d}")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if (
        type(index) is faiss.IndexIVFFlat
        and len(queries) * index.nprobe >= LIST_BATCH * index.nlist
        and index.ntotal * index.d * 4 >= LIST_GALLERY_BYTES
    ):
        return search_by_list(index, queries, k)
    _, neighbours = index.search(queries, k)
    return neighbours.astype(np.int64, copy=False)


def search_by_list(index: faiss.IndexIVFFlat, queries: np.ndarray, k: int = TOP) -> np.ndarray:
    """`index.search(queries, k)[1]` of a CPU IndexIVFFlat, computed list by list: each list's vectors are compared
    with all the queries that probe it in one matrix product (faiss.knn), and the per-list results merged.

    faiss' own search scans each query's lists separately: memory-bound once lists outgrow the CPU caches (each list
    is read once per query that probes it), where a matrix product reads a list once per batch of queries; the
    batched way of faiss.contrib.big_batch_search. int64 (M, k), best first, -1 where fewer than k were probed.
    """
    queries = _as_matrix(queries, "queries")
    nprobe = min(index.nprobe, index.nlist)
    _, probed = index.quantizer.search(queries, nprobe)  # (M, nprobe) lists of each query
    flat = probed.ravel()
    order = np.argsort(flat, kind="stable")  # the (query, probe) pairs grouped by list
    query_ids = order // nprobe
    bounds = np.searchsorted(flat[order], np.arange(index.nlist + 1))
    results = faiss.ResultHeap(len(queries), k, keep_max=True)  # running top-k of every query
    for number in range(index.nlist):
        subset = query_ids[bounds[number] : bounds[number + 1]]
        if len(subset) == 0 or index.invlists.list_size(number) == 0:
            continue
        ids, codes = get_invlist(index.invlists, number)
        vectors = codes.view(np.float32).reshape(len(ids), index.d)
        scores, rows = faiss.knn(queries[subset], vectors, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        results.add_result_subset(subset, scores, ids[rows])
    results.finalize()
    return results.I


def search(
    gallery: np.ndarray,
    queries: np.ndarray,
    k: int = TOP,
    kind: str = "flat",
    options: dict[str, Any] | None = None,
) -> np.ndarray:
    """int64 (M, k) indices into the (N, D) `gallery` of the `k` largest inner products with each of the (M, D)
    `queries`, best first; -1 where the gallery has fewer than `k` vectors. `kind` and `options`: `build_index`."""
    gallery, queries = _as_matrix(gallery, "gallery"), _as_matrix(queries, "queries")
    if gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"gallery of dimension {gallery.shape[1]} but queries of dimension {queries.shape[1]}")
    return search_index(index_gallery(gallery, kind, options), queries, k)


def topk_accuracy(
    neighbours: np.ndarray,
    gallery_hotels: np.ndarray,
    gallery_chains: np.ndarray,
    query_hotels: np.ndarray,
    query_chains: np.ndarray,
) -> dict[str, float]:
    """Instance and chain top-k accuracy (%) of retrieved neighbours, as the dataset's evaluate/retrieval.py counts.

    `neighbours`: (M, >= 100) gallery indices per query, best first, -1 for none (a gallery under 100 vectors).
    Instance top-k (k in INSTANCE_K): the share of queries whose hotel is that of one of the first k neighbours.
    Chain top-k (k in CHAIN_K): the share, among the queries of a known chain (chain id > -1), whose chain is that
    of one of the first k neighbours; a neighbour of unknown chain (-1) never matches, nor does a -1 neighbour.
    Keys `instance_top<k>` and `chain_top<k>`; NaN for all without queries, and for the chain ones when no query
    has a known chain.
    """
    neighbours = np.asarray(neighbours)
    gallery_hotels, gallery_chains = np.asarray(gallery_hotels), np.asarray(gallery_chains)
    query_hotels, query_chains = np.asarray(query_hotels), np.asarray(query_chains)
    depth = max(*INSTANCE_K, *CHAIN_K)
    if neighbours.ndim != 2 or neighbours.shape[1] < depth:
        raise ValueError(f"neighbours must be (queries, >= {depth}), got shape {neighbours.shape}")
    if not len(neighbours) == len(query_hotels) == len(query_chains):
        raise ValueError(
            f"{len(neighbours)} rows of neighbours for {len(query_hotels)} query hotels and {len(query_chains)} chains"
        )
    if len(gallery_hotels) != len(gallery_chains):
        raise ValueError(f"{len(gallery_hotels)} gallery hotels but {len(gallery_chains)} gallery chains")
    neighbours = neighbours[:, :depth]
    found = neighbours >= 0
    if neighbours.size and neighbours.max() >= len(gallery_hotels):
        raise ValueError(f"neighbour index {neighbours.max()} outside a gallery of {len(gallery_hotels)}")
    rows = np.where(found, neighbours, 0)
    if len(gallery_hotels) == 0:  # nothing found, nothing to look up
        hotels = chains = np.full(neighbours.shape, -1)
    else:
        hotels, chains = gallery_hotels[rows], gallery_chains[rows]
    # whether the first k neighbours hold a match, for every k at once: a running "any" along the ranks
    instance = np.logical_or.accumulate(found & (hotels == query_hotels[:, None]), axis=1)
    chain = np.logical_or.accumulate(found & (chains > -1) & (chains == query_chains[:, None]), axis=1)
    known = query_chains > -1

    def percent(hits: np.ndarray) -> float:
        return 100.0 * float(hits.mean()) if len(hits) else math.nan

    return {
        **{f"instance_top{k}": percent(instance[:, k - 1]) for k in INSTANCE_K},
        **{f"chain_top{k}": percent(chain[known, k - 1]) for k in CHAIN_K},
    }


@dataclass
class RetrievalLoaders:
    """What the hotels task evaluates on: the gallery (the training images) and the test queries per level.

    With `world_size` > 1 every loader holds only worker `rank`'s `shard` of its set, and `evaluate` is collective:
    all `world_size` workers of the default process group call it and rank 0 gets the scores.
    """

    gallery: DataLoader
    queries: dict[str, DataLoader]  # level name ("unoccluded", "low", "medium", "high") -> its test images
    rank: int = 0  # whose shard the loaders hold
    world_size: int = 1  # how many shards make up each set; 1: the loaders hold the whole sets


def _embed(
    model: nn.Module, loader: DataLoader, device: torch.device, preset: HotelsPreset, *, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`embed`, as tensors: float32 (N, D) embeddings on `device` ((0, 0) for no images), int64 (N, 2) labels on
    the CPU."""
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    batches = itertools.islice(loader, preset.max_batches)
    count = min(len(loader), preset.max_batches or len(loader))
    try:
        with torch.inference_mode():
            for (images, masks), targets in log_progress(batches, total=count, what=what, logger=logger):
                images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
                with autocast(device, preset.amp):
                    outputs.append(model(images, masks).float())
                labels.append(targets)
    finally:
        model.train(was_training)
    if not outputs:
        return torch.zeros((0, 0), dtype=torch.float32, device=device), torch.zeros((0, 2), dtype=torch.int64)
    return torch.cat(outputs), torch.cat(labels).long().reshape(-1, 2)


def _numpy(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(embeddings.cpu().numpy(), dtype=np.float32), labels.cpu().numpy()


def embed(
    model: nn.Module, loader: DataLoader, device: torch.device, preset: HotelsPreset, *, what: str = "embedding"
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 (N, D) embeddings and int64 (N, 2) labels (hotel_id, chain_id) of the loader's images.

    Batches are `((images, masks), labels)`; `model(images, masks)` gives (B, D) L2-normalised embeddings. The model
    runs in eval mode (restored afterwards) without autograd, in `preset.amp`, on at most `preset.max_batches`
    batches; embeddings stay on the device until the end.
    """
    return _numpy(*_embed(model, loader, device, preset, what=what))


def gather_shards(rows: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """On rank 0 the (N_r, D) `rows` of every rank r of the default process group, concatenated in rank order on
    the CPU; None on the other ranks.

    Collective: every rank calls it, with rows of one dtype and width (an empty shard may be (0, 0)); ValueError
    on every rank when the widths differ. The shards differ in length (`shard`), so their shapes are all-gathered
    first and each shard is padded to the longest for one `dist.gather`. Under NCCL the rows travel on `device`
    (this rank's GPU), under gloo (or gloo for CPU tensors beside NCCL) on the CPU. Rank 0 receives world_size x
    the longest shard, about the whole set (1 GiB for the thesis' 1M x 256 float32 gallery), and the other ranks
    send only their shard: `all_gather_object` would pickle the whole set on every rank and through the CPU.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    on = device if dist.get_backend() == dist.Backend.NCCL else torch.device("cpu")
    rows = rows.to(on)
    if rows.ndim != 2:
        raise ValueError(f"rows must be an (N, D) matrix, got shape {tuple(rows.shape)}")
    shapes = [torch.zeros(2, dtype=torch.int64, device=on) for _ in range(world_size)]
    dist.all_gather(shapes, torch.tensor(rows.shape, dtype=torch.int64, device=on))
    lengths, widths = zip(*(shape.tolist() for shape in shapes), strict=True)
    width = max(widths)
    if any(n and w != width for n, w in zip(lengths, widths, strict=True)):
        raise ValueError(f"shards of rows (length, width) {list(zip(lengths, widths, strict=True))}: widths differ")
    longest = max(lengths)
    padded = rows.new_zeros((longest, width))
    if len(rows):
        padded[: len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in range(world_size)] if rank == 0 else None
    if longest:  # nothing to send when every shard is empty
        dist.gather(padded, gathered, dst=0)
    if rank != 0:
        return None
    return torch.cat([part[:length].cpu() for part, length in zip(gathered, lengths, strict=True)])


def evaluate(model: nn.Module, loaders: RetrievalLoaders, device: torch.device, preset: HotelsPreset) -> Evaluation:
    """Instance top-1/10/100 and chain top-1/3/5 (%) per occlusion level: the 100 nearest gallery images of each
    query, from one index (`preset.index`, `preset.index_options`) of the embedded gallery searched once with the
    queries of every level together.

    Scalars `test_<level>/instance_top<k>`, `test_<level>/chain_top<k>` and `test_<level>/queries` (the count) for
    every level of `loaders.queries`.

    Loaders of one shard (`loaders.world_size` > 1) make it collective: every rank embeds its shards of all the
    sets, the embeddings and labels are gathered to rank 0 (`gather_shards`), which builds the index and returns
    the scores of the whole sets, as one process would; the other ranks return an empty `Evaluation` (no scalars).
    RuntimeError when the process group is not the one of the loaders' shards.
    """
    if loaders.world_size > 1:
        check_process_group(loaders.rank, loaders.world_size, what="loaders")
    # every set embedded before any is gathered: one wait for the slowest worker, not one per set
    embedded = [_embed(model, loaders.gallery, device, preset, what="gallery batches")]
    embedded += [
        _embed(model, loader, device, preset, what=f"{level} query batches")
        for level, loader in loaders.queries.items()
    ]
    if loaders.world_size > 1:
        embedded = [(gather_shards(rows, device), gather_shards(labels, device)) for rows, labels in embedded]
        if loaders.rank != 0:
            return Evaluation({})
    (gallery, gallery_labels), *per_level = [_numpy(rows, labels) for rows, labels in embedded]
    levels = dict(zip(loaders.queries, per_level, strict=True))
    queries = [embeddings for embeddings, _ in levels.values() if len(embeddings)]
    neighbours = np.zeros((0, TOP), np.int64)
    if queries:
        queries = np.concatenate(queries)
        if len(gallery) == 0:  # nothing to find, in an index as wide as the queries
            gallery = np.zeros((0, queries.shape[1]), np.float32)
        neighbours = search_index(index_gallery(gallery, preset.index, preset.index_options), queries, TOP)
    scalars: dict[str, float] = {}
    start = 0
    for level, (embeddings, labels) in levels.items():
        found = neighbours[start : start + len(embeddings)]
        start += len(embeddings)
        accuracy = topk_accuracy(found, gallery_labels[:, 0], gallery_labels[:, 1], labels[:, 0], labels[:, 1])
        scalars.update({f"test_{level}/{name}": value for name, value in accuracy.items()})
        scalars[f"test_{level}/queries"] = float(len(embeddings))
    return Evaluation(scalars)
