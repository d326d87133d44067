"""The segmentation sweep end to end on a local Ray (2 CPUs): every variant learns, three eval modes.

One seed per variant: the several-seed table (per-seed columns, std, difference to zero) is checked by the
classification grid sweep, and each trial here costs CI about 45 s."""

import csv
import io
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator import sweep
from tasks import default_cache_dir, ensure_synthetic, get_task
from tasks.segmentation import confusion_matrix, mean_iou

VARIANTS = ["zero", "partial", "gated", "edge", "affine"]


def trivial_miou(root, preset) -> float:
    """The best mIoU of predicting one class everywhere, over all 19 classes, on the validation split."""
    task = get_task("segmentation")
    _, val = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    targets = torch.cat([t for _, t in val])
    return max(mean_iou(confusion_matrix(torch.full_like(targets, c), targets)) for c in range(19))


@pytest.mark.slow
def test_every_variant_learns_and_the_table_shows_the_three_modes(ray_session, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--task", "segmentation", "--preset", "smoke", "--epochs", "3", "--seeds", "1", "--variants", *VARIANTS]
    args += ["--storage", str(tmp_path / "sweeps"), "--tracking-uri", uri, "--name", "seg"]
    results = sweep.main(args)
    captured = capsys.readouterr()
    sweep_out = captured.out
    # the report reads every trial's per-class table, and each trial loads its model back: no progress bars
    assert "Downloading artifacts" not in captured.err
    assert sorted((r.variant, r.seed, r.status) for r in results) == sorted((v, 0, "ok") for v in VARIANTS)
    task = get_task("segmentation")
    root = ensure_synthetic(task, task.presets["smoke"], default_cache_dir())
    trivial = trivial_miou(root, task.presets["smoke"])
    assert trivial < 10
    for r in results:
        assert r.metrics["best/miou"] > trivial + 15, (r.variant, r.seed, r.metrics["best/miou"], trivial)
        for key in ("best/miou_tile", "best/miou_tile_overlap", "last5/miou"):
            assert not math.isnan(r.metrics[key])

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("segmentation")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 5
    run = children[0]
    for key in ("val/miou", "val/miou_tile", "val/miou_tile_overlap"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_class_iou.csv", "per_class_iou.png", "confusion_matrix.csv", "checkpoints", "curves.png"} <= artifacts
    table = client.download_artifacts(run.info.run_id, "per_class_iou.csv", str(tmp_path))
    lines = open(table).read().splitlines()
    assert lines[0] == "class,iou_whole,iou_tile,iou_tile_overlap" and len(lines) == 20 and lines[1].startswith("road,")

    # The report: one table per mode and last5, each arm's single seed (no test possible), per-class IoU per arm.
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.csv", "report/metrics.png", "report/curves.png", "report/per_class_iou.png"} <= report_files
    lines = open(client.download_artifacts(parent.info.run_id, "report/report.csv", str(tmp_path))).read()
    ours = [row for row in csv.DictReader(io.StringIO(lines)) if row["source"] == "this sweep"]
    assert [row["arm"] for row in ours[:5]] == ["zero", "affine", "edge", "gated", "partial"]
    modes = ("miou", "miou_tile", "miou_tile_overlap")
    assert [row["metric"] for row in ours[::5]] == [*(f"best/{m}" for m in modes), "last5/miou"]
    assert all(row["n"] == "1/1" for row in ours) and all(row["p"] == "" for row in ours)
    out = sweep_out + capsys.readouterr().out
    assert "no test possible: fewer than 2 finished seeds" in out
