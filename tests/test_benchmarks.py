"""The benchmarks run and print their tables (tiny sizes; the figures themselves come from `make bench`)."""

from benchmarks import convs as bench_convs
from benchmarks import retrieval as bench_retrieval
from benchmarks import segmentation as bench_segmentation


def test_segmentation_benchmark_prints_both_tables(capsys):
    bench_segmentation.main(
        ["--device", "cpu", "--height", "32", "--batch", "2", "--rounds", "1", "--warmup", "0", "--variants", "partial"]
    )
    out = capsys.readouterr().out
    assert "| zero    |" in out and "| partial |" in out and "throughput vs zero" in out
    assert "tiles, 1/3 overlap" in out and "(1.00x)" in out


def test_convs_benchmark_prints_ratios(capsys):
    bench_convs.main(
        [
            "--device",
            "cpu",
            "--size",
            "32",
            "--batch",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--variants",
            "edge",
            "--no-holes",
        ]
    )
    out = capsys.readouterr().out
    assert "| zero" in out and "| edge" in out and "1.00x" in out


def test_retrieval_benchmark_prints_times_ratios_and_recall(capsys):
    bench_retrieval.main(["--gallery", "3000", "--queries", "200", "--dim", "32"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip().split(" (")[0]: line for line in out.splitlines() if line.startswith("| ")}
    assert {"torch exact", "faiss flat", "faiss ivf", "faiss hnsw"} <= set(rows) and "recall@100" in out
    assert rows["faiss flat"].rstrip(" |").endswith("1.000")  # exact search finds the baseline's neighbours
