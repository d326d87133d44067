"""The benchmarks run and print their tables (tiny sizes; the figures themselves come from `make bench`)."""

from benchmarks import convs as bench_convs
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
