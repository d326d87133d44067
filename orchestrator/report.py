"""The sweep report: a sweep's trials read back from MLflow, compared arm by arm with their uncertainty.

python -m orchestrator.report                                  # the latest sweep of --task (default segmentation)
python -m orchestrator.report --sweep classification-cpu-20261126-101500 --out report/
python -m orchestrator.report --run-id <the sweep's parent run id> --alpha 0.01

The sweep runs it when it ends. It reads only MLflow (the same store the sweep wrote), so a sweep that is still
running, was interrupted or has failed trials reports the same way: every cell counts the seeds it holds. Per table
metric of the task: one row per arm with each seed's value, mean, std (n-1), difference to `zero`, Welch's t-test
p-value, that p-value adjusted by Holm's method for the arms compared with `zero` on the metric (the one a star
marks) and a bootstrap 95% interval of the difference (`tables`), the thesis' published numbers beside them; plots
over seeds and epochs. Markdown, CSV, LaTeX and PNGs go under `report/` in the sweep's parent run, and to `--out`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import tasks

from . import tables, tracking, ui, weights
from .cli import ArgumentParser, CliError, default_tracking_uri, setup_logging

log = logging.getLogger("orchestrator.report")  # not __name__: that is "__main__" under python -m

GRID_PARAM = "grid"  # the parent run's JSON param: the sweep's variants, inits, seeds (and Optuna samples, space)
ARTIFACT_DIR = "report"
STATUS = {"FINISHED": "ok", "FAILED": "failed", "KILLED": "interrupted", "RUNNING": "running", "SCHEDULED": "running"}
CURVE_METRICS = 3  # per-epoch curves of train/loss and the task's first table metrics (hotels has 24)


@dataclass(frozen=True)
class Grid:
    """What a sweep set out to run, from its parent run: every (arm, seed) cell a report expects."""

    variants: tuple[str, ...]
    inits: tuple[str, ...] = ("scratch",)
    seeds: tuple[int, ...] = (0,)
    samples: int = 1  # Optuna samples per (variant, init, seed); 1 for a grid
    space: tuple[str, ...] = ()  # the searched preset fields (Optuna)

    def to_param(self) -> str:
        return json.dumps(
            {
                "variants": list(self.variants),
                "inits": list(self.inits),
                "seeds": list(self.seeds),
                "samples": self.samples,
                "space": list(self.space),
            }
        )

    @classmethod
    def from_param(cls, text: str) -> Grid:
        values = json.loads(text)
        return cls(
            tuple(values["variants"]),
            tuple(values.get("inits", ["scratch"])),
            tuple(values["seeds"]),
            values.get("samples", 1),
            tuple(values.get("space", ())),
        )


def arm_label(variant: str, init: str = weights.SCRATCH) -> str:
    """How a report (and the sweep's results) names an arm: the variant spec, with its --init when not scratch."""
    return variant if init == weights.SCRATCH else f"{variant} +init {init}"


@dataclass
class Sweep:
    """One sweep as MLflow holds it: its parent run, its expected grid and its trial runs (and only its own)."""

    uri: str
    name: str
    task: str
    parent: Run
    grid: Grid | None  # None for a sweep logged before the grid was recorded: the arms are those that ran
    runs: list[Run]
    results: list[tables.TrialResult] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.parent.info.status

    @property
    def started(self) -> int:
        return len(self.runs)

    @property
    def expected(self) -> int | None:
        if self.grid is None:
            return None
        return len(self.grid.variants) * len(self.grid.inits) * len(self.grid.seeds) * self.grid.samples


# reading a sweep -------------------------------------------------------------------------------------------------


def _is_parent(run: Run) -> bool:
    return tracking.SWEEP_TAG in run.data.tags and MLFLOW_PARENT_RUN_ID not in run.data.tags


def find_parent(uri: str, *, sweep: str | None = None, run_id: str | None = None, task: str | None = None) -> Run:
    """The sweep's parent run: by `run_id`, by the sweep's name, else the latest sweep of `task`; `CliError` with
    what exists when nothing matches."""
    client = MlflowClient(uri)
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise CliError(f"no run {run_id!r} in the tracking store {uri}") from None
        if not _is_parent(run):
            name = run.data.tags.get(tracking.SWEEP_TAG)
            hint = f" of sweep {name!r}; pass --sweep {name}" if name else "; it is not part of a sweep"
            raise CliError(f"run {run_id} is not a sweep's parent run: it is a trial{hint}")
        return run
    experiments = client.search_experiments()
    if task:
        experiments = [e for e in experiments if e.name == task]
    ids = [e.experiment_id for e in experiments]
    if not ids:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise CliError(
            f"no sweep of task {task!r} in {uri} (experiments there: {known}); run one with "
            f"`python -m orchestrator.sweep --task {task}` or pass --tracking-uri"
        )
    if sweep:
        parents = [
            r
            for r in tracking.search_all_runs(client, ids, f"tags.`{tracking.SWEEP_TAG}` = '{sweep}'")
            if _is_parent(r)
        ]
        if len(parents) > 1:
            where = ", ".join(f"{r.info.run_id} (experiment {r.info.experiment_id})" for r in parents)
            raise CliError(f"{len(parents)} sweeps are named {sweep!r} in {uri}: {where}; pick one with --run-id")
        if parents:
            return parents[0]
        names = sorted({r.data.tags[tracking.SWEEP_TAG] for r in _parents(client, ids)})
        raise CliError(f"no sweep named {sweep!r} in {uri}; sweeps there: {', '.join(names) or 'none'}")
    parents = _parents(client, ids)
    if not parents:
        raise CliError(f"no sweep of task {task!r} in {uri}; run one with `python -m orchestrator.sweep --task {task}`")
    return max(parents, key=lambda r: r.info.start_time)


def _parents(client: MlflowClient, experiment_ids: list[str]) -> list[Run]:
    return [
        r
        for r in tracking.search_all_runs(client, experiment_ids, f"tags.`{tracking.SWEEP_TAG}` != ''")
        if _is_parent(r)
    ]


def load_sweep(uri: str, parent: Run) -> Sweep:
    """The sweep of `parent`: its nested trial runs (found by parent id, so two sweeps never mix) turned into one
    `TrialResult` per trial, plus a `missing` result for each expected cell that has no run yet."""
    client = MlflowClient(uri)
    parent_id = parent.info.run_id
    runs = tracking.search_all_runs(
        client, [parent.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'"
    )
    grid_text = parent.data.params.get(GRID_PARAM)
    grid = Grid.from_param(grid_text) if grid_text else None
    task = parent.data.params.get("task") or client.get_experiment(parent.info.experiment_id).name
    sweep = Sweep(uri, parent.data.tags[tracking.SWEEP_TAG], task, parent, grid, runs)
    sweep.results = trial_results(sweep)
    return sweep


def _label(run: Run, space: Iterable[str]) -> str:
    params = run.data.params
    label = arm_label(params.get("variant", "?"), params.get("init", "scratch"))
    sampled = [f"{key}={params[f'preset.{key}']}" for key in space if f"preset.{key}" in params]
    return f"{label} [{' '.join(sampled)}]" if sampled else label


def trial_results(sweep: Sweep) -> list[tables.TrialResult]:
    """One result per trial run (status from MLflow's run status: FINISHED ok, FAILED failed with its reason tag,
    KILLED interrupted, RUNNING running), then one `missing` per cell of the grid that has no run."""
    space = sweep.grid.space if sweep.grid else ()
    results = []
    for run in sorted(sweep.runs, key=lambda r: r.info.start_time or 0):
        status = STATUS.get(run.info.status, run.info.status.lower())
        reason = run.data.tags.get(tracking.FAILURE_TAG, "")
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("best/", "last5/"))}
        seed = int(run.data.params.get("seed", run.data.tags.get("seed", -1)))
        results.append(tables.TrialResult(_label(run, space), seed, metrics, status, reason, run.info.run_id))
    if sweep.grid is not None and sweep.grid.samples == 1:
        present = {(r.variant, r.seed) for r in results}
        for variant in sweep.grid.variants:
            for init in sweep.grid.inits:
                for seed in sweep.grid.seeds:
                    if (arm_label(variant, init), seed) not in present:
                        results.append(tables.TrialResult(arm_label(variant, init), seed, {}, "missing"))
    return results


