"""The MLflow tracker draws any task's evaluation: the artifact names and CSV bytes the sweep's users rely on."""

import json
import logging
import time
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import mlflow.pytorch
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from torch import nn

from orchestrator import tracking
from orchestrator.config import TrialConfig
from orchestrator.loop import prepare, train, variant_options
from orchestrator.weights import initialize, parse_init
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


@pytest.fixture
def load_logged(monkeypatch, tmp_path):
    """Load a logged model as its user would: `load(uri, "models:/...")` gives its local copy and the module.

    MLflow 3.17 resolves a models:/ URI against its global tracking URI only (download_artifacts' `tracking_uri`
    does not reach it): here MLFLOW_TRACKING_URI.
    """
    copies = iter(range(100))

    def load(uri: str, model_uri: str) -> tuple[str, nn.Module]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert mlflow.get_tracking_uri() == uri, "a test left a global tracking URI behind"
        path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / f"{next(copies)}"))
        return path, mlflow.pytorch.load_model(path)

    return load


def test_a_trial_logs_its_best_model_as_an_mlflow_model(tmp_path, load_logged):
    """A trial run on a real store: its best epoch's weights, and nothing else, become a LoggedModel of its run,
    tagged with the task and variant, with a signature; MLflow loads it back (pytorch and pyfunc, registry too)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "model-test")
    run = tracking.find_or_create_run(
        uri, experiment, tags={tracking.TRIAL_TAG: "t7", "variant": "partial"}, key=tracking.TRIAL_TAG, name="r:1"
    )
    cfg = TrialConfig(
        task="classification",
        variant="partial",
        seed=4,
        preset="smoke",
        cache_dir=str(tmp_path / "cache"),
        loader_workers=0,
        overrides={"epochs": 2, "max_batches": 4},
        mlflow_run_id=run,
        tracking_uri=uri,
    )
    tracking.log_params(uri, run, cfg.params())  # as the trial function does
    tracker = tracking.MlflowTracker(uri, run)
    started = time.perf_counter()
    out = train(cfg, tracker=tracker)
    assert time.perf_counter() - started < 120  # measured: the model adds about 1 s to a smoke trial

    client = MlflowClient(uri)
    (model,) = client.search_logged_models([experiment])
    assert model.source_run_id == run and model.status == LoggedModelStatus.READY and model.name == "r_1"
    assert (
        model.tags.items()
        >= {
            "task": "classification",
            "variant": "partial",
            "seed": "4",
            "preset": "smoke",
            tracking.TRIAL_TAG: "t7",
        }.items()
    )
    assert model.params["variant"] == "partial" and model.params["preset.epochs"] == "2"  # the run's params
    (output,) = client.get_run(run).outputs.model_outputs
    best_epoch = max(range(2), key=lambda e: out["history"][e]["val/top1"])  # the earliest on ties
    assert output.model_id == model.model_id and output.step == best_epoch
    linked = {m.key: m for m in model.metrics}
    assert linked["val/top1"].value == out["best/top1"] and linked["val/top1"].step == best_epoch
    assert len(client.get_metric_history(run, "val/top1")) == 2  # linking adds no point to the run's curve

    best = torch.load(client.download_artifacts(run, "checkpoints/best.pt", str(tmp_path)), weights_only=False)
    path, loaded = load_logged(uri, model.model_uri)
    # Weights only: the model file and its pickle's module name; the optimizer stays in Ray's resume checkpoints.
    assert sorted(p.name for p in (Path(path) / "data").iterdir()) == ["model.pth", "pickle_module_info.txt"]
    assert not loaded.training and next(loaded.parameters()).device.type == "cpu"
    state = loaded.state_dict()
    assert state.keys() == best["model"].keys() and all(torch.equal(state[k], v) for k, v in best["model"].items())
    # The same output as the trained model at its best epoch, rebuilt from the checkpoint the way the loop builds it.
    task, preset, root = prepare(cfg)
    reference = task.build_model(preset, num_classes=4)
    initialize(reference, task, cfg.variant, variant_options(cfg, preset), parse_init(cfg.init), None)
    reference.load_state_dict(best["model"])
    reference.eval()
    images = torch.randn(3, 3, 40, 40)  # another batch and image size than the signature's example
    with torch.no_grad():
        expected = reference(images)
        assert torch.equal(loaded(images), expected)
        assert torch.equal(mlflow.pytorch.load_model(model.model_uri)(images), expected)  # straight from the store

    info = Model.load(path)
    assert str(info.signature.inputs) == "[Tensor('float32', (-1, 3, -1, -1))]"
    assert str(info.signature.outputs) == "[Tensor('float32', (-1, 4))]"
    assert info.model_id == model.model_id and info.run_id == run
    assert "torch==" + torch.__version__.split("+")[0] in (Path(path) / "requirements.txt").read_text()
    assert torch.allclose(torch.from_numpy(mlflow.pyfunc.load_model(path).predict(images.numpy())), expected)

    client.create_registered_model("bench-best")
    version = client.create_model_version("bench-best", model.model_uri, run_id=run, model_id=model.model_id)
    _, registered = load_logged(uri, f"models:/bench-best/{version.version}")
    with torch.no_grad():
        assert torch.equal(registered(images), expected)


class HoleFilled(nn.Module):
    """A two-input model as a task with masks has (images, masks): its holes filled with 0, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.conv(images * masks)


