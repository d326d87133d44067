"""Top-100 retrieval for Hotels-50K's evaluation: exact search in torch (the baseline), the hotels task's exact faiss
index and its approximate defaults (ivf, hnsw): build and search times, speed-ups, recall@k.

    python -m benchmarks.retrieval [--gallery N] [--queries M] [--dim D] [--k K] [--hotels H] [--chains C]
                                   [--kinds KIND...] [--ivf KEY=VALUE...] [--hnsw KEY=VALUE...] [--chunk Q]
                                   [--rounds R] [--seed S]

The thesis' scale is the default: 1,000,000 gallery embeddings (the training images) of 256 floats and 18,000
queries (the test images), top-100. The embeddings are synthetic but clustered as a trained model's are: hotels
(`--hotels`, default one per 20 gallery images) around 100 chain centres (Hotels-50K has 92 chains), images
scattered around their hotel, queries noisier than gallery images (other cameras, occlusion), all L2-normalised,
with a decaying spectrum (most variance in a few directions). The spreads are set so that exact search scores about
as the thesis' models do (at 1M: instance top-1 about 4%, top-100 about 29%, chain top-1 about 36%; the thesis'
ImageNet-initialised models 5-7.5%, 24-29%, 27-35%), which is what makes approximate search hard: a query's 100
nearest images belong to many hotels.

The baseline is exact search in torch: one matrix product and `topk` per chunk of `--chunk` queries. Recall@k of
each method is the share of the baseline's k neighbours it finds (exact faiss: 1.0 up to ties). Builds (faiss
copying the gallery, k-means, graph insertion) run one after the other; the searches are interleaved, the queries
in `--rounds` parts each searched by every method in turn, so that machine noise hits all methods alike. Build +
search is what one evaluation costs: the task builds one index and searches it with the queries of all levels.
`--ivf` and `--hnsw` replace the defaults of `tasks.hotels.metrics`, e.g. `--ivf nprobe=32 --hnsw ef_search=256`.
"""

from __future__ import annotations

import sys
import time

import faiss
import numpy as np
import torch

from benchmarks.common import describe, table
from orchestrator.cli import ArgumentParser, CliError
from tasks.hotels.metrics import (
    TOP,
    TRAIN_POINTS_PER_LIST,
    index_gallery,
    index_options,
    ivf_lists,
    search_index,
    topk_accuracy,
)


