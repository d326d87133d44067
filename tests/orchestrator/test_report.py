"""The sweep report read back from MLflow: which runs it takes, its counts per cell, its numbers recomputed
independently from the raw per-epoch histories, its files and its command line."""

import csv
import io
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from orchestrator import report, tables, tracking
from orchestrator.cli import CliError
from orchestrator.loop import summarize

from .conftest import GRID_ARMS

# hand-made sweeps: real MLflow runs written the way the sweep and the loop write them ---------------------------------


def make_sweep(uri: str, name: str, grid: report.Grid, trials: dict) -> str:
    """A sweep in the classification experiment: the parent run with its grid, and one trial run per entry of
    `trials` {(variant, seed): (MLflow status, [val/top1 per epoch], failure reason or None)}, each epoch logged
    with the summary so far as `loop.train` logs it. Returns the parent run id."""
    experiment = tracking.ensure_experiment(uri, "classification")
    parent = tracking.find_or_create_run(
        uri, experiment, tags={tracking.SWEEP_TAG: name}, key=tracking.SWEEP_TAG, name=name
    )
    tracking.log_params(uri, parent, {"task": "classification", report.GRID_PARAM: grid.to_param()})
    for (variant, seed), (status, top1, reason) in trials.items():
        run = tracking.find_or_create_run(
            uri,
            experiment,
            tags={tracking.TRIAL_TAG: f"{name}-{variant}-{seed}", tracking.SWEEP_TAG: name},
            key=tracking.TRIAL_TAG,
            name=f"{variant}-seed{seed}",
            parent=parent,
        )
        tracking.log_params(uri, run, {"variant": variant, "seed": seed, "init": "scratch"})
        tracker = tracking.MlflowTracker(uri, run)
        history = []
        for epoch, value in enumerate(top1):
            history.append({"val/top1": value, "train/loss": 1.0 / (epoch + 1)})
            tracker.log_epoch({**history[-1], **summarize(history, ("val/top1",))}, epoch)
        if reason:
            tracker.log_failure(reason)
        if status != "RUNNING":
            tracking.finish_run(uri, run, status)
    return parent


@pytest.fixture
def store(tmp_path):
    """Two sweeps in one store: "a" (zero 2 seeds, partial one finished and one failed, gated one running and one
    never started) and "b" (zero only), to show that a report never mixes them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = report.Grid(("zero", "partial", "gated"), seeds=(0, 1))
    a = make_sweep(
        uri,
        "a",
        grid,
        {
            ("zero", 0): ("FINISHED", [50.0, 70.0, 60.0], None),
            ("zero", 1): ("FINISHED", [55.0, 65.0, 66.0], None),
            ("partial", 0): ("FINISHED", [60.0, 80.0, 75.0], None),
            ("partial", 1): ("FAILED", [40.0], "diverged: train/loss is nan at epoch 1 batch 0 (lr 0.1)"),
            ("gated", 0): ("RUNNING", [30.0, 35.0], None),
        },
    )
    b = make_sweep(uri, "b", report.Grid(("zero",), seeds=(0,)), {("zero", 0): ("FINISHED", [99.0, 98.0], None)})
    return uri, a, b


def test_a_sweep_with_failed_running_and_missing_trials_counts_each_cell(store):
    uri, a, _ = store
    sweep = report.load_sweep(uri, report.find_parent(uri, sweep="a"))
    assert sweep.parent.info.run_id == a and sweep.expected == 6 and sweep.started == 5
    cells = {(r.variant, r.seed): r.status for r in sweep.results}
    assert cells == {
        ("zero", 0): "ok",
        ("zero", 1): "ok",
        ("partial", 0): "ok",
        ("partial", 1): "failed",
        ("gated", 0): "running",
        ("gated", 1): "missing",
    }
    failed = next(r for r in sweep.results if r.status == "failed")
    assert failed.reason.startswith("diverged: train/loss is nan")
    zero0 = next(r for r in sweep.results if (r.variant, r.seed) == ("zero", 0))
    assert zero0.metrics == {"best/top1": 70.0, "last5/top1": 60.0}  # the last epoch's summary

    built = report.build_report(sweep)  # plots included: nothing crashes on the holes
    assert {"report.md", "report.csv", "report.tex"} == set(built.text)
    assert {"metrics.png", "curves.png"} <= set(built.figures)
    lines = list(csv.DictReader(io.StringIO(built.text["report.csv"])))
    rows = {(row["metric"], row["arm"]): row for row in lines if row["source"] == "this sweep"}
    assert rows["best/top1", "zero"]["n"] == "2/2"
    assert rows["best/top1", "partial"]["n"] == "1/2" and rows["best/top1", "gated"]["n"] == "0/2"
    assert "no test possible" in built.terminal
    assert max(len(line) for line in built.terminal.splitlines()) <= 120
    assert built.text["report.md"].count("diverged: train/loss is nan") == 1  # the failed trials' section
    built.close()


def test_a_report_never_mixes_sweeps_and_finds_them_by_name_id_or_latest(store):
    uri, a, b = store
    only_b = report.load_sweep(uri, report.find_parent(uri, run_id=b))
    assert [(r.variant, r.seed, r.metrics["best/top1"]) for r in only_b.results] == [("zero", 0, 99.0)]
    assert report.find_parent(uri, task="classification").info.run_id == b  # the latest of the task
    with pytest.raises(CliError, match="no sweep named 'c'.*sweeps there: a, b"):
        report.find_parent(uri, sweep="c")
    trial = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("classification").experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{a}'",
    )[0]
    with pytest.raises(CliError, match="is not a sweep's parent run: it is a trial of sweep 'a'; pass --sweep a"):
        report.find_parent(uri, run_id=trial.info.run_id)
    with pytest.raises(CliError, match="no sweep of task 'hotels'.*experiments there: Default, classification"):
        report.find_parent(uri, task="hotels")


def test_the_command_line_writes_the_files_and_logs_them_to_the_parent_run(store, tmp_path, capsys):
    uri, a, _ = store
    report.main(["--sweep", "a", "--tracking-uri", uri, "--out", str(tmp_path / "out"), "--alpha", "0.1"])
    out = capsys.readouterr().out
    assert "Sweep a (classification)" in out and f"report/ of run {a}" in out
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.md", "report.csv", "report.tex", "metrics.png", "curves.png"} <= written
    logged = {Path(f.path).name for f in MlflowClient(uri).list_artifacts(a, "report")}
    assert logged == written
    with pytest.raises(CliError, match="--alpha must be between 0 and 1"):
        report.main(["--sweep", "a", "--tracking-uri", uri, "--alpha", "5"])
    with pytest.raises(CliError, match="no MLflow store at"):
        report.main(["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    with pytest.raises(CliError, match="not allowed with argument"):
        report.main(["--sweep", "a", "--run-id", a, "--tracking-uri", uri])


# the real sweep of the session --------------------------------------------------------------------------------------


def recompute(client: MlflowClient, run_id: str) -> dict[str, float]:
    """best/top1 (the first epoch with the highest val/top1) and last5/top1 from the raw per-epoch history, written
    here without the loop's code."""
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/top1"))
    values = [v for _, v in history]
    return {"best/top1": values[values.index(max(values))], "last5/top1": sum(values[-5:]) / len(values[-5:])}


