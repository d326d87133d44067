"""Per-trial overhead of this project's Tune x Train path against bare Ray Tune function trials, in one run.

    python -m benchmarks.sweep [--trials N] [--epochs N]

Both paths run the same tiny grid (the smoke preset, one variant, N seeds) one trial at a time on a local Ray,
and both time the shared training loop from the inside. Overhead per trial = (wall time of the sweep - time
spent inside the loop) / trials: everything Ray, Ray Train, DDP set-up and MLflow add around the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import ray
import ray.tune

from benchmarks.common import table
from orchestrator import sweep
from orchestrator.config import TrialConfig
from orchestrator.loop import train
from tasks import default_cache_dir, ensure_synthetic, get_task


def bare_trial(config: dict) -> None:
    """A plain Tune function trial running the same loop in-process: no Ray Train, no MLflow."""
    cfg = TrialConfig.from_dict(config)
    train(cfg, report=lambda metrics, folder: ray.tune.report(metrics))


def run_bare(trials: int, epochs: int, storage: str, cache_dir: str) -> tuple[float, float]:
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
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=1),
        run_config=ray.tune.RunConfig(name="bare", storage_path=storage, verbose=0),
    )
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    return wall, sum(r.metrics["time/loop_s"] for r in grid)


def run_project(trials: int, epochs: int, storage: str, tracking_uri: str) -> tuple[float, float]:
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
        "project",
        "--loader-workers",
        "0",
    ]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = sweep.main(args)
    wall = time.perf_counter() - start
    return wall, sum(r.metrics["time/loop_s"] for r in results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help="trials per path (default 3)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial (default 1)")
    args = parser.parse_args(argv)
    task = get_task("classification")
    cache_dir = str(default_cache_dir().resolve())
    ensure_synthetic(task, task.presets["smoke"], Path(cache_dir))
    ray.init(configure_logging=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bare_wall, bare_loop = run_bare(args.trials, args.epochs, f"{tmp}/bare", cache_dir)
            proj_wall, proj_loop = run_project(args.trials, args.epochs, f"{tmp}/project", f"sqlite:///{tmp}/m.db")
    finally:
        ray.shutdown()
    bare = (bare_wall - bare_loop) / args.trials
    proj = (proj_wall - proj_loop) / args.trials
    print(f"\nPer-trial overhead, {args.trials} sequential trials x {args.epochs} epoch(s), smoke preset, local Ray\n")
    print(
        table(
            ["path", "sweep wall s", "inside loop s", "overhead per trial s", "ratio"],
            [
                ["bare Tune function", f"{bare_wall:.1f}", f"{bare_loop:.1f}", f"{bare:.1f}", "1.00x"],
                [
                    "Tune x Train (project)",
                    f"{proj_wall:.1f}",
                    f"{proj_loop:.1f}",
                    f"{proj:.1f}",
                    f"{proj / bare:.2f}x",
                ],
            ],
        )
    )
    print(f"\nproject overhead per trial: {proj:.1f} s (target: under 10 s)")


if __name__ == "__main__":
    main()