# plots -------------------------------------------------------------------------------------------------------------


def _done(results: list[tables.TrialResult], arm: str, key: str) -> list[tuple[int, float]]:
    return [(r.seed, r.metrics[key]) for r in results if r.variant == arm and r.status == "ok" and key in r.metrics]


def short_label(label: str, width: int = 28) -> str:
    """An arm's label cut in the middle to `width` characters, for a tick or legend: `--init` arms carry a whole path
    ("zero +init /data/runs/.../best.pt"), which would crowd out the plot."""
    if len(label) <= width:
        return label
    keep = width - 1
    return f"{label[: keep // 2]}…{label[len(label) - (keep - keep // 2) :]}"


def plot_metrics(results: list[tables.TrialResult], columns: list[str]):
    """One panel per table metric: each arm's mean with a std error bar over seeds, every seed as a point."""
    plt = tracking._pyplot()
    arms = tables.arm_order(results)
    ncols = min(len(columns), 4)
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 + (0.5 + 0.55 * len(arms)) * ncols, 3.2 * nrows), squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        for x, arm in enumerate(arms):
            values = [v for _, v in _done(results, arm, column)]
            if not values:
                continue
            mean = float(np.mean(values))
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.errorbar([x], [mean], yerr=[std], fmt="s", color=f"C{x}", capsize=5, markersize=7)
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(x + np.asarray(jitter), values, color=f"C{x}", alpha=0.45, s=14, zorder=3)
        ax.set_xticks(range(len(arms)), [short_label(a) for a in arms], rotation=35, ha="right", fontsize=7)
        ax.set_title(column, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(columns) :]:
        ax.set_visible(False)
    fig.suptitle("mean ± std over seeds (bars), each seed a dot", fontsize=9)
    fig.tight_layout()
    return fig


