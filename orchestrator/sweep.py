"""Run the variant x seed comparison of one task on Ray (Tune over trials, Train inside each) with MLflow tracking.

python -m orchestrator.sweep --task classification            # every variant x 3 seeds, local Ray, synthetic data
python -m orchestrator.sweep --task classification --variants zero partial --seeds 2 --preset smoke
python -m orchestrator.sweep --task classification --search optuna --num-samples 4 --space lr=loguniform:1e-4:1e-2
python -m orchestrator.sweep --resume --name classification-cpu-20261125-101500
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import convs
import tasks
from tasks import LayoutError, Preset, default_cache_dir, ensure_synthetic

from . import report, tracking

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


class SweepError(SystemExit):
    """A bad command line or an unusable environment: exits with a message, never with a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--task",
        default="segmentation",
        help=f"task to run; one of {', '.join(sorted(tasks.TASKS))} (default segmentation)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help=f"conv variants to compare (default: all the task supports; known: {', '.join(convs.VARIANTS)})",
    )
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="run seeds 0..N-1 per variant (default 3)")
    p.add_argument("--preset", help="recipe: thesis, cpu or smoke (default: thesis with a GPU, cpu without)")
    p.add_argument("--epochs", type=int, metavar="N", help="override the preset's number of epochs")
    p.add_argument(
        "--data-root",
        metavar="PATH",
        help="the real dataset (its on-disk layout is checked); default: a synthetic stand-in in the "
        "same layout, generated once into the cache ($INVALID_PIXELS_CACHE or ~/.cache/...)",
    )
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster address (host:port, ray://host:port or auto); default: start a local Ray",
    )
    p.add_argument(
        "--storage",
        default="sweeps",
        metavar="PATH|URI",
        help="where Ray keeps trial state and checkpoints: a local path or s3://bucket/prefix "
        "(default ./sweeps); on a multi-node cluster use shared storage",
    )
    p.add_argument(
        "--tracking-uri",
        default=tracking.DEFAULT_TRACKING_URI,
        metavar="URI",
        help="MLflow store: sqlite:///file.db (default sqlite:///mlflow.db) or http://host:port",
    )
    p.add_argument(
        "--workers-per-trial",
        type=int,
        default=1,
        metavar="N",
        help="Ray Train workers per trial (DDP over them; default 1)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="F",
        help="GPUs per Train worker (default: 1 if the cluster has GPUs, else 0)",
    )
    p.add_argument("--cpus-per-worker", type=float, default=1, metavar="F", help="CPUs per Train worker (default 1)")
    p.add_argument(
        "--loader-workers",
        type=int,
        metavar="N",
        help="DataLoader processes per Train worker (default: 4 with GPUs, 0 on CPU)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        help="trials running at once (default: as many as the cluster's CPUs/GPUs fit)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=2,
        metavar="N",
        help="restarts of a crashed trial from its last checkpoint (default 2)",
    )
    p.add_argument(
        "--name", metavar="SWEEP", help="sweep name (default: <task>-<preset>-<timestamp>); --resume needs it"
    )
    p.add_argument(
        "--search",
        choices=("grid", "optuna"),
        default="grid",
        help="grid: variants x seeds; optuna: sample --space, each sample run for every variant and seed",
    )
    p.add_argument("--num-samples", type=int, default=4, metavar="N", help="Optuna samples (default 4)")
    p.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=DIST",
        help="a preset field to search, e.g. lr=loguniform:1e-4:1e-1, weight_decay=uniform:0:1e-3, "
        "epochs=randint:2:6, batch_size=choice:16,32 (repeatable)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep --name: finished trials are kept, unfinished and errored ones resume",
    )
    return p


def parse_space(items: list[str]) -> dict[str, tuple[str, list]]:
    """KEY=DIST:ARGS strings -> {key: (dist, args)}, keys checked against the preset fields."""
    known = {f.name for f in fields(Preset)} - {"synthetic", "model"}
    space = {}
    for item in items:
        key, sep, spec = item.partition("=")
        dist, _, rest = spec.partition(":")
        if not sep or dist not in DISTRIBUTIONS or not rest:
            raise SweepError(
                f"--space {item!r}: expected KEY=DIST:ARGS with DIST one of {', '.join(DISTRIBUTIONS)}, "
                "e.g. lr=loguniform:1e-4:1e-1 or batch_size=choice:16,32"
            )
        if key not in known:
            raise SweepError(f"--space {item!r}: unknown preset key {key!r}. Known keys: {', '.join(sorted(known))}")
        try:
            if dist == "choice":
                args = [_number(v) for v in rest.split(",")]
            else:
                low, high = (float(v) for v in rest.split(":"))
                args = [int(low), int(high)] if dist == "randint" else [low, high]
        except ValueError:
            raise SweepError(f"--space {item!r}: could not read the numbers in {rest!r}") from None
        space[key] = (dist, args)
    return space


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_address(address: str | None, *, timeout: float = 5.0) -> None:
    """Fail fast when a Ray head does not answer, instead of letting ray.init retry for minutes."""
    if not address or address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise SweepError(f"--address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise SweepError(
            f"cannot reach a Ray cluster at {address} ({e}); is `ray start --head` running there?"
        ) from None


