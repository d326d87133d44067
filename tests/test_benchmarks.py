"""The benchmarks run and print their tables (tiny sizes; the figures themselves come from `make bench`)."""

import re

import pytest

from benchmarks import convs as bench_convs
from benchmarks import data as bench_data
from benchmarks import edge_layers as bench_edge_layers
from benchmarks import retrieval as bench_retrieval
from benchmarks import segmentation as bench_segmentation
from benchmarks import sweep as bench_sweep
from orchestrator.cli import CliError


def test_segmentation_benchmark_prints_both_tables(capsys):
    bench_segmentation.main(
        ["--device", "cpu", "--height", "32", "--batch", "2", "--rounds", "1", "--warmup", "0", "--variants", "partial"]
    )
    out = capsys.readouterr().out
    assert "| zero    |" in out and "| partial |" in out and "throughput vs zero" in out
    assert "tiles, 1/3 overlap" in out and "(1.00x)" in out
    # The evaluation's batch is the preset's (cpu: 8 images), as the sweep's evaluation feeds the model
    assert "Evaluation of 8 32 x 64 image(s) at once" in out


def test_segmentation_benchmark_refuses_an_empty_evaluation_batch():
    with pytest.raises(CliError, match="--eval-batch must be at least 1, got 0"):
        bench_segmentation.main(["--device", "cpu", "--height", "32", "--eval-batch", "0", "--rounds", "1"])


def test_edge_layers_benchmark_prints_every_padded_conv_and_the_total(capsys):
    bench_edge_layers.main(["--device", "cpu", "--height", "16", "--batch", "2", "--rounds", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header, layers, total = rows[0], rows[1:-1], rows[-1]
    assert [c.strip() for c in header[-5:]] == ["plain", "auto", "strips", "boxes", "columns"]
    # the segmentation cpu model's 14 padded convs (stem, 4 + 4 in layer1-2, 3 ASPP branches, 2 in the decoder)
    assert len(layers) == 14 and layers[0][0].strip() == "stem.0" and total[0].strip() == "all"
    assert {row[4].strip() for row in layers} <= {"strips", "boxes", "columns"}
    assert all(re.fullmatch(r"\d+\.\d+ \(\d+\.\dx\)", cell.strip()) for row in layers for cell in row[6:])


@pytest.mark.parametrize(("flag", "value", "low"), [("--rounds", "0", 1), ("--batch", "0", 1), ("--warmup", "-1", 0)])
def test_edge_layers_benchmark_refuses_counts_below_their_minimum(flag, value, low):
    with pytest.raises(CliError, match=f"{flag} must be at least {low}, got {value}"):
        bench_edge_layers.main(["--device", "cpu", flag, value])


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
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header, zero = [c.strip() for c in rows[0]], [c.strip() for c in rows[1]]
    assert header[2:5] == ["step ms", "images/s", "time"] and zero[0] == "zero"
    assert float(zero[3]) > 0  # images per second of a batch of 2


def test_edge_layers_benchmark_takes_a_preset_and_the_gpu_settings(capsys):
    """--preset picks the segmentation model (thesis: a wide_resnet50_2 with ASPP at dilation 12-36), --amp and
    --channels-last run the layers as the GPU benchmarks run models; the header says which."""
    argv = ["--device", "cpu", "--preset", "thesis", "--height", "16", "--batch", "1", "--rounds", "1"]
    bench_edge_layers.main([*argv, "--warmup", "0", "--amp", "--channels-last"])
    out = capsys.readouterr().out
    assert "segmentation (thesis)" in out and "amp=True, channels_last=True" in out
    assert "| aspp.convs.3.0 | 2048 x 2 x 4" in out and "3x3 s1 d36" in out
    with pytest.raises(CliError, match="unknown segmentation preset 'huge'; choose from "):
        bench_edge_layers.main(["--device", "cpu", "--preset", "huge"])


def test_retrieval_benchmark_prints_times_ratios_and_recall(capsys):
    bench_retrieval.main(["--gallery", "3000", "--queries", "200", "--dim", "32"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip().split(" (")[0]: line for line in out.splitlines() if line.startswith("| ")}
    assert {"torch exact", "faiss flat", "faiss ivf", "faiss hnsw"} <= set(rows) and "recall@100" in out
    assert rows["faiss flat"].rstrip(" |").endswith("1.000")  # exact search finds the baseline's neighbours


def test_data_benchmark_prints_rates_ratios_and_workers(capsys):
    bench_data.main(
        ["--images", "3", "--size", "64x48", "--city-images", "1", "--city-size", "96x48", "--rounds", "1"]
        + ["--warmup", "0", "--target", "1000", "--cpus", "10", "--gpus", "2"]
    )
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    pipelines = {
        f"{task} {split}" for task in ("classification", "segmentation", "hotels") for split in ("train", "eval")
    }
    assert pipelines <= set(rows) and "workers for 1000 img/s" in out
    assert all(re.search(r"\| \d+\.\d\dx +\|", rows[name]) for name in pipelines)  # the tensor vs PIL ratio
    assert "loader_workers_per_gpu(cpus=10, gpus=2) = 3 loader worker(s) per GPU" in out


def test_sweep_benchmark_needs_two_trials_to_split_the_overhead():
    with pytest.raises(CliError, match="--trials must be at least 2"):
        bench_sweep.main(["--trials", "1"])  # refused before Ray starts