def histories(client: MlflowClient, results: list[tables.TrialResult], keys: list[str]) -> dict:
    """{(arm, key): [(epochs, values) per trial]} for every trial with a run (finished or not)."""
    curves: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for r in results:
        if not r.run_id:
            continue
        for key in keys:
            points = sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, key))
            if points:
                steps, values = zip(*points, strict=True)
                curves.setdefault((r.variant, key), []).append((np.asarray(steps), np.asarray(values, dtype=float)))
    return curves


def plot_curves(curves: dict, arms: list[str], keys: list[str]):
    """Per metric, per arm: the mean over seeds at each epoch, and a band from the lowest to the highest seed."""
    plt = tracking._pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for i, arm in enumerate(arms):
            trials = curves.get((arm, key), [])
            if not trials:
                continue
            epochs = sorted(set().union(*(set(s.tolist()) for s, _ in trials)))
            table = np.full((len(trials), len(epochs)), np.nan)
            for t, (steps, values) in enumerate(trials):
                for s, v in zip(steps.tolist(), values.tolist(), strict=True):
                    table[t, epochs.index(s)] = v
            with np.errstate(all="ignore"), _quiet_nan_warnings():
                mean, low, high = np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)
            label = f"{short_label(arm)} (n={len(trials)})"
            ax.plot(epochs, mean, marker="o", markersize=3, color=f"C{i}", label=label)
            if len(trials) > 1:
                ax.fill_between(epochs, low, high, color=f"C{i}", alpha=0.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("per epoch: mean over seeds, band from the lowest to the highest seed", fontsize=9)
    fig.tight_layout()
    return fig


@contextlib.contextmanager
def _quiet_nan_warnings():
    """numpy warns on an all-NaN column (an epoch no seed evaluated); the plot just leaves it blank."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def class_tables(client: MlflowClient, results: list[tables.TrialResult], name: str, column: str) -> dict:
    """{arm: (class names, values per finished seed)} from each finished trial's per-class table `<name>.csv`
    (logged at its best epoch); a trial without the file is left out (the per-arm counts say so)."""
    out: dict[str, tuple[list[str], list[list[float]]]] = {}
    for r in results:
        if r.status != "ok" or not r.run_id:
            continue
        with tempfile.TemporaryDirectory() as folder, tracking.without_progress_bars():
            try:
                path = client.download_artifacts(r.run_id, f"{name}.csv", folder)
            except (MlflowException, OSError):
                continue
            rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
        if not rows or column not in rows[0]:
            continue
        names = [row["class"] for row in rows]
        values = [float(row[column]) if row[column] not in ("", "nan") else math.nan for row in rows]
        out.setdefault(r.variant, (names, []))[1].append(values)
    return out


def plot_class_table(per_arm: dict, arms: list[str], title: str):
    """Grouped bars: one group per class, one bar per arm (its mean over seeds, the std as an error bar)."""
    plt = tracking._pyplot()
    arms = [a for a in arms if a in per_arm]
    names = per_arm[arms[0]][0]
    fig, ax = plt.subplots(figsize=(2 + 0.25 * len(names) * max(len(arms), 1), 3.8))
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        values = np.asarray(per_arm[arm][1], dtype=float)
        with _quiet_nan_warnings():
            mean = np.nanmean(values, 0)
            std = np.nanstd(values, 0, ddof=1) if len(values) > 1 else np.zeros(len(names))
        x = np.arange(len(names)) + (k - (len(arms) - 1) / 2) * width
        label = f"{short_label(arm)} (n={len(values)})"
        ax.bar(x, np.nan_to_num(mean), width, yerr=np.nan_to_num(std), label=label, capsize=1.5)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_series(results: list[tables.TrialResult], arms: list[str], title: str, x_labels, series: dict):
    """One panel per series (e.g. top-k), the x axis the levels (e.g. occlusion): each arm's mean ± std over seeds."""
    plt = tracking._pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3.3), squeeze=False)
    for ax, (name, keys) in zip(axes[0], series.items(), strict=True):
        for i, arm in enumerate(arms):
            points = [[v for _, v in _done(results, arm, f"best/{tables.summary_name(key)}")] for key in keys]
            if not all(points):
                continue
            mean = [float(np.mean(p)) for p in points]
            std = [float(np.std(p, ddof=1)) if len(p) > 1 else 0.0 for p in points]
            ax.errorbar(range(len(keys)), mean, yerr=std, marker="o", capsize=3, color=f"C{i}", label=short_label(arm))
        ax.set_xticks(range(len(keys)), x_labels)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def figures(sweep: Sweep, task: tasks.Task) -> dict[str, Any]:
    """The report's plots, by file name: every table metric per arm, per-epoch curves, and the task's own
    (per-class table, levels x k)."""
    client = MlflowClient(sweep.uri)
    results = sweep.results
    arms = tables.arm_order(results)
    out = {}
    if any(r.status == "ok" for r in results):
        out["metrics.png"] = plot_metrics(results, tables.columns(task.table_metrics))
    keys = ["train/loss", *task.table_metrics[:CURVE_METRICS]]
    curves = histories(client, results, keys)
    if curves:
        out["curves.png"] = plot_curves(curves, arms, keys)
    class_table = getattr(task, "report_class_table", None)
    if class_table is not None:
        name, column = class_table
        per_arm = class_tables(client, results, name, column)
        if per_arm:
            out[f"{name}.png"] = plot_class_table(per_arm, arms, f"{name} ({column}) at each trial's best epoch")
    for i, (title, (x_labels, series)) in enumerate(getattr(task, "report_series", {}).items()):
        if any(r.status == "ok" for r in results):
            out[f"series-{i + 1}.png"] = plot_series(results, arms, title, x_labels, series)
    return out


