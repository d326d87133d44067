"""Run the variant x seed comparison of one task on Ray (Tune over trials, Train inside each) with MLflow tracking.

python -m orchestrator.sweep --task classification            # every variant x 3 seeds, local Ray, synthetic data
python -m orchestrator.sweep --task classification --variants zero partial --seeds 2 --preset smoke
python -m orchestrator.sweep --task classification --search optuna --num-samples 4 --space lr=loguniform:1e-4:1e-2
python -m orchestrator.sweep --resume --name classification-cpu-20261125-101500

The steps, each a function below: `plan` (every argument checked, no side effect), `prepare_data`,
`check_services`, then on Ray `trial_resources`, `open_sweep_run`, `build_param_space`, `build_tuner`, `fit`,
`collect_results` and `finish_sweep`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import convs
import tasks
from tasks import LayoutError, Preset, default_cache_dir, ensure_synthetic
from tasks.data import loader_workers_per_gpu

from . import report, storage, tables, tracking, weights
from .cli import ArgumentParser, CliError, default_tracking_uri, setup_logging, temporary_env
from .config import SweepSettings
from .loop import FAILURE_KEY

log = logging.getLogger("orchestrator.sweep")  # not __name__: that is "__main__" under python -m

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
ARGS_FILE = "sweep-args.json"  # the command line a sweep started with, beside Tune's state: --resume reads it
# Loader workers per training process when the sweep starts before any GPU node has joined (an autoscaling
# cluster): what `loader_workers_per_gpu` gives a GPU of the cluster YAMLs' smallest GPU nodes (8 cores, 1 GPU).
DEFAULT_GPU_LOADER_WORKERS = 6
RESUMABLE = (
    "resume",
    "name",
    "storage",
    "address",
    "verbose",
)  # what --resume may set; everything else is the sweep's own
# Preset fields that --space cannot sample: the data, the model, the arms, and what a damaged image does.
NOT_SEARCHABLE = ("synthetic", "model", "model_options", "variants", "bad_images")


def get_args_parser() -> ArgumentParser:
    """The sweep's command line."""
    p = ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__)
    p.add_argument(
        "--task",
        default="segmentation",
        help=f"task to run; one of {', '.join(sorted(tasks.TASKS))} (default segmentation)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="SPEC",
        help="conv variants to compare: NAME[:OPTION=VALUE,...] or an alias, e.g. zero gated:norm=inside edge_no7 "
        f"(default: the preset's list; names: {', '.join(convs.VARIANTS)}; aliases: {', '.join(convs.ALIASES)})",
    )
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="run seeds 0..N-1 per variant (default 3)")
    p.add_argument(
        "--init",
        nargs="+",
        metavar="SOURCE",
        help="where the weights start, a grid axis like --variants: scratch (default), a checkpoint path, "
        "runs:/<run_id> (a trial of this project) or torchvision:<Weights>.<NAME> from the local torch cache; a "
        "plain model converts to any variant (new filters start as copies), a converted one loads into its own",
    )
    p.add_argument(
        "--preset",
        help="recipe: thesis, cpu or smoke (default: thesis with a GPU here or --gpus-per-worker > 0, else cpu)",
    )
    p.add_argument("--epochs", type=int, metavar="N", help="override the preset's number of epochs")
    p.add_argument(
        "--amp",
        choices=("bf16", "fp16", "off"),
        help="mixed precision, overriding the preset's (the thesis trained in fp32: off in the thesis presets)",
    )
    p.add_argument(
        "--bad-images",
        choices=("fail", "skip"),
        help="a corrupt or truncated image: fail stops the trial naming the file (the presets' default), skip leaves "
        "it out and names it in a warning",
    )
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
        help="where Ray keeps trial state and checkpoints: a local path or s3://bucket/prefix (default ./sweeps). "
        "S3 takes its credentials from the standard AWS settings and an S3-compatible endpoint from AWS_ENDPOINT_URL; "
        "the bucket is checked (exists, credentials accepted, writable) before any trial starts. On a multi-node "
        "cluster a local path must be shared by every node (checked after Ray starts)",
    )
    p.add_argument(
        "--artifact-location",
        metavar="URI",
        help="where MLflow keeps the artifacts (checkpoints, tables, plots) of the task's experiment when this run "
        "creates it, e.g. s3://bucket/mlflow (checked like --storage); default: the tracking server's (mlflow server "
        "--artifacts-destination) or the store's. MLflow cannot move an existing experiment's artifacts: one kept "
        "elsewhere is an error",
    )
    p.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        metavar="URI",
        help="MLflow store: sqlite:///file.db or http://host:port (default: $MLFLOW_TRACKING_URI when set, as the "
        "cluster YAMLs set it on the head to its MLflow server; else sqlite:///mlflow.db here)",
    )
    p.add_argument(
        "--workers-per-trial", type=int, default=1, metavar="N", help="Ray Train workers per trial (DDP; default 1)"
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
        help="DataLoader processes per Train worker (default: 0 on CPU; with GPUs, the node's cores left after one per "
        "training process and one for the node, shared among its GPUs, at most 16: tasks.data.loader_workers_per_gpu)",
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
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print Ray's own output too (Tune's status tables, the workers' logs); by default it goes to Ray's log "
        "files and the sweep prints one line per trial event",
    )
    return p