def test_a_two_input_model_is_logged_whole_and_served_with_its_inputs_packed(tracker, tmp_path, load_logged):
    """A task with masks (hotels): the model taking (images, masks) is logged; MLflow's pyfunc passes one tensor,
    so it serves the inputs concatenated on the channels, as the signature says."""
    torch.manual_seed(0)
    net = HoleFilled()
    best_state = {k: v + 0.5 for k, v in net.state_dict().items()}  # not the weights `net` holds now
    torch.save({"model": best_state, "epoch": 3}, tmp_path / "best.pt")
    images, masks = torch.randn(8, 3, 16, 16), (torch.rand(8, 1, 16, 16) > 0.3).float()
    model_id = tracker.log_model(net, net, tmp_path / "best.pt", (images, masks), {"task": "hotels"})

    logged = tracker.client.get_logged_model(model_id)
    assert logged.tags["task"] == "hotels" and logged.tags[tracking.TRIAL_TAG] == "t1"
    path, loaded = load_logged(tracker.client.tracking_uri, logged.model_uri)
    info = Model.load(path)
    assert str(info.signature.inputs) == "[Tensor('float32', (-1, 4, -1, -1))]"  # 3 image channels + 1 mask
    assert str(info.signature.outputs) == "[Tensor('float32', (-1, 5, -1, -1))]"
    assert info.metadata == {"packed_inputs": [3, 1]}
    net.load_state_dict(best_state)
    with torch.no_grad():
        expected = net(images, masks)
        assert torch.equal(loaded(images, masks), expected)  # called as the task calls it
    packed = torch.cat([images, masks], dim=1).numpy()
    assert torch.allclose(torch.from_numpy(mlflow.pyfunc.load_model(path).predict(packed)), expected)


class KnowsItself(nn.Module):
    """A module whose output depends on its own identity, as convs.Masked's did before it learned to find its
    layers again after unpickling: its pickled copy computes something else."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.me = id(self)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x = torch.cat([images, masks], dim=1)
        return self.conv(x) if self.me == id(self) else self.conv(x * 0)


def test_a_model_that_does_not_survive_pickling_is_refused(tracker, tmp_path):
    """The tracker checks the model as MLflow loads it back, and logs none rather than a wrong one."""
    net = model = KnowsItself()
    torch.save({"model": model.state_dict(), "epoch": 0}, tmp_path / "best.pt")
    images, masks = torch.randn(2, 3, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert tracker.log_model(net, model, tmp_path / "best.pt", (images, masks), {}) is None
    reason = tracker.client.get_run(tracker.run_id).data.tags[tracking.MODEL_ERROR_TAG]
    assert reason.startswith("ModelMismatchError: the model as MLflow loads it back does not give")
    (model,) = tracker.client.search_logged_models([tracker.client.get_run(tracker.run_id).info.experiment_id])
    assert model.status == LoggedModelStatus.FAILED


def test_a_resumed_trial_logs_the_best_model_from_the_runs_checkpoint(tracker, tmp_path, load_logged):
    """Resumed in a new worker, the trial's best epoch may predate its local files: the run's logged copy serves."""
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten())
    best_state = {k: torch.full_like(v, 0.25) for k, v in model.state_dict().items()}
    best = tmp_path / "worker-1" / "best.pt"
    best.parent.mkdir()
    torch.save({"model": best_state, "epoch": 1}, best)
    tracker.log_best(best, Evaluation({"val/top1": 50.0}))
    best.unlink()  # the first worker's folder is gone
    model_id = tracker.log_model(model, model, tmp_path / "worker-2" / "best.pt", torch.ones(4, 3, 2, 2), {})
    _, loaded = load_logged(tracker.client.tracking_uri, f"models:/{model_id}")
    assert all(torch.equal(v, torch.full_like(v, 0.25)) for v in loaded.state_dict().values())
    assert tracker.client.get_run(tracker.run_id).outputs.model_outputs[0].step == 1


def test_a_model_that_cannot_be_logged_leaves_the_trial_alone_and_says_why(tracker, tmp_path, caplog):
    model = nn.Conv2d(3, 2, 1)
    torch.save({"model": {"weight": torch.zeros(7)}, "epoch": 0}, tmp_path / "best.pt")  # no longer fits the model
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        assert tracker.log_model(model, model, tmp_path / "best.pt", torch.ones(1, 3, 4, 4), {}) is None
    reason = tracker.client.get_run(tracker.run_id).data.tags[tracking.MODEL_ERROR_TAG]
    assert reason.startswith("RuntimeError: Error(s) in loading state_dict") and reason in caplog.text
    assert not tracker.client.search_logged_models([tracker.client.get_run(tracker.run_id).info.experiment_id])


def test_the_sweeps_end_marks_its_running_trials_failed_or_killed_and_leaves_ended_ones_alone(tmp_path):
    """Tune gave up on t1 (FAILED), t2 stopped with the sweep (KILLED), t3 had ended FINISHED, and another sweep's
    running trial is not this sweep's to end."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "end-test")

    def trial(sweep: str, trial_id: str) -> str:
        tags = {tracking.TRIAL_TAG: trial_id, tracking.SWEEP_TAG: sweep}
        return tracking.find_or_create_run(uri, experiment, tags=tags, key=tracking.TRIAL_TAG, name=trial_id)

    runs = {name: trial("s", name) for name in ("t1", "t2", "t3")}
    other = trial("other", "t4")
    tracking.finish_run(uri, runs["t3"], "FINISHED")
    ended = tracking.end_running_trials(uri, experiment, "s", "KILLED", failed={"t1", "t3"})
    client = MlflowClient(uri)
    assert sorted(ended) == sorted([runs["t1"], runs["t2"]])
    statuses = {name: client.get_run(run).info.status for name, run in runs.items()}
    assert statuses == {"t1": "FAILED", "t2": "KILLED", "t3": "FINISHED"}
    assert client.get_run(other).info.status == "RUNNING"