@pytest.mark.slow
def test_the_sweeps_report_equals_a_recomputation_from_the_raw_histories(grid_sweep, tmp_path):
    uri = grid_sweep.tracking_uri
    client = MlflowClient(uri)
    parent = report.find_parent(uri, sweep=grid_sweep.name)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'"
    )
    per_arm: dict[str, dict[str, list[float]]] = {}
    for run in children:
        for key, value in recompute(client, run.info.run_id).items():
            per_arm.setdefault(run.data.params["variant"], {}).setdefault(key, []).append(value)
    assert set(per_arm) == set(GRID_ARMS)

    # The report the sweep logged at its end, read back from the parent run.
    logged = Path(client.download_artifacts(parent.info.run_id, "report/report.csv", str(tmp_path))).read_text()
    rows = {(r["metric"], r["arm"]): r for r in csv.DictReader(io.StringIO(logged)) if r["source"] == "this sweep"}
    for arm, columns in per_arm.items():
        for column, values in columns.items():
            row = rows[column, arm]
            assert row["n"] == "2/2"
            assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-9)
            assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-9)
            if arm != "zero":
                diff = statistics.fmean(values) - statistics.fmean(per_arm["zero"][column])
                assert float(row["diff"]) == pytest.approx(diff, abs=1e-9)
    artifacts = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.md", "report.csv", "report.tex", "metrics.png", "curves.png"} <= artifacts

    # The closing lines: the compact view within 120 columns, the headline first, and where the rest is.
    out = grid_sweep.out
    ours = out[out.index("classification, preset smoke") :]
    assert "best/top1" in ours and "report/" in ours and "python -m orchestrator.ui" in ours
    assert f"/runs/{parent.info.run_id}" in ours
    view = ours[: ours.index("\nReport (Markdown")]
    assert max(len(line) for line in view.splitlines()) <= 120


def test_long_arm_labels_are_cut_in_the_middle_and_the_plots_still_fit(tmp_path):
    """An --init arm's label holds a whole path: ticks and legends show its start and end, and the layout fits (no
    "Tight layout not applied" warning, which a rotated 60-character tick used to cause)."""
    import warnings

    long = f"zero +init {tmp_path}/runs/a-very-long-experiment-name/checkpoints/best.pt"
    assert report.short_label("zero") == "zero"
    cut = report.short_label(long)
    assert len(cut) == 28 and cut.startswith("zero +init ") and cut.endswith("best.pt") and "…" in cut
    results = [
        tables.TrialResult(arm, seed, {"best/top1": 50.0 + seed, "best/top5": 90.0}, "ok")
        for arm in ("zero", long)
        for seed in (0, 1)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's layout warning fails the test
        fig = report.plot_metrics(results, ["best/top1", "best/top5"])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["zero", cut]