# planning: pure, before anything starts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Everything the command line decided, checked; building it starts nothing and writes nothing."""

    task: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    preset_name: str
    preset: Preset  # the task's preset with the overrides applied
    overrides: dict[str, Any]  # preset fields changed on the command line (--epochs)
    space: dict[str, tuple[str, list]]  # --space KEY=DIST:ARGS, parsed: {key: (dist, args)}
    search: str  # grid | optuna
    num_samples: int  # Optuna samples, each run for every variant and seed
    name: str
    resume: bool
    data_root: str | None  # absolute; None = the synthetic stand-in
    storage: str  # absolute local path or a URI
    tracking_uri: str  # absolute for SQLite (Ray workers run in other folders)
    address: str | None  # Ray cluster; None = a local Ray started here
    artifact_location: str | None = None  # --artifact-location: MLflow artifacts of a new experiment; None = default
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs
    loader_workers: int | None = None  # None: 0 on CPU, tasks.data.loader_workers_per_gpu with GPUs
    max_concurrent: int | None = None  # None: as many trials as the cluster fits
    max_failures: int = 2
    space_args: tuple[str, ...] = field(default=())  # the --space strings as typed, for the parent run's params
    inits: tuple[str, ...] = ("scratch",)  # --init sources (file paths absolute), a grid axis
    verbose: bool = False  # Ray's own output on the terminal too (else in Ray's log files)
    args: dict[str, Any] = field(default_factory=dict)  # the command line, paths absolute: saved for --resume

    @property
    def trial_count(self) -> int:
        """Trials in the sweep: variants x inits x seeds (x Optuna samples)."""
        samples = self.num_samples if self.search == "optuna" else 1
        return len(self.variants) * len(self.inits) * len(self.seeds) * samples

    @property
    def trials_in_function(self) -> bool:
        """Each trial trains in its Tune function's process (Ray Train's local mode, `trial.py`): one worker per
        trial on a local Ray. A cluster or several workers per trial keep Train's worker processes."""
        return self.address is None and self.workers_per_trial == 1

    @property
    def path(self) -> str:
        """Where Tune keeps this sweep's state."""
        return f"{self.storage}/{self.name}"


