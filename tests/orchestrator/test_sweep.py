"""The sweep end to end on a local Ray (2 CPUs): grid, resume, Optuna, worker crash, MLflow, fast clear errors."""

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient

from orchestrator import sweep, tracking, weights
from tasks import get_task
from tasks.hotels import EmbeddingNet

from .conftest import GRID_ARMS


def common(tmp_path, name):
    return [
        "--task",
        "classification",
        "--preset",
        "smoke",
        "--epochs",
        "2",
        "--storage",
        str(tmp_path / "sweeps"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--name",
        name,
    ]


@pytest.fixture
def progress(caplog):
    """The sweep's own log lines (its logger does not propagate to pytest's root handler): one per trial event."""
    logger = logging.getLogger("orchestrator.sweep")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def runs_of(root):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("classification")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_grid_sweep_tracks_every_trial_and_resumes_without_duplicates(grid_sweep):
    """Three thesis arms as variant specs (a name, a spec with an option, an alias) x 2 seeds."""
    arms, results = GRID_ARMS, grid_sweep.results
    assert sorted((r.variant, r.seed, r.status) for r in results) == sorted((a, s, "ok") for a in arms for s in (0, 1))
    client, runs = runs_of(grid_sweep.root)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 6 and len(runs) == 7
    assert sorted((r.data.params["variant"], r.data.params["seed"]) for r in children) == sorted(
        (a, str(s)) for a in arms for s in (0, 1)
    )
    params = {r.data.params["variant"]: r.data.params for r in children}
    assert (
        params["gated:norm=inside"]["variant.base"] == "gated"
        and params["gated:norm=inside"]["variant.norm"] == "inside"
    )
    assert params["edge_no7"]["variant.base"] == "edge" and params["zero"]["variant.base"] == "zero"
    # a finished trial keeps no resume checkpoint (Tune never reruns it; its best model is in MLflow)
    # (single-worker trials on a local Ray train in their Tune functions and checkpoint into their Tune folders)
    folder = grid_sweep.root / "sweeps" / grid_sweep.name
    assert len(list(folder.glob("run_trial_*/result.json"))) == 6 and not list(folder.glob("*/checkpoint_*"))
    assert not (folder / "train").exists()  # no Ray Train run of its own
    # each result names its Tune trial, the key by which the sweep's end finds the run of a trial Tune gave up on
    assert sorted(r.trial_id for r in results) == sorted(r.data.tags["bench.trial_id"] for r in children)
    for run in children:
        history = client.get_metric_history(run.info.run_id, "val/top1")
        assert sorted(m.step for m in history) == [0, 1]  # one value per epoch, the epoch as step
        assert run.info.status == "FINISHED"
        assert {"checkpoints", "confusion_matrix.csv", "curves.png"} <= {
            a.path for a in client.list_artifacts(run.info.run_id)
        }

    # Resuming a finished sweep redoes nothing and opens no new MLflow run.
    again = sweep.main([*grid_sweep.args, "--resume"])
    assert sorted((r.variant, r.seed) for r in again) == sorted((r.variant, r.seed) for r in results)
    _, runs_after = runs_of(grid_sweep.root)
    assert len(runs_after) == 7
    for run in runs_after:
        if "mlflow.parentRunId" in run.data.tags:
            assert len(client.get_metric_history(run.info.run_id, "val/top1")) == 2

    # --init runs:/<id>: this sweep's trials as sources. The zero trial's best model starts a hotels model
    # converted to gated (its backbone computing the source's features); the gated:norm=inside trial's loads,
    # every tensor, into a classifier converted the same way.
    uri = grid_sweep.tracking_uri
    run_of = {r.data.params["variant"]: r.info.run_id for r in children if r.data.params["seed"] == "0"}
    with pytest.raises(weights.InitError, match="has no checkpoints/best.pt"):
        weights.check_init(weights.parse_init(f"runs:/{parents[0].info.run_id}"), uri)
    zero = weights.parse_init(f"runs:/{run_of['zero']}")
    weights.check_init(zero, uri)
    state, variant = weights.load_init(zero, uri)
    assert variant == "zero"
    source = torchvision.models.resnet18(num_classes=state["fc.weight"].shape[0])
    source.load_state_dict(state)
    hotels = EmbeddingNet("resnet18", embedding_dim=8)
    weights.initialize(hotels, get_task("hotels"), "gated", {"start": "random"}, zero, uri)
    source.fc, hotels.backbone.fc = torch.nn.Identity(), torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            hotels.eval()(x), torch.nn.functional.normalize(source.eval()(x)), atol=1e-4, rtol=1e-4
        )
    gated = weights.parse_init(f"runs:/{run_of['gated:norm=inside']}")
    state, variant = weights.load_init(gated, uri)
    model = torchvision.models.resnet18(num_classes=state["fc.weight"].shape[0])
    weights.initialize(model, get_task("classification"), "gated_311", {"start": "random"}, gated, uri)
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)