# the report --------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    sweep: Sweep
    text: dict[str, str]  # file name -> contents (report.md, report.csv, report.tex)
    terminal: str  # the compact view, at most 120 columns
    figures: dict[str, Any]  # file name -> matplotlib figure

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, text in self.text.items():
            (folder / name).write_text(text)
            paths.append(folder / name)
        for name, fig in self.figures.items():
            fig.savefig(folder / name, dpi=110)
            paths.append(folder / name)
        return paths

    def close(self) -> None:
        plt = tracking._pyplot()
        for fig in self.figures.values():
            plt.close(fig)


def build_report(sweep: Sweep, *, alpha: float = 0.05, baseline: str = "zero", plots: bool = True) -> Report:
    """Tables, files and plots of `sweep`'s results (`tables` does the statistics)."""
    task = tasks.get_task(sweep.task)
    columns = tables.columns(task.table_metrics)
    seeds = list(sweep.grid.seeds) if sweep.grid else None
    built = tables.build(
        sweep.results,
        columns,
        baseline=baseline,
        alpha=alpha,
        seeds=seeds,
        published=getattr(task, "published", ()),
    )
    header = _header(sweep)
    layouts = [
        f"\n## {title}\n\n{tables.layout_table(sweep.results, cells, baseline=baseline)}\n"
        for title, cells in getattr(task, "closing_tables", {}).items()
    ]
    failures = [f"- {r.variant} seed {r.seed}: {r.reason}" for r in sweep.results if r.status == "failed" and r.reason]
    failed = "\n## Failed trials\n\n" + "\n".join(failures) + "\n" if failures else ""
    text = {
        "report.md": f"# Sweep {sweep.name}\n\n{header}\n\n{built.markdown()}\n{''.join(layouts)}{failed}",
        "report.csv": built.csv(),
        "report.tex": built.latex(),
    }
    terminal = "\n".join(textwrap.wrap(header, 120)) + f"\n\n{built.terminal(width=120)}"
    return Report(sweep, text, terminal, figures(sweep, task) if plots else {})