def plan(args: Any, *, cuda: bool, now: float | None = None) -> Plan:
    """Check every argument and return the sweep's plan; raise `CliError` with the fix for anything wrong.

    Pure: it reads no data and starts nothing (`cuda` says whether this machine has a GPU, which picks the default
    preset; `now` is the timestamp of a default sweep name).
    """
    try:
        task = tasks.get_task(args.task)
        for v in args.variants or []:
            convs.parse_variant(v)
    except ValueError as e:
        raise CliError(str(e)) from None
    for flag, value, low in (
        ("--seeds", args.seeds, 1),
        ("--workers-per-trial", args.workers_per_trial, 1),
        ("--num-samples", args.num_samples, 1),
        ("--max-failures", args.max_failures, 0),
        ("--max-concurrent", args.max_concurrent, 1),
        ("--loader-workers", args.loader_workers, 0),
    ):
        if value is not None and value < low:
            raise CliError(f"{flag} must be at least {low}, got {value}")
    if args.cpus_per_worker <= 0 or (args.gpus_per_worker is not None and args.gpus_per_worker < 0):
        raise CliError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
    if args.resume and not args.name:
        raise CliError("--resume needs --name SWEEP (the name printed when the sweep started)")
    # A GPU here, or GPUs asked for (a cluster whose head has none): the thesis recipe.
    preset_name = args.preset or ("thesis" if cuda or (args.gpus_per_worker or 0) > 0 else "cpu")
    if preset_name not in task.presets:
        raise CliError(f"unknown preset {preset_name!r} for {task.name}; known presets: {', '.join(task.presets)}")
    overrides: dict[str, Any] = {"epochs": args.epochs} if args.epochs is not None else {}
    if args.amp is not None:
        overrides["amp"] = None if args.amp == "off" else args.amp
    if getattr(args, "bad_images", None) is not None:  # absent from the saved arguments of older sweeps
        overrides["bad_images"] = args.bad_images
    try:
        preset = task.presets[preset_name].updated(**overrides)
    except ValueError as e:
        raise CliError(f"{e} (preset {preset_name} of {task.name})") from None
    variants = tuple(args.variants or preset.variants)
    unsupported = [v for v in variants if convs.parse_variant(v).base not in task.variants]
    if unsupported:
        raise CliError(f"task {task.name} does not support {unsupported}; it supports {', '.join(task.variants)}")
    if preset.batch_size % args.workers_per_trial:
        raise CliError(
            f"the batch of {preset.batch_size} (global, as in the thesis) does not split across "
            f"{args.workers_per_trial} workers per trial; pick --workers-per-trial dividing it"
        )
    if urlparse(args.tracking_uri).password:
        raise CliError(
            "--tracking-uri (or $MLFLOW_TRACKING_URI) holds a password; it would be recorded in every trial's params "
            "and the sweep's saved state. Give the URI without user:password@ and put the credentials in "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    inits = parse_inits(getattr(args, "init", None))
    space = parse_space(args.space, preset)
    if args.search == "optuna" and not space:
        raise CliError("--search optuna needs at least one --space KEY=DIST (e.g. --space lr=loguniform:1e-4:1e-1)")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    paths = _absolute_paths(vars(args))
    return Plan(
        task=task.name,
        variants=variants,
        seeds=tuple(range(args.seeds)),
        preset_name=preset_name,
        preset=preset,
        overrides=overrides,
        space=space,
        search=args.search,
        num_samples=args.num_samples,
        name=args.name or f"{task.name}-{preset_name}-{stamp}",
        resume=args.resume,
        verbose=getattr(args, "verbose", False),
        data_root=paths["data_root"],
        storage=paths["storage"],
        tracking_uri=paths["tracking_uri"],
        address=args.address,
        artifact_location=getattr(args, "artifact_location", None),
        workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        loader_workers=args.loader_workers,
        max_concurrent=args.max_concurrent,
        max_failures=args.max_failures,
        space_args=tuple(args.space),
        inits=inits,
        args={**vars(args), **paths, "name": args.name or f"{task.name}-{preset_name}-{stamp}"},
    )


def resumed_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """For `--resume`: the arguments the sweep started with (saved beside its state), so `--resume --name X` alone
    continues it as it was. Flags given again must agree with them; only `--address` may change (a new cluster).
    A sweep saved before the arguments were kept resumes with the command line as given."""
    stored = read_saved_args(_absolute(args.storage), args.name)
    if stored is None:
        return args
    typed = {k: v for k, v in vars(args).items() if k not in RESUMABLE and v != parser.get_default(k)}
    normalized = {**vars(args), **_absolute_paths(vars(args))}
    changed = sorted(k for k in typed if normalized[k] != stored.get(k, parser.get_default(k)))
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} (started with {stored.get(k)!r})" for k in changed)
        raise CliError(
            f"--resume continues sweep {args.name!r} with the arguments it started with; these differ: {flags}. "
            "Drop them, or start a new sweep under another --name."
        )
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in stored.items() if k not in RESUMABLE}})


def parse_inits(values: list[str] | None) -> tuple[str, ...]:
    """The --init sources, checked for form (what they name is checked by `check_services`); paths absolute."""
    inits = []
    for value in values or [weights.SCRATCH]:
        try:
            init = weights.parse_init(value)
        except weights.InitError as e:
            raise CliError(str(e)) from None
        inits.append(str(Path(init.target).resolve()) if init.kind == "file" else init.spec)
    if len(set(inits)) != len(inits):
        raise CliError(f"--init lists a source twice: {' '.join(values or [])}")
    return tuple(inits)


def _absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """storage, tracking_uri and data_root as absolute paths: what a saved sweep keeps, whatever the folder."""
    return {
        "storage": _absolute(values["storage"]),
        "tracking_uri": _absolute_tracking(values["tracking_uri"]),
        "data_root": str(Path(values["data_root"]).resolve()) if values.get("data_root") else None,
    }


