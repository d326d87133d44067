"""The MLflow tracker draws any task's evaluation: the artifact names and CSV bytes the sweep's users rely on."""

import json

import pytest
import torch
from torch import nn

from orchestrator import tracking
from tasks import ClassTable, ConfusionMatrix, Evaluation, ensure_synthetic, get_task


@pytest.fixture
def tracker(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "tracking-test")
    run = tracking.find_or_create_run(
        uri, experiment, tags={tracking.TRIAL_TAG: "t1"}, key=tracking.TRIAL_TAG, name="r"
    )
    return tracking.MlflowTracker(uri, run)


def test_csv_bytes():
    confusion = ConfusionMatrix(torch.tensor([[3, 1], [0, 2]]), ["cat", "dog"])
    assert tracking.confusion_csv(confusion) == "true \\ predicted,cat,dog\r\ncat,3,1\r\ndog,0,2\r\n"
    table = ClassTable("per_class_iou", ["cat", "dog"], {"iou_whole": [75.0, float("nan")], "iou_tile": [1 / 3, 50]})
    assert tracking.table_csv(table) == "class,iou_whole,iou_tile\r\ncat,75.000,0.333\r\ndog,nan,50.000\r\n"


def test_segmentation_artifacts(tracker, tmp_path):
    task = get_task("segmentation")
    preset = task.presets["smoke"].updated(max_batches=1)
    root = ensure_synthetic(task, preset, tmp_path / "cache")
    _, val = task.build_loaders(root, preset, rank=0, world_size=1, seed=0, workers=0)
    torch.manual_seed(0)
    evaluation = task.evaluate(nn.Conv2d(3, 19, 1), val, torch.device("cpu"), preset)
    best = tmp_path / "best.pt"
    torch.save({"epoch": 0}, best)
    tracker.log_best(best, evaluation)
    for epoch in range(2):
        tracker.log_epoch({"epoch": epoch, "train/loss": 1.0 - epoch / 4, **evaluation.scalars}, epoch)
    tracker.log_final({"best/miou": 12.5}, ["train/loss", *task.table_metrics])

    client, run = tracker.client, tracker.run_id
    artifacts = {a.path for a in client.list_artifacts(run)}
    assert artifacts == {
        "checkpoints",
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "per_class_iou.csv",
        "per_class_iou.png",
        "curves.png",
        "summary.json",
    }
    assert [a.path for a in client.list_artifacts(run, "checkpoints")] == ["checkpoints/best.pt"]
    lines = open(client.download_artifacts(run, "per_class_iou.csv", str(tmp_path))).read().splitlines()
    assert lines[0] == "class,iou_whole,iou_tile,iou_tile_overlap" and len(lines) == 20 and lines[1].startswith("road,")
    lines = open(client.download_artifacts(run, "confusion_matrix.csv", str(tmp_path))).read().splitlines()
    assert lines[0].startswith("true \\ predicted,road,sidewalk,") and len(lines) == 20
    assert json.load(open(client.download_artifacts(run, "summary.json", str(tmp_path)))) == {"best/miou": 12.5}
    # The artifacts live beside the store, not in ./mlruns of whatever folder the process was started from.
    assert (tmp_path / "mlruns" / "tracking-test" / run / "artifacts" / "summary.json").is_file()


def test_a_task_without_tables_logs_only_the_confusion_matrix(tracker, tmp_path):
    best = tmp_path / "best.pt"
    torch.save({}, best)
    confusion = ConfusionMatrix(torch.eye(4, dtype=torch.long), ["a", "b", "c", "d"])
    tracker.log_best(best, Evaluation({"val/top1": 100.0}, confusion=confusion))
    tracker.log_best(best, Evaluation({"val/top1": 100.0}))  # nothing but the checkpoint: no error either
    artifacts = {a.path for a in tracker.client.list_artifacts(tracker.run_id)}
    assert artifacts == {"checkpoints", "confusion_matrix.csv", "confusion_matrix.png"}