@pytest.mark.slow
def test_optuna_sweep_records_sampled_values(ray_session, tmp_path):
    results = sweep.main(
        [
            *common(tmp_path, "optuna"),
            "--variants",
            "zero",
            "--seeds",
            "2",
            "--search",
            "optuna",
            "--num-samples",
            "2",
            "--space",
            "lr=loguniform:1e-4:1e-2",
        ]
    )
    assert len(results) == 4 and all(r.status == "ok" for r in results)
    assert sorted(r.seed for r in results) == [0, 0, 1, 1]
    sampled = {r.metrics["space.lr"] for r in results}
    assert len(sampled) == 2 and all(1e-4 <= v <= 1e-2 for v in sampled)  # each sample ran for both seeds
    client, runs = runs_of(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {float(r.data.params["preset.lr"]) for r in children} == sampled


def test_unknown_names_list_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="Unknown task 'segmentatoin'. Known tasks: classification"):
        sweep.main(["--task", "segmentatoin"])
    with pytest.raises(SystemExit, match="Unknown conv variant 'edgy'. Known variants: .*edge"):
        sweep.main(["--variants", "edgy"])
    with pytest.raises(SystemExit, match="unknown preset 'huge'.*thesis, cpu, smoke"):
        sweep.main(["--preset", "huge"])
    with pytest.raises(SystemExit, match="unknown preset key 'lrr'"):
        sweep.main(["--space", "lrr=uniform:0:1"])
    with pytest.raises(SystemExit, match="--resume needs --name"):
        sweep.main(["--resume"])


def test_data_root_without_the_layout_shows_the_expected_one(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit, match=r"missing folder(.|\n)*Expected layout:(.|\n)*ROOT/val/<wnid>/<name>.JPEG"):
        sweep.main(["--task", "classification", "--data-root", str(tmp_path), "--preset", "smoke"])
    with pytest.raises(SystemExit, match=r"Cityscapes(.|\n)*Expected layout:(.|\n)*_gtFine_labelIds.png"):
        sweep.main(["--data-root", str(tmp_path), "--preset", "smoke"])  # segmentation, the default task