def parse_space(items: list[str], preset: Preset) -> dict[str, tuple[str, list]]:
    """KEY=DIST:ARGS strings -> {key: (dist, args)}; keys are the preset's fields, and every value the
    distribution can produce (both bounds, each choice) must be a valid value of that field."""
    known = {f.name for f in fields(preset)} - set(NOT_SEARCHABLE)
    space = {}
    for item in items:
        key, sep, spec = item.partition("=")
        dist, _, rest = spec.partition(":")
        if not sep or dist not in DISTRIBUTIONS or not rest:
            raise CliError(
                f"--space {item!r}: expected KEY=DIST:ARGS with DIST one of {', '.join(DISTRIBUTIONS)}, "
                "e.g. lr=loguniform:1e-4:1e-1 or batch_size=choice:16,32"
            )
        if key not in known:
            raise CliError(f"--space {item!r}: unknown preset key {key!r}. Known keys: {', '.join(sorted(known))}")
        try:
            if dist == "choice":
                args = [_number(v) for v in rest.split(",")]
            else:
                low, high = (float(v) for v in rest.split(":"))
                args = [int(low), int(high)] if dist == "randint" else [low, high]
        except ValueError:
            raise CliError(f"--space {item!r}: could not read the numbers in {rest!r}") from None
        if (dist == "randint" and args[0] > args[1]) or (dist in ("uniform", "loguniform") and args[0] >= args[1]):
            raise CliError(f"--space {item!r}: the lower bound must be below the upper bound")
        if dist == "loguniform" and args[0] <= 0:
            raise CliError(f"--space {item!r}: loguniform needs bounds > 0")
        for value in args:
            try:
                preset.updated(**{key: value})
            except ValueError as e:
                raise CliError(f"--space {item!r} can sample {key}={value!r}, which the preset refuses: {e}") from None
        space[key] = (dist, args)
    return space


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _absolute(uri_or_path: str) -> str:
    return uri_or_path if "://" in uri_or_path else str(Path(uri_or_path).expanduser().resolve())


def _absolute_tracking(uri: str) -> str:
    # Ray workers run in other folders: a relative sqlite:///mlflow.db would open a different database there.
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


# before Ray: data and services ---------------------------------------------------------------------------------------


def _args_file(storage_path: str, name: str) -> tuple[Any, str]:
    fs, root = storage.filesystem(storage_path)  # Ray's storage layer (pyarrow): local paths and s3:// alike
    return fs, f"{root.rstrip('/')}/{name}/{ARGS_FILE}"


def read_saved_args(storage_path: str, name: str) -> dict[str, Any] | None:
    """The arguments sweep `name` under `storage_path` started with, or None when it has none saved."""
    import pyarrow.fs

    try:
        fs, path = _args_file(storage_path, name)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except OSError as e:
        storage.check_storage(storage_path)  # says what is wrong with a bucket, its endpoint or the credentials
        raise CliError(f"cannot read sweep {name!r} under --storage {storage_path} ({e})") from None


def save_args(p: Plan) -> None:
    """Keep the sweep's arguments beside its state (write, then rename: a crash never leaves half a file; on S3 the
    rename is a copy, the object appears whole either way). They hold no secret: `plan` refuses a tracking URI with
    a password, `check_services` a storage or artifact URI with credentials."""
    fs, path = _args_file(p.storage, p.name)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path + ".tmp") as f:
        f.write(json.dumps(p.args, indent=1, sort_keys=True).encode())
    fs.move(path + ".tmp", path)


@dataclass(frozen=True)
class Data:
    """Where the trials read their data, and what preparing it found (artifacts for the sweep's run)."""

    data_root: str | None  # the real dataset, or None for the synthetic stand-in in cache_dir
    cache_dir: str | None
    report: dict[str, str] = field(default_factory=dict)  # artifact path -> text, from the task's data_report


def prepare_data(p: Plan) -> Data:
    """The real data's layout checked, or the synthetic stand-in generated once, here; and the task's report on
    it (hotels: what cleaning dropped and which listed images are missing), when the task gives one."""
    task = tasks.get_task(p.task)
    try:
        if p.data_root:
            task.check_layout(Path(p.data_root))
            root, data = Path(p.data_root), Data(p.data_root, None)
        else:
            cache_dir = default_cache_dir().resolve()
            root = ensure_synthetic(task, p.preset, cache_dir)  # once, here, before trials start
            data = Data(None, str(cache_dir))
        if hasattr(task, "data_report"):
            data = Data(data.data_root, data.cache_dir, task.data_report(root, p.preset))
        return data
    except LayoutError as e:
        raise CliError(str(e)) from None


def check_services(p: Plan) -> None:
    """Fail fast, with the fix, when the MLflow store, the storage, the artifact location or the Ray cluster cannot
    be reached or used: an s3:// --storage or --artifact-location must exist, accept the credentials and take a write
    (see `storage.check_bucket`)."""
    try:
        tracking.check_tracking_uri(p.tracking_uri)
    except tracking.TrackingError as e:
        raise CliError(str(e)) from None
    storage.check_storage(p.storage)
    if p.artifact_location:
        storage.check_artifact_location(p.artifact_location)
    for init in p.inits:
        try:
            weights.check_init(weights.parse_init(init), p.tracking_uri)
        except weights.InitError as e:
            raise CliError(str(e)) from None
    check_address(p.address)


