"""The segmentation sweep end to end on a local Ray (2 CPUs): every variant learns, three eval modes.

One seed per variant: the several-seed table (per-seed columns, std, difference to zero) is checked by the
classification grid sweep, and each trial here costs CI about 45 s."""

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

    out = capsys.readouterr().out
    ours = out[out.index("difference to zero") :]
    rows = [line for line in ours.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in rows[1:]] == ["zero", "affine", "edge", "gated", "partial"]
    for column in (
        "best/miou seed 0",
        "best/miou_tile seed 0",
        "best/miou_tile_overlap mean",
        "best/miou std",
        "best/miou_tile_overlap diff to zero",
        "last5/miou mean",
    ):
        assert column in rows[0]