def test_unreachable_tracking_server_and_ray_address_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("INVALID_PIXELS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="cannot reach the MLflow tracking server at http://127.0.0.1:9"):
        sweep.main(["--preset", "smoke", "--tracking-uri", "http://127.0.0.1:9"])
    with pytest.raises(SystemExit, match="cannot reach a Ray cluster at 127.0.0.1:9"):
        sweep.main(
            ["--preset", "smoke", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--address", "127.0.0.1:9"]
        )
    with pytest.raises(tracking.TrackingError, match="plain file store"):
        tracking.check_tracking_uri("./mlruns")
    # On a cluster the head's MLflow server comes through MLFLOW_TRACKING_URI (the cluster YAMLs set it).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(SystemExit, match="cannot reach the MLflow tracking server at http://127.0.0.1:9"):
        sweep.main(["--preset", "smoke"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bench:hunter2@127.0.0.1:9")
    with pytest.raises(SystemExit, match="holds a password") as refused:
        sweep.main(["--preset", "smoke"])
    assert "hunter2" not in str(refused.value)


def _trial_pids() -> list[int]:
    """PIDs of live Tune function processes (Ray titles them ray::ImplicitFunc...): a single-worker trial on a
    local Ray trains in its own."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ray::ImplicitFunc" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the training process through /proc")
def test_killed_trial_resumes_from_its_last_checkpoint(ray_session, tmp_path):
    """SIGKILL the process that trains after its second checkpoint: the trial restarts from it and finishes in one
    run."""
    args = [*common(tmp_path, "crash"), "--variants", "zero", "--seeds", "1", "--epochs", "8"]
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(results=sweep.main(args)))
    runner.start()
    folder = tmp_path / "sweeps" / "crash"
    while runner.is_alive() and not list(folder.glob("*/checkpoint_000001")):  # epochs 0 and 1 are saved
        time.sleep(0.1)
    pids = _trial_pids()
    assert runner.is_alive() and pids, "the trial ended before its process could be killed"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    runner.join()
    (result,) = outcome["results"]
    assert result.status == "ok" and result.metrics["epoch"] == 7
    client, runs = runs_of(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 and children[0].info.status == "FINISHED"  # the retry continued the same run
    artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {"checkpoints", "summary.json", "curves.png"} <= artifacts  # the best model survived the crash
    history = client.get_metric_history(children[0].info.run_id, "val/top1")
    assert sorted({m.step for m in history}) == list(range(8))  # every epoch logged, none missing
    # Resumed, not restarted (from scratch, epochs 0 and 1 would run twice).
    assert len(history) == 8  # logged after each checkpoint, backfilled on resume: each epoch exactly once
    assert not list(folder.glob("*/checkpoint_*"))  # the finished trial's checkpoint is deleted


def _parent_and_children(tmp_path, name):
    client, runs = runs_of(tmp_path)
    parents = [
        r for r in runs if r.data.tags.get(tracking.SWEEP_TAG) == name and "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


@pytest.mark.slow
def test_a_ddp_trial_trains_in_ray_train_workers_and_checkpoints_through_train(ray_session, tmp_path):
    """Two workers per trial: Train's worker processes (DDP over them) train, not the Tune function, and their
    checkpoints are Train's (under train/), the finished trial's deleted; MLflow holds each epoch once."""
    args = [*common(tmp_path, "ddp"), "--variants", "zero", "--seeds", "1", "--workers-per-trial", "2"]
    (result,) = sweep.main(args)
    assert result.status == "ok" and result.metrics["epoch"] == 1
    folder = tmp_path / "sweeps" / "ddp"
    (run,) = (folder / "train").iterdir()  # the trial's Ray Train run
    assert run.name == f"train-{result.trial_id}" and not list(run.glob("checkpoint_[0-9]*"))
    assert not list(folder.glob("run_trial_*/checkpoint_*"))  # nothing checkpointed through Tune
    client, runs = runs_of(tmp_path)
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED" and child.data.params["trial_id"] == result.trial_id
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val/top1")) == [0, 1]


@pytest.mark.slow
def test_a_failing_sweep_ends_its_parent_run_failed(ray_session, tmp_path):
    """Tune cannot write its state (the storage path is a file): the error surfaces, the parent run says FAILED."""
    (tmp_path / "sweeps").write_text("not a folder")
    with pytest.raises(Exception) as caught:
        sweep.main([*common(tmp_path, "broken"), "--variants", "zero", "--seeds", "1"])
    assert not isinstance(caught.value, SystemExit)  # Ray's own error, not swallowed into a message
    _, parent, children = _parent_and_children(tmp_path, "broken")
    assert parent.info.status == "FAILED" and children == []


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="sends SIGINT to itself")
def test_ctrl_c_marks_the_sweep_interrupted_and_resume_finishes_it(ray_session, tmp_path, capsys, progress):
    """Ctrl-C during a trial: the trial says `interrupted`, MLflow runs end KILLED, and the printed command resumes it
    from its last checkpoint into the same runs, each epoch logged once."""
    args = [*common(tmp_path, "ctrlc"), "--variants", "zero", "--seeds", "1", "--epochs", "6"]
    folder = tmp_path / "sweeps" / "ctrlc"
    stop = threading.Event()

    def interrupt_after_first_checkpoint():
        while not stop.is_set() and not list(folder.glob("*/checkpoint_*")):
            time.sleep(0.05)
        if not stop.is_set():
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; Ray Tune's handler stops the sweep

    watcher = threading.Thread(target=interrupt_after_first_checkpoint)
    watcher.start()
    try:
        results = sweep.main(args)
    finally:
        stop.set()
        watcher.join()
    assert [(r.variant, r.seed, r.status) for r in results] == [("zero", 0, "interrupted")]
    out = capsys.readouterr().out
    assert "1 trial(s) interrupted" in out and f"--resume --name ctrlc --storage {tmp_path / 'sweeps'}" in out
    assert "Tuner.restore" not in out
    client, parent, children = _parent_and_children(tmp_path, "ctrlc")
    assert parent.info.status == "KILLED" and [c.info.status for c in children] == ["KILLED"]
    # The Ctrl-C comes once the first checkpoint is written; the epoch it holds reaches MLflow then or, if the stop
    # came first, on resume (each epoch once either way, checked below).
    interrupted_at = len(client.get_metric_history(children[0].info.run_id, "val/top1"))
    assert interrupted_at < 6

    resume = ["--resume", "--name", "ctrlc", "--storage", str(tmp_path / "sweeps")]  # the printed command
    with pytest.raises(SystemExit, match=r"these differ: --epochs \(started with 6\)"):
        sweep.main([*resume, "--epochs", "3"])  # a resumed sweep keeps its own arguments
    progress.clear()
    (again,) = sweep.main(resume)
    assert again.status == "ok" and again.metrics["epoch"] == 5
    lines = [r.getMessage() for r in progress.records if r.name == "orchestrator.sweep"]
    # Tune resumes the trial from the last result it received before the stop (none: it starts it again)
    epoch = results[0].metrics.get("epoch")
    assert (
        "zero seed 0: started" if epoch is None else f"zero seed 0: resumed after epoch {int(epoch) + 1}/6"
    ) in lines
    assert "zero seed 0: epoch 6/6  val/top1" in "\n".join(lines) and lines[-1].startswith("zero seed 0: finished")
    client, parent, children = _parent_and_children(tmp_path, "ctrlc")
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED"]
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "val/top1")]
    assert sorted(steps) == list(range(6))  # resumed from the checkpoint into the same run, each epoch once


@pytest.mark.slow
def test_a_diverging_trial_is_failed_with_its_reason_and_the_others_finish(ray_session, tmp_path, capsys):
    """--init from a model whose logits overflow: that trial stops at its first batch, is not retried, and says why
    in the table, the closing lines and MLflow; the trial from scratch finishes."""
    task = get_task("classification")
    model = task.build_model(task.presets["smoke"], num_classes=4)
    state = model.state_dict()
    state["fc.weight"] = state["fc.weight"] * 1e38  # finite weights, infinite logits
    torch.save(state, tmp_path / "overflowing.pt")
    args = [*common(tmp_path, "diverge"), "--variants", "zero", "--seeds", "1", "--init", "scratch"]
    results = sweep.main([*args, str(tmp_path / "overflowing.pt")])
    by_init = {r.variant: r for r in results}
    assert by_init["zero"].status == "ok" and by_init["zero"].metrics["epoch"] == 1
    bad = by_init[f"zero +init {tmp_path / 'overflowing.pt'}"]
    assert bad.status == "failed" and bad.reason.startswith("diverged: train/loss is inf at epoch 0 batch 0")
    out = capsys.readouterr().out
    assert "1 trial(s) failed:" in out and bad.reason in out
    client, parent, children = _parent_and_children(tmp_path, "diverge")
    status = {c.data.params["init"]: (c.info.status, c.data.tags.get(tracking.FAILURE_TAG)) for c in children}
    assert status == {"scratch": ("FINISHED", None), str(tmp_path / "overflowing.pt"): ("FAILED", bad.reason)}
    assert parent.info.status == "FAILED"
    markdown = Path(client.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path))).read_text()
    assert bad.reason in markdown and "| failed " in markdown


@pytest.mark.slow
def test_the_terminal_shows_one_line_per_trial_event_and_rays_output_only_with_verbose(tmp_path):
    """A sweep in its own process, with its own Ray (as `make sweep` runs it): the plan, each trial's events and the
    closing table; Tune's tables and boxes, the checkpoint lines and the trial processes' logs only with --verbose."""
    chatter = (
        "Trial status",
        "Configuration for experiment",
        "Checkpoint successfully created",
        "(run_trial pid=",
        "Token authentication is enabled",
    )

    # As a user's shell has it: a Ray started earlier in this test process sets RAY_AUTH_MODE in its environment,
    # and with it set Ray prints no token notice.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}

    def run(name: str, *extra: str) -> str:
        args = [*common(tmp_path, name), "--variants", "zero", "--seeds", "1", "--epochs", "1", *extra]
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.sweep", *args], capture_output=True, text=True, timeout=600, env=env
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    quiet = run("quiet")
    marker = " I orchestrator.sweep: "
    events = [line.split(marker, 1)[1] for line in quiet.splitlines() if f"{marker}zero seed 0: " in line]
    assert len(events) == 3 and events[0] == "zero seed 0: started", events
    assert re.fullmatch(r"zero seed 0: epoch 1/1  val/top1 [\d.]+  \d+ s/epoch", events[1])
    assert re.fullmatch(r"zero seed 0: finished, best val/top1 [\d.]+", events[2])
    assert "best/top1: mean" in quiet and "--verbose prints it here" in quiet
    assert not [c for c in chatter if c in quiet]
    verbose = run("verbose", "--verbose")
    assert [c for c in chatter if c in verbose] == list(chatter)
    assert "zero seed 0: started" in verbose and "--verbose prints it here" not in verbose