def check_address(address: str | None, *, timeout: float = 5.0) -> None:
    """Fail fast when a Ray head does not answer, instead of letting ray.init retry for minutes."""
    if not address or address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise CliError(f"--address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise CliError(f"cannot reach a Ray cluster at {address} ({e}); is `ray start --head` running there?") from None


# on Ray ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What one trial takes from the cluster, and how many trials run at once."""

    gpus_per_worker: float
    max_concurrent: int
    loader_workers: int


def trial_resources(p: Plan, cluster: dict[str, float], nodes: list[dict[str, float]] | None = None) -> Resources:
    """Fit the trials to the cluster's CPUs and GPUs (`ray.cluster_resources()`); `CliError` if one cannot fit.

    Loader workers (unless --loader-workers): none on CPU, where they would take the cores the trials train on;
    with GPUs, `tasks.data.loader_workers_per_gpu` of the smallest GPU node in `nodes` (each node's resources; the
    whole cluster as one node when not given), counting one training process per `gpus_per_worker` of a GPU.

    A cluster (`--address`) asked for GPUs explicitly (`--gpus-per-worker`) may have fewer now than the sweep can
    use: the cluster YAMLs start with no GPU workers, and Ray's autoscaler adds nodes for the trials that wait for
    them. Then every trial may start (or `--max-concurrent`), instead of as many as fit the nodes present.
    """
    cpus, gpus_total = cluster.get("CPU", 0), cluster.get("GPU", 0)
    gpus = p.gpus_per_worker if p.gpus_per_worker is not None else (1.0 if gpus_total else 0.0)
    trial_cpus, trial_gpus = p.workers_per_trial * p.cpus_per_worker, p.workers_per_trial * gpus
    loader_workers = p.loader_workers if p.loader_workers is not None else 0
    if p.loader_workers is None and gpus:
        gpu_nodes = [n for n in (nodes or [cluster]) if n.get("GPU", 0) > 0]
        loader_workers = min(
            (loader_workers_per_gpu(int(n.get("CPU", 1)) or 1, max(1, math.floor(n["GPU"] / gpus))) for n in gpu_nodes),
            default=DEFAULT_GPU_LOADER_WORKERS,  # GPU nodes still to come from the autoscaler
        )
    if p.address is not None and p.gpus_per_worker:
        fits_now = math.floor(min(cpus / trial_cpus, gpus_total / trial_gpus))
        log.info(
            "the cluster holds %d trial(s) of %g GPUs and %g CPUs now; the others wait for the autoscaler to add "
            "nodes (up to the cluster's max_workers)",
            fits_now,
            trial_gpus,
            trial_cpus,
        )
        return Resources(gpus, p.max_concurrent or p.trial_count, loader_workers)
    if trial_cpus > cpus or trial_gpus > gpus_total:
        raise CliError(
            f"one trial needs {trial_cpus:g} CPUs and {trial_gpus:g} GPUs but the cluster has {cpus:g} CPUs and "
            f"{gpus_total:g} GPUs; lower --workers-per-trial, --cpus-per-worker or --gpus-per-worker (on an "
            "autoscaling cluster, pass --address and --gpus-per-worker: the trials then wait for new nodes)"
        )
    fits = math.floor(cpus / trial_cpus)
    if trial_gpus:
        fits = min(fits, math.floor(gpus_total / trial_gpus))
    return Resources(gpus, p.max_concurrent or max(1, fits), loader_workers)


def open_sweep_run(p: Plan, res: Resources, data: Data) -> tuple[str, str]:
    """(experiment id, parent run id): the task's MLflow experiment and the sweep's run, found again on resume."""
    try:
        experiment_id = tracking.ensure_experiment(p.tracking_uri, p.task, p.artifact_location)
    except tracking.TrackingError as e:
        raise CliError(str(e)) from None
    parent = tracking.find_or_create_run(
        p.tracking_uri, experiment_id, tags={tracking.SWEEP_TAG: p.name}, key=tracking.SWEEP_TAG, name=p.name
    )
    params = {
        "task": p.task,
        "preset": p.preset_name,
        "variants": ",".join(p.variants),
        "seeds": len(p.seeds),
        "inits": ",".join(p.inits),
        "search": p.search,
        "space": ";".join(p.space_args),
        "workers_per_trial": p.workers_per_trial,
        "gpus_per_worker": res.gpus_per_worker,
        "data_root": data.data_root or "synthetic",
        # The cells the report expects, as JSON (a variant spec may hold commas: the `variants` param is for reading).
        report.GRID_PARAM: report.Grid(
            p.variants, p.inits, p.seeds, p.num_samples if p.search == "optuna" else 1, tuple(p.space)
        ).to_param(),
        **{f"preset.{k}": v for k, v in p.overrides.items()},
    }
    tracking.log_params(p.tracking_uri, parent, params)
    for path, text in data.report.items():
        tracking.log_text(p.tracking_uri, parent, text, path)
    return experiment_id, parent


def build_param_space(
    p: Plan, sweep: SweepSettings, *, data_root: str | None, cache_dir: str | None, loader_workers: int
) -> tuple[dict[str, Any], Any, int]:
    """(param_space, search algorithm or None, num_samples) for Tune: a variant x seed grid, or Optuna samples of
    `--space` each repeated for every variant and seed (Repeater's replica index picks the variant and seed)."""
    import ray.tune

    space: dict[str, Any] = {
        "task": p.task,
        "preset": p.preset_name,
        "overrides": p.overrides,
        "data_root": data_root,
        "cache_dir": cache_dir,
        "loader_workers": loader_workers,
        SweepSettings.KEY: sweep.to_dict(),
    }
    if p.search != "optuna":
        space["variant"] = ray.tune.grid_search(list(p.variants))
        space["init"] = ray.tune.grid_search(list(p.inits))
        space["seed"] = ray.tune.grid_search(list(p.seeds))
        return space, None, 1
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    distributions = {
        "loguniform": ray.tune.loguniform,
        "uniform": ray.tune.uniform,
        "randint": lambda lo, hi: ray.tune.randint(lo, hi + 1),  # ours is inclusive, Tune's is not
        "choice": lambda *a: ray.tune.choice(a),
    }
    for key, (dist, dist_args) in p.space.items():
        space[f"space.{key}"] = distributions[dist](*dist_args)
    repeat = len(p.variants) * len(p.inits) * len(p.seeds)
    metric = f"best/{tables.summary_name(tasks.get_task(p.task).metric)}"
    search = Repeater(OptunaSearch(metric=metric, mode="max", seed=0), repeat=repeat, set_index=True)
    return space, search, p.num_samples * repeat


def build_tuner(p: Plan, param_space: dict[str, Any], search_alg: Any, num_samples: int, max_concurrent: int):
    """A new Tuner, or the sweep's own restored one for `--resume`; `CliError` when the name says otherwise."""
    import ray.tune

    from .trial import run_trial

    # Each trial's own settings decide what its Tune function holds (`SweepSettings.function_resources`): a resumed
    # trial keeps the ones it started with.
    trainable = ray.tune.with_resources(run_trial, function_resources)
    # p.path may be s3://bucket/prefix/name: Tune (here), Train (in each trial) and their restores resolve it through
    # pyarrow, which reads the endpoint (AWS_ENDPOINT_URL) and credentials from each process's environment, so no
    # storage_filesystem is passed (and none, with what it holds, is pickled into Tune's saved state).
    exists = ray.tune.Tuner.can_restore(p.path)
    if p.resume:
        if not exists:
            raise CliError(f"no sweep named {p.name!r} under {p.storage} to resume")
        # The trials keep the configs they started with (param_space=None): the same settings, and sweeps written
        # by older versions stay readable (`SweepSettings.from_dict`).
        tuner = ray.tune.Tuner.restore(p.path, trainable, resume_unfinished=True, resume_errored=True)
        # The restored run config is the one the sweep started with; this run's output settings replace its own.
        run_config = tuner._local_tuner.get_run_config()
        run_config.verbose, run_config.callbacks = output_settings(p)
        return tuner
    if exists:
        raise CliError(f"a sweep named {p.name!r} already exists under {p.storage}; resume it with --resume")
    save_args(p)
    verbose, callbacks = output_settings(p)
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            reuse_actors=True,  # one Tune-function process per slot: its imports (mlflow, ray.train) paid once
        ),
        run_config=ray.tune.RunConfig(
            name=p.name,
            storage_path=p.storage,
            failure_config=ray.tune.FailureConfig(max_failures=p.max_failures),
            # Trials that train in their Tune function checkpoint to Tune: only the latest is needed to resume.
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1),
            verbose=verbose,
            callbacks=callbacks,
        ),
    )


