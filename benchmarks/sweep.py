"""Per-trial overhead of this project's Tune x Train path against bare Ray Tune function trials, in one run.

    python -m benchmarks.sweep [--trials N] [--epochs N]

Both paths run the same tiny grid (the smoke preset, one variant, N seeds) one trial at a time on a local Ray,
with Tune's function processes reused between trials, and both time the shared training loop from the inside.
Overhead = wall time of the sweep - time spent inside the loop: everything Ray, Ray Train, DDP set-up and MLflow
add around the same work. Each path runs a 1-trial and an N-trial sweep, so the overhead splits into a start-up
cost paid once per sweep (Tune's controller, the first trial's process, the MLflow experiment) and the overhead
per trial, (overhead(N) - overhead(1)) / (N - 1), which is what a 15-trial sweep pays again and again.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import ray
import ray.tune

from benchmarks.common import table
from orchestrator import sweep
from orchestrator.cli import ArgumentParser, CliError
from orchestrator.config import TrialConfig
from orchestrator.loop import train
from tasks import default_cache_dir, ensure_synthetic, get_task

GOAL_S = 6.0  # overhead per trial, seconds


def bare_trial(config: dict) -> None:
    """A plain Tune function trial running the same loop in-process: no Ray Train, no MLflow."""
    cfg = TrialConfig.from_dict(config)
    train(cfg, report=lambda metrics, folder: ray.tune.report(metrics))


def run_bare(trials: int, epochs: int, storage: str, cache_dir: str, name: str) -> tuple[float, float]:
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(bare_trial, {"CPU": 1}),
        param_space={
            "task": "classification",
            "variant": "zero",
            "seed": ray.tune.grid_search(list(range(trials))),
            "preset": "smoke",
            "overrides": {"epochs": epochs},
            "cache_dir": cache_dir,
            "loader_workers": 0,
        },
        # As the project's Tuner: one Tune-function process runs the trials one after another (its imports paid once).
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
        run_config=ray.tune.RunConfig(name=name, storage_path=storage, verbose=0),
    )
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    return wall, sum(r.metrics["time/loop_s"] for r in grid)


def run_project(trials: int, epochs: int, storage: str, tracking_uri: str, name: str) -> tuple[float, float]:
    args = [
        "--task",
        "classification",
        "--variants",
        "zero",
        "--seeds",
        str(trials),
        "--preset",
        "smoke",
        "--epochs",
        str(epochs),
        "--max-concurrent",
        "1",
        "--storage",
        storage,
        "--tracking-uri",
        tracking_uri,
        "--name",
        name,
        "--loader-workers",
        "0",
    ]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = sweep.main(args)
    wall = time.perf_counter() - start
    return wall, sum(r.metrics["time/loop_s"] for r in results)


def split(one: tuple[float, float], many: tuple[float, float], trials: int) -> tuple[float, float]:
    """(start-up once per sweep, overhead per trial) from a 1-trial and an N-trial sweep's (wall, loop) times."""
    per_trial = ((many[0] - many[1]) - (one[0] - one[1])) / (trials - 1)
    return (one[0] - one[1]) - per_trial, per_trial


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__)
    parser.add_argument("--trials", type=int, default=4, help="trials in the larger sweep of each path (default 4)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial (default 1)")
    args = parser.parse_args(argv)
    if args.trials < 2:
        raise CliError("--trials must be at least 2 (the overhead per trial is the difference to a 1-trial sweep)")
    task = get_task("classification")
    cache_dir = str(default_cache_dir().resolve())
    ensure_synthetic(task, task.presets["smoke"], Path(cache_dir))
    ray.init(configure_logging=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bare = {n: run_bare(n, args.epochs, f"{tmp}/bare", cache_dir, f"bare-{n}") for n in (1, args.trials)}
            uri = f"sqlite:///{tmp}/m.db"
            proj = {n: run_project(n, args.epochs, f"{tmp}/project", uri, f"project-{n}") for n in (1, args.trials)}
    finally:
        ray.shutdown()
    bare_start, bare_trial = split(bare[1], bare[args.trials], args.trials)
    proj_start, proj_trial = split(proj[1], proj[args.trials], args.trials)
    print(
        f"\nSweep overhead, 1 and {args.trials} sequential trials x {args.epochs} epoch(s), smoke preset, local Ray\n"
    )
    print(
        table(
            [
                "path",
                f"wall s ({args.trials} trials)",
                "inside loop s",
                "start-up s",
                "overhead per trial s",
                "wall vs bare",
            ],
            [
                [
                    name,
                    f"{runs[args.trials][0]:.1f}",
                    f"{runs[args.trials][1]:.1f}",
                    f"{start:.1f}",
                    f"{per_trial:.1f}",
                    f"{runs[args.trials][0] / bare[args.trials][0]:.2f}x",
                ]
                for name, runs, start, per_trial in (
                    ("bare Tune function", bare, bare_start, bare_trial),
                    ("Tune x Train (project)", proj, proj_start, proj_trial),
                )
            ],
        )
    )
    print(
        f"\nproject overhead per trial: {proj_trial:.1f} s (goal: {GOAL_S:g} s or less on a 2-core laptop-class "
        f"machine, {'met' if proj_trial <= GOAL_S else 'MISSED'}), {proj_trial - bare_trial:+.1f} s against a bare "
        "Tune function trial"
    )


if __name__ == "__main__":
    main()