def _header(sweep: Sweep) -> str:
    counts = {}
    for r in sweep.results:
        counts[r.status] = counts.get(r.status, 0) + 1
    states = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    expected = f" of {sweep.expected} expected" if sweep.expected is not None else ""
    return (
        f"Sweep {sweep.name} ({sweep.task}), parent run {sweep.parent.info.run_id}, status {sweep.status}: "
        f"{sweep.started} trial run(s){expected}; {states}."
    )


def log_report(report: Report) -> None:
    """Every file of the report under `report/` of the sweep's parent run (replacing an earlier report's)."""
    with tempfile.TemporaryDirectory(prefix="report-") as folder:
        report.write(Path(folder))
        MlflowClient(report.sweep.uri).log_artifacts(report.sweep.parent.info.run_id, folder, ARTIFACT_DIR)


def make_report(
    uri: str, parent: Run | str, *, alpha: float = 0.05, out: Path | None = None, log_to_run: bool = True
) -> Report:
    """Read the sweep of `parent` (its run or run id), build its report, log it to the parent run under `report/`
    and write it to `out`."""
    if isinstance(parent, str):
        parent = MlflowClient(uri).get_run(parent)
    report = build_report(load_sweep(uri, parent), alpha=alpha)
    try:
        if out is not None:
            report.write(out)
        if log_to_run:
            log_report(report)
    finally:
        report.close()
    return report


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m orchestrator.report", description=__doc__)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sweep", metavar="NAME", help="the sweep's name (as printed when it started)")
    which.add_argument("--run-id", metavar="ID", help="the sweep's parent run id in MLflow")
    p.add_argument(
        "--task",
        default=None,
        help=f"with neither --sweep nor --run-id: the latest sweep of this task (default segmentation); one of "
        f"{', '.join(sorted(tasks.TASKS))}",
    )
    p.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        metavar="URI",
        help="MLflow store, as for the sweep (default: $MLFLOW_TRACKING_URI when set, else sqlite:///mlflow.db)",
    )
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the tests (default 0.05)")
    p.add_argument("--out", type=Path, metavar="DIR", help="also write the report's files to this folder")
    p.add_argument(
        "--no-log",
        action="store_true",
        help="do not log the report to the sweep's parent run (by default it replaces the run's report/ files)",
    )
    return p


def main(argv: list[str] | None = None) -> Report:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    if not 0 < args.alpha < 1:
        raise CliError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.task is not None and args.task not in tasks.TASKS:
        raise CliError(f"unknown task {args.task!r}; one of {', '.join(sorted(tasks.TASKS))}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} exists and is not a folder")
    try:
        tracking.check_tracking_uri(args.tracking_uri)  # a server that answers, a SQLite store's folder
        ui.check_store(args.tracking_uri)  # a SQLite store that exists (reading would create an empty one)
    except (tracking.TrackingError, ui.UiError) as e:
        raise CliError(str(e)) from None
    task = None if (args.sweep or args.run_id) else (args.task or "segmentation")
    parent = find_parent(args.tracking_uri, sweep=args.sweep, run_id=args.run_id, task=task)
    report = make_report(args.tracking_uri, parent, alpha=args.alpha, out=args.out, log_to_run=not args.no_log)
    print(report.terminal, flush=True)
    where = [f"report/ of run {parent.info.run_id}"] if not args.no_log else []
    if args.out is not None:
        where.append(str(args.out))
    if where:
        print(f"\nFull tables (Markdown, CSV, LaTeX) and plots: {' and '.join(where)}", flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