def _absolute(uri_or_path: str) -> str:
    return uri_or_path if "://" in uri_or_path else str(Path(uri_or_path).expanduser().resolve())


def _absolute_tracking(uri: str) -> str:
    # Ray workers run in other folders: a relative sqlite:///mlflow.db would open a different database there.
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def main(argv: list[str] | None = None) -> list[report.TrialResult]:
    args = get_args_parser().parse_args(argv)
    try:
        task = tasks.get_task(args.task)
        for v in args.variants or []:
            convs.get(v)
    except ValueError as e:
        raise SweepError(str(e)) from None
    variants = args.variants or list(task.variants)
    unsupported = [v for v in variants if v not in task.variants]
    if unsupported:
        raise SweepError(f"task {task.name} does not support {unsupported}; it supports {', '.join(task.variants)}")
    if args.seeds < 1:
        raise SweepError("--seeds must be at least 1")
    if args.resume and not args.name:
        raise SweepError("--resume needs --name SWEEP (the name printed when the sweep started)")
    space = parse_space(args.space)
    if args.search == "optuna" and not space:
        raise SweepError("--search optuna needs at least one --space KEY=DIST (e.g. --space lr=loguniform:1e-4:1e-1)")

    import torch

    preset_name = args.preset or ("thesis" if torch.cuda.is_available() else "cpu")
    if preset_name not in task.presets:
        raise SweepError(f"unknown preset {preset_name!r} for {task.name}; known presets: {', '.join(task.presets)}")
    overrides = {"epochs": args.epochs} if args.epochs else {}
    preset = task.presets[preset_name].updated(**overrides)
    try:
        if args.data_root:
            data_root, cache_dir = str(Path(args.data_root).resolve()), None
            task.check_layout(Path(data_root))
        else:
            data_root, cache_dir = None, str(default_cache_dir().resolve())
            ensure_synthetic(task, preset, Path(cache_dir))  # once, here, before trials start
    except LayoutError as e:
        raise SweepError(str(e)) from None

    uri = _absolute_tracking(args.tracking_uri)
    try:
        tracking.check_tracking_uri(uri)
    except tracking.TrackingError as e:
        raise SweepError(str(e)) from None
    check_address(args.address)

    import ray
    import ray.tune

    from .trial import SWEEP_KEY, run_trial, trial_identity

    own_ray = not ray.is_initialized()  # a caller's Ray session (tests, notebooks) is reused and left running
    if own_ray:
        ray.init(address=args.address, log_to_driver=True, configure_logging=False)
    resources = ray.cluster_resources()
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if resources.get("GPU", 0) else 0.0)
    trial_cpus, trial_gpus = args.workers_per_trial * args.cpus_per_worker, args.workers_per_trial * gpus
    if trial_cpus > resources.get("CPU", 0) or trial_gpus > resources.get("GPU", 0):
        raise SweepError(
            f"one trial needs {trial_cpus:g} CPUs and {trial_gpus:g} GPUs but the cluster has "
            f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs; lower --workers-per-trial, "
            "--cpus-per-worker or --gpus-per-worker"
        )
    fits = math.floor(resources.get("CPU", 0) / trial_cpus)
    if trial_gpus:
        fits = min(fits, math.floor(resources["GPU"] / trial_gpus))
    max_concurrent = args.max_concurrent or max(1, fits)

    name = args.name or f"{task.name}-{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = _absolute(args.storage)
    experiment_id = tracking.ensure_experiment(uri, task.name)
    parent = tracking.find_or_create_run(
        uri, experiment_id, tags={tracking.SWEEP_TAG: name}, key=tracking.SWEEP_TAG, name=name
    )
    seeds = list(range(args.seeds))
    tracking.log_params(
        uri,
        parent,
        {
            "task": task.name,
            "preset": preset_name,
            "variants": ",".join(variants),
            "seeds": args.seeds,
            "search": args.search,
            "space": ";".join(args.space),
            "workers_per_trial": args.workers_per_trial,
            "gpus_per_worker": gpus,
            "data_root": data_root or "synthetic",
            **{f"preset.{k}": v for k, v in overrides.items()},
        },
    )

    sweep = {
        "name": name,
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent,
        "variants": variants,
        "seeds": seeds,
        "workers_per_trial": args.workers_per_trial,
        "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": gpus,
        "max_failures": args.max_failures,
        "train_storage": f"{storage}/{name}/train",
        "local": args.address is None,  # a Ray started on this machine: one node, nothing to be preempted
    }
    loader_workers = args.loader_workers if args.loader_workers is not None else (4 if gpus else 0)
    param_space: dict[str, Any] = {
        "task": task.name,
        "preset": preset_name,
        "overrides": overrides,
        "data_root": data_root,
        "cache_dir": cache_dir,
        "loader_workers": loader_workers,
        SWEEP_KEY: sweep,
    }
    search_alg, num_samples = None, 1
    if args.search == "optuna":
        from ray.tune.search import Repeater
        from ray.tune.search.optuna import OptunaSearch

        distributions = {
            "loguniform": ray.tune.loguniform,
            "uniform": ray.tune.uniform,
            "randint": lambda lo, hi: ray.tune.randint(lo, hi + 1),
            "choice": lambda *a: ray.tune.choice(a),
        }
        for key, (dist, dist_args) in space.items():
            param_space[f"space.{key}"] = distributions[dist](*dist_args)
        repeat = len(variants) * len(seeds)  # every sampled configuration runs for every variant and seed
        search_alg = Repeater(
            OptunaSearch(metric=f"best/{task.metric.split('/')[-1]}", mode="max", seed=0), repeat=repeat, set_index=True
        )
        num_samples = args.num_samples * repeat
    else:
        param_space["variant"] = ray.tune.grid_search(variants)
        param_space["seed"] = ray.tune.grid_search(seeds)

    # The Tune function only starts the TorchTrainer: it holds no CPU (just a token of memory, as a bundle needs a
    # resource), so Train workers get whole cores. With 0.01 CPU, two trials on 2 CPUs would need 2.02 and the
    # second trial's worker would wait for a core until Ray Train's 60 s start-up timeout.
    trainable = ray.tune.with_resources(run_trial, {"CPU": 0, "memory": 2**20})
    path = f"{storage}/{name}"
    if args.resume:
        if not ray.tune.Tuner.can_restore(path):
            raise SweepError(f"no sweep named {name!r} under {storage} to resume")
        tuner = ray.tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, param_space=param_space
        )
    else:
        if ray.tune.Tuner.can_restore(path):
            raise SweepError(f"a sweep named {name!r} already exists under {storage}; resume it with --resume")
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                search_alg=search_alg,
                num_samples=num_samples,
                max_concurrent_trials=max_concurrent,
                reuse_actors=True,  # one Tune-function process per slot: its imports (mlflow, ray.train) paid once
            ),
            run_config=ray.tune.RunConfig(
                name=name, storage_path=storage, failure_config=ray.tune.FailureConfig(max_failures=args.max_failures)
            ),
        )
    print(
        f"sweep {name}: {len(variants)} variants x {len(seeds)} seeds"
        + (f" x {args.num_samples} samples" if args.search == "optuna" else "")
        + f", preset {preset_name}, up to {max_concurrent} trials at once; resume with --resume --name {name}",
        flush=True,
    )
    grid = tuner.fit()

    results = []
    for result in grid:
        variant, seed = trial_identity(result.config)
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        if args.search == "optuna":
            metrics.update({k: v for k, v in result.config.items() if k.startswith("space.")})
        results.append(report.TrialResult(variant, seed, metrics, "failed" if result.error else "ok"))
    rows = report.comparison(results, report.columns(task.table_metrics))
    table = report.markdown(rows)
    tracking.log_text(uri, parent, table, "comparison.md")
    tracking.log_text(uri, parent, report.to_csv(rows), "comparison.csv")
    failed = sum(r.status != "ok" for r in results)
    tracking.finish_run(uri, parent, "FAILED" if failed else "FINISHED")
    print(
        f"\n{task.name}: {', '.join(task.table_metrics)} per variant (best epoch; last5: mean of the last 5 epochs), "
        f"mean and std over seeds, difference to zero\n"
    )
    print(table)
    if failed:
        print(f"\n{failed} trial(s) failed; their errors are under {path}. Re-run with --resume --name {name}.")
    store = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:") else uri
    print(
        f"\nMLflow UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
        f"then open   http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"   (store: {store})"
    )
    if own_ray:
        ray.shutdown()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