def function_resources(config: dict[str, Any]) -> Any:
    """The placement group of a trial's Tune function, from the sweep settings in its config."""
    import ray.tune

    return ray.tune.PlacementGroupFactory([SweepSettings.from_dict(config[SweepSettings.KEY]).function_resources()])


def output_settings(p: Plan) -> tuple[int, list]:
    """Tune's verbosity and callbacks: one line per trial event (`progress.TrialProgress`), and Tune's own tables
    and boxes only with --verbose; and the deletion of finished trials' Tune checkpoints (`DropFinishedCheckpoints`)."""
    from .progress import TrialProgress
    from .trial import DropFinishedCheckpoints

    return (2 if p.verbose else 0), [TrialProgress(), DropFinishedCheckpoints()]


SNAPSHOT_WARNING = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"


class _HideRestoreHint(logging.Filter):
    """Drop Tune's "Resume experiment with: Tuner.restore(...)": the sweep prints its own `--resume` command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


def fit(tuner, *, verbose: bool = True) -> Any:
    """`tuner.fit()`; after a Ctrl-C, Tune stops the trials, saves its state and returns (a second one raises).

    Not `verbose`: Tune's output engine is switched to its older one for the call, which at verbosity 0 prints
    nothing at all (the newer one still prints its experiment box and result paths); TrialProgress speaks instead."""
    hint = _HideRestoreHint()
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addFilter(hint)
    try:
        with contextlib.ExitStack() as env:
            # Read by Tune when the fit starts, in this process only.
            if not verbose:
                env.enter_context(temporary_env("RAY_AIR_NEW_OUTPUT", "0"))
            if SNAPSHOT_WARNING not in os.environ:
                # Tune saves its experiment state after every checkpoint of a trial that checkpoints to it (a few
                # KB; `num_to_keep=1` forces it, so the state never names a deleted checkpoint) and warns when that
                # happens more than once in 5 s, as it does with short epochs: nothing for the user to change.
                env.enter_context(temporary_env(SNAPSHOT_WARNING, "0"))
            return tuner.fit()
    finally:
        tune_logger.removeFilter(hint)


def collect_results(grid, p: Plan) -> list[tables.TrialResult]:
    """One TrialResult per trial: `ok` when it trained every epoch, `failed` with an error, else `interrupted`."""
    results = []
    for result in grid:
        cfg = SweepSettings.from_dict(result.config[SweepSettings.KEY]).trial_config(result.config)
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        if p.search == "optuna":
            metrics.update({k: v for k, v in result.config.items() if k.startswith("space.")})
        epochs = tasks.get_task(cfg.task).presets[cfg.preset].updated(**cfg.overrides).epochs
        reason = str((result.metrics or {}).get(FAILURE_KEY, ""))
        if result.error is not None or reason:
            status = "failed"
        elif metrics.get("epoch") == epochs - 1:
            status = "ok"
        else:
            status = "interrupted"  # stopped by Ctrl-C (or never started): --resume continues it
        label = report.arm_label(cfg.variant, cfg.init)
        trial_id = str((result.metrics or {}).get("trial_id", ""))
        results.append(tables.TrialResult(label, cfg.seed, metrics, status, reason, trial_id=trial_id))
    return results


def finish_sweep(p: Plan, results: list[tables.TrialResult], experiment_id: str, parent: str) -> str:
    """End the parent run (FINISHED, FAILED or KILLED) and every trial run left RUNNING; return the status."""
    statuses = {r.status for r in results}
    status = "KILLED" if "interrupted" in statuses else "FAILED" if "failed" in statuses else "FINISHED"
    failed = {r.trial_id for r in results if r.status == "failed" and r.trial_id}
    end_sweep_run(p, experiment_id, parent, status, failed)
    return status


def sweep_report(p: Plan, parent: str) -> report.Report | None:
    """The sweep's report (`orchestrator.report`), read back from MLflow and logged under the parent run's
    `report/`; None, with a warning saying how to rebuild it, when that fails: the trials' own runs hold the results."""
    try:
        return report.make_report(p.tracking_uri, parent)
    except Exception as e:  # noqa: BLE001 - a report that cannot be built must not turn a finished sweep into an error
        log.warning(
            "the sweep's report could not be built (%s: %s); rebuild it with: python -m orchestrator.report "
            "--run-id %s --tracking-uri %s",
            type(e).__name__,
            e,
            parent,
            p.tracking_uri,
        )
        return None