def normalise_rows(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """L2-normalise the rows of a float32 matrix in place, a chunk at a time (no full-size temporaries)."""
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return x


def clustered_embeddings(
    gallery: int,
    queries: int,
    dim: int,
    *,
    hotels: int,
    chains: int,
    seed: int = 0,
    image_spread: float = 1.5,
    query_spread: float = 1.6,
    decay: float = 0.75,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic L2-normalised embeddings clustered by hotel and chain: (gallery (N, D), queries (M, D), hotel of
    each gallery vector, hotel of each query, chain of each hotel).

    Noise and centres are drawn with standard deviation (1 + i) ** -decay along dimension i (scaled to unit total
    variance): a chain centre; a hotel centre = chain centre + noise, normalised; an image = hotel centre +
    `image_spread` x noise, normalised; a query the same with `query_spread`. Hotels get equal shares of the gallery.
    """
    rng = np.random.default_rng(seed)
    scale = (1.0 + np.arange(dim, dtype=np.float32)) ** -decay
    scale /= np.linalg.norm(scale)

    def noise(n: int) -> np.ndarray:
        return rng.standard_normal((n, dim), dtype=np.float32) * scale

    chain_centres = normalise_rows(noise(chains))
    hotel_chains = rng.integers(chains, size=hotels)
    hotel_centres = normalise_rows(chain_centres[hotel_chains] + normalise_rows(noise(hotels)))

    def images(hotel_ids: np.ndarray, spread: float) -> np.ndarray:
        out = np.empty((len(hotel_ids), dim), np.float32)
        for start in range(0, len(out), 65536):
            ids = hotel_ids[start : start + 65536]
            out[start : start + len(ids)] = hotel_centres[ids] + spread * noise(len(ids))
        return normalise_rows(out)

    gallery_hotels = rng.permutation(np.arange(gallery) % hotels)
    query_hotels = rng.integers(hotels, size=queries)
    return (
        images(gallery_hotels, image_spread),
        images(query_hotels, query_spread),
        gallery_hotels,
        query_hotels,
        hotel_chains,
    )


def torch_topk(gallery: torch.Tensor, queries: torch.Tensor, k: int, chunk: int) -> np.ndarray:
    """Exact top-k by inner product: a matrix product and `topk` per chunk of queries; int64 (M, k), -1 past N."""
    k_found = min(k, len(gallery))
    out = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ gallery.T
        out[start : start + len(scores), :k_found] = scores.topk(k_found, dim=1).indices.numpy()
    return out


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact neighbours (-1 aside) that `found` holds in the same query's row."""
    width = int(max(found.max(initial=0), exact.max(initial=0))) + 2
    offsets = np.arange(len(exact), dtype=np.int64)[:, None] * width  # row i's indices moved to [i * width, ...)
    hits = np.isin((exact + offsets)[exact >= 0], (found + offsets)[found >= 0])
    return float(hits.mean()) if hits.size else float("nan")


def duration(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"


def parse_options(kind: str, pairs: list[str]) -> dict[str, int]:
    """`KEY=VALUE` words as index options of `kind`, checked as the hotels task checks them."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise CliError(f"--{kind} takes KEY=INTEGER words, got {pair!r}")
        options[key] = int(value)
    try:
        index_options(kind, options)
    except ValueError as error:
        raise CliError(str(error)) from None
    return options


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__)
    parser.add_argument("--gallery", type=int, default=1_000_000, help="gallery embeddings (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=18_000, help="query embeddings (default 18,000)")
    parser.add_argument("--dim", type=int, default=256, help="embedding width (default 256)")
    parser.add_argument("--k", type=int, default=TOP, help=f"neighbours per query (default {TOP})")
    parser.add_argument("--hotels", type=int, default=None, help="hotel clusters (default: gallery / 20)")
    parser.add_argument("--chains", type=int, default=100, help="chain clusters (default 100; Hotels-50K has 92)")
    parser.add_argument(
        "--kinds", nargs="*", default=["ivf", "hnsw"], help="approximate index kinds to time (default ivf hnsw)"
    )
    parser.add_argument(
        "--chunk", type=int, default=None, help="queries per torch matrix product (default: 512 MiB of scores)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic embeddings (default 0)")
    parser.add_argument("--rounds", type=int, default=3, help="parts of the queries, searched in turn (default 3)")
    for kind in ("ivf", "hnsw"):
        parser.add_argument(
            f"--{kind}",
            nargs="*",
            default=[],
            metavar="KEY=VALUE",
            help=f"{kind} options instead of the defaults, e.g. " + ("nprobe=32" if kind == "ivf" else "ef_search=256"),
        )
    args = parser.parse_args(argv)
    for name in ("gallery", "queries", "dim", "k", "rounds"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be positive, got {getattr(args, name)}")
    for kind in args.kinds:
        if kind not in ("ivf", "hnsw"):
            raise CliError(f"unknown --kinds {kind!r}; choose from ivf, hnsw")
    overrides = {kind: parse_options(kind, getattr(args, kind)) for kind in ("ivf", "hnsw")}
    hotels = args.hotels or max(args.gallery // 20, 1)
    chunk = args.chunk or max(1, 2**27 // args.gallery)

    start = time.perf_counter()
    gallery, queries, gallery_hotels, query_hotels, hotel_chains = clustered_embeddings(
        args.gallery, args.queries, args.dim, hotels=hotels, chains=args.chains, seed=args.seed
    )
    print(
        f"\nTop-{args.k} retrieval, gallery {args.gallery:,} x {args.dim} float32, {args.queries:,} queries, "
        f"{hotels:,} hotels in {args.chains:,} chains (synthetic, generated in {time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    print(f"device: {describe(torch.device('cpu'))}, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)")

    gallery_t = torch.from_numpy(gallery)
    baseline = f"torch exact (matmul + topk, {chunk} queries a chunk)"
    searches = {baseline: lambda q: torch_topk(gallery_t, torch.from_numpy(q), args.k, chunk)}
    builds = {baseline: 0.0}
    methods = [("faiss flat (exact)", "flat", None)]
    for kind in args.kinds:
        options = index_options(kind, overrides[kind])
        if kind == "ivf":
            options["nlist"] = ivf_lists(args.gallery, options["nlist"])
            options["train_size"] = options["train_size"] or TRAIN_POINTS_PER_LIST * options["nlist"]
        shown = ", ".join(f"{key}={value}" for key, value in options.items())
        methods.append((f"faiss {kind} ({shown})", kind, overrides[kind]))
    for name, kind, options in methods:  # builds, one after the other
        start = time.perf_counter()
        index = index_gallery(gallery, kind, options, gpu=False)
        builds[name] = time.perf_counter() - start
        searches[name] = lambda q, index=index: search_index(index, q, args.k)
        print(f"{name}: built in {builds[name]:.1f} s", file=sys.stderr, flush=True)

    # searches, interleaved: each part of the queries searched by every method in turn
    for search in searches.values():
        search(queries[:16])  # warm-up
    seconds = dict.fromkeys(searches, 0.0)
    found: dict[str, list[np.ndarray]] = {name: [] for name in searches}
    for part in np.array_split(np.arange(len(queries)), args.rounds):
        for name, search in searches.items():
            start = time.perf_counter()
            found[name].append(search(queries[part]))
            seconds[name] += time.perf_counter() - start
        print(", ".join(f"{name.split(' (')[0]} {t:.1f} s" for name, t in seconds.items()), file=sys.stderr, flush=True)
    exact = np.concatenate(found[baseline])
    flat_s = seconds["faiss flat (exact)"]
    rows = [
        [
            name,
            duration(builds[name]) if name != baseline else "-",
            duration(seconds[name]),
            f"{seconds[baseline] / seconds[name]:.2f}x",
            f"{seconds[baseline] / (builds[name] + seconds[name]):.2f}x",
            f"{flat_s / seconds[name]:.2f}x",
            f"{recall(np.concatenate(found[name]), exact):.3f}",
        ]
        for name in searches
    ]

    padded = np.pad(exact, ((0, 0), (0, max(0, TOP - args.k))), constant_values=-1)  # topk_accuracy wants 100
    accuracy = topk_accuracy(
        padded, gallery_hotels, hotel_chains[gallery_hotels], query_hotels, hotel_chains[query_hotels]
    )
    shown = [key for key in ("instance_top1", "instance_top100", "chain_top1") if int(key.split("top")[1]) <= args.k]
    print("exact search on these embeddings: " + ", ".join(f"{key} {accuracy[key]:.1f}%" for key in shown) + "\n")
    headers = [
        "method",
        "build (s)",
        "search (s)",
        "search vs torch",
        "build + search vs torch",
        "search vs faiss flat",
        f"recall@{args.k}",
    ]
    print(table(headers, rows))
    print(
        f"\nvs: speed-up, the other's search time / this method's time (higher is faster); searches interleaved in "
        f"{args.rounds} parts of the queries, builds one after the other"
    )


if __name__ == "__main__":
    main()