def end_sweep_run(p: Plan, experiment_id: str, parent: str, status: str, failed: Collection[str] = ()) -> None:
    """End the sweep's run with `status`, and every trial run still RUNNING: FAILED for the trial ids in `failed`
    (Tune gave up on them), else KILLED (stopped with the sweep)."""
    stopped = tracking.end_running_trials(p.tracking_uri, experiment_id, p.name, "KILLED", failed)
    if stopped:
        log.info("marked %d unfinished trial run(s) KILLED in MLflow", len(stopped))
    tracking.finish_run(p.tracking_uri, parent, status)


def closing_lines(
    p: Plan, results: list[tables.TrialResult], experiment_id: str, parent: str, built: report.Report | None
) -> str:
    """The report's compact view, what failed, and what to do next: resume an unfinished sweep, open the report and
    the sweep's run in the MLflow UI."""
    batch = (
        f"batch {p.preset.batch_size} global ({p.preset.batch_size // p.workers_per_trial} per worker x "
        f"{p.workers_per_trial})"
    )
    lines = [f"\n{p.task}, preset {p.preset_name}, {batch}"]
    if built is not None:
        lines.append(built.terminal)
    failed = sum(r.status == "failed" for r in results)
    interrupted = sum(r.status == "interrupted" for r in results)
    if failed:
        lines.append(f"\n{failed} trial(s) failed:")
        for r in results:
            if r.status == "failed":
                lines.append(f"  {r.variant} seed {r.seed}: {r.reason or f'its error is under {p.path}'}")
    if interrupted:
        lines.append(f"\n{interrupted} trial(s) interrupted before their last epoch.")
    if failed or interrupted:
        lines.append(f"Resume with: python -m orchestrator.sweep --resume --name {p.name} --storage {p.storage}")
    store = p.tracking_uri.removeprefix("sqlite:///") if p.tracking_uri.startswith("sqlite:") else p.tracking_uri
    lines.append(
        f"\nReport (Markdown, CSV, LaTeX, plots): the sweep run's artifacts, report/; again with: "
        f"python -m orchestrator.report --sweep {p.name} --tracking-uri {p.tracking_uri}\n"
        f"MLflow UI:  python -m orchestrator.ui --tracking-uri {p.tracking_uri}   (store: {store})\n"
        f"the sweep:  http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{parent}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[tables.TrialResult]:
    """Plan, check, run the sweep on Ray and print the comparison; returns one result per trial."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.resume and args.name:
        args = resumed_args(args, parser)
    setup_logging()
    import torch

    p = plan(args, cuda=torch.cuda.is_available())
    if not p.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store set-up lines ("Creating initial ...")
        # Ray's notice that a new local cluster has token authentication on (printed at every start)
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    data = prepare_data(p)
    check_services(p)

    import ray

    own_ray = not ray.is_initialized()  # a caller's Ray session (tests, notebooks) is reused and left running
    if own_ray:
        # Without --verbose the workers' output (Train's checkpoint paths, the placement-group cleaner's State API
        # warnings, the trials' own logs) stays in Ray's log files; the trials' events come from TrialProgress.
        ray.init(address=p.address, log_to_driver=p.verbose, configure_logging=False)
    try:
        storage.check_shared_storage(p.storage)  # a local --storage on a multi-node cluster: every node must see it
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        res = trial_resources(p, ray.cluster_resources(), nodes)
        experiment_id, parent = open_sweep_run(p, res, data)
        try:
            sweep = SweepSettings(
                name=p.name,
                tracking_uri=p.tracking_uri,
                experiment_id=experiment_id,
                parent_run_id=parent,
                variants=list(p.variants),
                seeds=list(p.seeds),
                train_storage=f"{p.storage}/{p.name}/train",
                workers_per_trial=p.workers_per_trial,
                cpus_per_worker=p.cpus_per_worker,
                gpus_per_worker=res.gpus_per_worker,
                max_failures=p.max_failures,
                local=p.address is None,
                inits=list(p.inits),
                in_function=p.trials_in_function,
            )
            # A resumed sweep's trials keep their own configs (see build_tuner): no new search space to build.
            space, search_alg, num_samples = (
                ({}, None, 1)
                if p.resume
                else build_param_space(
                    p,
                    sweep,
                    data_root=data.data_root,
                    # On a cluster each node generates the synthetic data into its own cache (the driver's folder may
                    # not exist there); on this machine the trials reuse what prepare_data wrote.
                    cache_dir=data.cache_dir if p.address is None else None,
                    loader_workers=res.loader_workers,
                )
            )
            tuner = build_tuner(p, space, search_alg, num_samples, res.max_concurrent)
            log.info(
                "sweep %s: %d variants x %d seeds%s, preset %s, up to %d trials at once; resume: --resume --name %s",
                p.name,
                len(p.variants),
                len(p.seeds),
                f" x {p.num_samples} samples" if p.search == "optuna" else "",
                p.preset_name,
                res.max_concurrent,
                p.name,
            )
            if not p.verbose:
                log.info(
                    "Ray's own output goes to its log files (session_latest/logs in Ray's temp folder, /tmp/ray by "
                    "default, on each node); --verbose prints it here"
                )
            results = collect_results(fit(tuner, verbose=p.verbose), p)
        except BaseException as e:
            end_sweep_run(p, experiment_id, parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            if isinstance(e, KeyboardInterrupt):
                raise CliError(
                    f"sweep {p.name} interrupted; resume it with: python -m orchestrator.sweep --resume "
                    f"--name {p.name} --storage {p.storage}"
                ) from None
            raise
        finish_sweep(p, results, experiment_id, parent)
        print(closing_lines(p, results, experiment_id, parent, sweep_report(p, parent)), flush=True)
        return results
    finally:
        if own_ray:
            ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
