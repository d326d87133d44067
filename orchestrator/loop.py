"""The one training loop every task shares: seed, build, convert, train one epoch, evaluate, checkpoint, report.

Ray-free on purpose: `orchestrator.trial` runs it inside Ray Train workers, tests run it directly. Reads like
torchvision's reference trainers: `train_one_epoch`, `evaluate`, `train`.
"""

from __future__ import annotations

import ctypes
import datetime
import itertools
import logging
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

import convs
from tasks import Evaluation, Preset, Task, autocast, default_cache_dir, ensure_synthetic, get_task

from .config import TrialConfig
from .tables import summary_name
from .weights import initialize, parse_init, start_is_open

CHECKPOINT_FILE = "checkpoint.pt"
FAILURE_KEY = "failure"  # in a trial's last report and summary: why it stopped early (a diverged loss)
# Training batches between two host reads of the loss: in between, the losses stay on the device and a GPU runs
# ahead of the Python loop instead of waiting for each batch's `.item()`.
LOSS_READ_EVERY = 32

logger = logging.getLogger(__name__)

# glibc's malloc options (malloc.h): M_TRIM_THRESHOLD, M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory that freed tensors leave, for the next step's tensors of the same sizes.

    By default glibc gives a large block (over 128 KiB to 32 MiB, adapting) a mapping of its own and unmaps it when
    the block is freed, and trims the heap's free top: every training step then faults its gradients and
    activations in again, page by page. Edge conv, whose 9 filters per layer get fresh gradient buffers every step,
    pays most: measured on a 2-core VM, its segmentation `cpu` step takes 11% less time with this (zero padding's
    the same), and a ResNet50 step 7% less (zero padding's 5%). With no mappings and no trimming, freed memory
    stays in the process and is reused; what the process holds stays at its peak, as with the jemalloc and tcmalloc
    settings PyTorch's CPU tuning guide recommends. Returns whether the options were set: a no-op where the C
    library has no `mallopt` (macOS, Windows).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no such symbol; Windows cannot open the process itself
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) & bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class Tracker(Protocol):
    """Where rank 0 logs a trial: every epoch's metrics, the best epoch's checkpoint and evaluation, the summary."""

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """The epoch's scalar metrics (train, validation, summary so far, timings)."""

    def log_best(self, best_checkpoint: Path, evaluation: Evaluation) -> None:
        """A new best epoch: its checkpoint and full evaluation (confusion matrix, per-class tables)."""

    def log_final(self, summary: dict[str, float], curves: list[str]) -> None:
        """The run's summary (best, last-5 mean) and the metrics to draw as training curves."""

    def log_model(
        self, net: nn.Module, weights: nn.Module, best_checkpoint: Path, inputs: Any, tags: dict[str, str]
    ) -> str | None:
        """Once training is over, the best epoch's model: `best_checkpoint`'s weights loaded into `weights` (the
        trained model inside `net`), `net` (what the task calls) logged with a signature from a forward pass on
        `inputs` (a training batch's) and `tags` (task, variant, seed, preset); its id, or None when it could not
        be logged (a failure here must not fail the trial)."""

    def logged_epochs(self, metric: str) -> set[int]:
        """The epochs whose `metric` is already logged (a resumed trial logs only the others)."""

    def log_failure(self, reason: str) -> None:
        """Why the trial stopped early (a diverged loss); the trial function ends the run FAILED."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite: the trial stops, marked failed with this message."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) for a reproducible trial."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, preset: Preset) -> torch.optim.Optimizer:
    """SGD with momentum or Adam (momentum as beta1), with the preset's learning rate and weight decay.

    Fused (one kernel over all parameters) on CPUs and CUDA GPUs: torch's default for-each implementation takes 15 ms
    per Adam step on the 2-core VM for the edge demo model's 8.9M parameters (its nine filter banks), the fused one
    5.5 ms. The update is the same up to float rounding."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters()) or None
    if preset.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=preset.lr, momentum=preset.momentum, weight_decay=preset.weight_decay, fused=fused
        )
    if preset.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(),
            lr=preset.lr,
            betas=(preset.momentum, 0.999),
            weight_decay=preset.weight_decay,
            fused=fused,
        )
    raise ValueError(f"Invalid optimizer {preset.optimizer!r}. Only sgd and adam are supported.")


def build_scheduler(optimizer: torch.optim.Optimizer, preset: Preset) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule: step (x gamma every step_size epochs), poly or constant."""
    if preset.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=preset.step_size, gamma=preset.gamma)
    if preset.schedule == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=preset.epochs, power=preset.poly_power)
    if preset.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"Invalid schedule {preset.schedule!r}. Only step, poly and constant are supported.")


def prepare(cfg: TrialConfig) -> tuple[Task, Preset, Path]:
    """Task, preset with overrides, and the data root (the synthetic stand-in generated once when none is given)."""
    task = get_task(cfg.task)
    if cfg.preset not in task.presets:
        raise ValueError(f"Unknown preset {cfg.preset!r} for {cfg.task}. Known presets: {', '.join(task.presets)}.")
    preset = task.presets[cfg.preset].updated(**cfg.overrides)
    if convs.parse_variant(cfg.variant).base not in task.variants:  # a spec: a name, NAME:OPTIONS or an alias
        raise ValueError(f"Task {cfg.task} does not support variant {cfg.variant!r}; it supports {task.variants}.")
    if cfg.data_root:
        root = Path(cfg.data_root)
        task.check_layout(root)
    else:
        root = ensure_synthetic(task, preset, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    return task, preset, root


def variant_options(cfg: TrialConfig, preset: Preset) -> dict[str, Any]:
    """The trial's `convs.convert` options, plus `start=preset.variant_start` where the variant accepts a start
    and neither the trial's options nor its spec (`edge:start=copy`) set one."""
    options = dict(cfg.variant_options)
    if start_is_open(cfg.variant):
        options.setdefault("start", preset.variant_start)
    return options


class MaskInput(nn.Module):
    """`forward(images, masks)` for a task whose inputs carry validity masks (`Task.takes_masks`).

    Mask-aware layers (partial, gated, affine) get the masks through `convs.Masked`; a model without any (zero,
    edge) sees the pixels only, so its occluded pixels are plain pixels. Convert first, then wrap.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        masked = convs.Masked(model)
        self.mask_aware = masked.mask_aware
        self.net = masked if self.mask_aware else model

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> Any:
        return self.net(images, masks) if self.mask_aware else self.net(images)


def to_device(inputs: Any, device: torch.device) -> Any:
    """A tensor, or a tuple/list of tensors (a task's several inputs), moved to `device`."""
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(x, device) for x in inputs)
    return inputs.to(device, non_blocking=True)


def forward(net: nn.Module, inputs: Any) -> Any:
    """`net(inputs)`, or `net(*inputs)` for a task whose batches carry several inputs (images and masks)."""
    return net(*inputs) if isinstance(inputs, tuple | list) else net(inputs)


def set_epoch(loader: Any, epoch: int) -> None:
    """Give the loader's sampler (or batch sampler) the epoch, for a different, seeded order every epoch."""
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def evaluates(epoch: int, preset: Preset) -> bool:
    """Whether the loop evaluates after `epoch` (0-based): every `preset.eval_every` epochs and after the last."""
    return (epoch + 1) % preset.eval_every == 0 or epoch == preset.epochs - 1


def broadcast_buffers(model: nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm running statistics), before an evaluation they share.

    DDP keeps the parameters equal and sends rank 0's buffers at the start of each forward, but each worker's
    forward then updates them with its own batch: after an epoch's last step every worker holds other running
    statistics. Evaluated by all, the model must be rank 0's, the one checkpointed; the next forward would
    overwrite them with rank 0's anyway, so training is unchanged.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def train_one_epoch(
    model: nn.Module,
    task: Task,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    preset: Preset,
    epoch: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One pass over the (sharded) training loader; returns the mean loss over all workers' batches.

    Runs in `preset.amp` precision; `scaler` scales the loss for fp16 (a disabled scaler, or None, changes nothing).
    The losses are read on the host every `LOSS_READ_EVERY` batches and at the end of the epoch, not after each
    batch (a GPU never waits for the loop). Raises `DivergedError` naming the first batch whose loss is NaN or
    infinite, at the read that sees it: a diverged trial trains at most `LOSS_READ_EVERY - 1` batches more, on
    weights it then throws away (its last checkpoint is from the last good epoch). Under DDP each batch's loss is
    averaged over the workers at the read (the one collective the loss log needs anyway), so every worker stops
    at the same batch: one that stopped alone would leave the others waiting in the next gradient all-reduce.
    """
    model.train()
    if scaler is None:
        scaler = torch.amp.GradScaler(device.type, enabled=False)
    set_epoch(loader, epoch)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    values: list[float] = []
    pending: list[torch.Tensor] = []  # losses of the batches since the last read, on the device
    for inputs, targets in itertools.islice(loader, preset.max_batches):
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        with autocast(device, preset.amp):
            loss = task.loss(forward(model, inputs), targets, preset)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        pending.append(loss.detach().float())
        if len(pending) == LOSS_READ_EVERY:
            values += read_losses(pending, len(values), epoch, optimizer, world_size)
            pending = []
    if pending:
        values += read_losses(pending, len(values), epoch, optimizer, world_size)
    return math.fsum(values) / max(len(values), 1)


def read_losses(
    losses: list[torch.Tensor], first: int, epoch: int, optimizer: torch.optim.Optimizer, world_size: int
) -> list[float]:
    """The batch losses `losses` (of batches `first`, `first + 1`, ...) on the host, averaged over the workers
    under DDP: one collective and one device-to-host copy for all of them. Raises `DivergedError` naming the first
    that is not finite."""
    stacked = torch.stack(losses)
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    values = stacked.tolist()
    for batch, value in enumerate(values, start=first):
        if not math.isfinite(value):
            lr = optimizer.param_groups[0]["lr"]
            raise DivergedError(
                f"diverged: train/loss is {value} at epoch {epoch} batch {batch} (lr {lr:g}); the trial stopped. "
                "Lower the learning rate (the preset's lr, or --search optuna --space lr=...), or use --amp bf16/off "
                "if fp16 overflowed"
            )
    return values


def train_batches(loader: DataLoader, preset: Preset) -> int:
    """Batches `train_one_epoch` runs on this worker: the loader's length, capped by `preset.max_batches`."""
    return min(len(loader), preset.max_batches or len(loader))


def log_epoch_line(
    cfg: TrialConfig, task: Task, metrics: dict[str, float], *, epochs: int, images_per_s: float, left_s: float
) -> None:
    """One INFO line per epoch: who (task, variant, seed), where (epoch k/N), how well and how fast, time left."""
    headline = f"{metrics[task.metric]:.2f}" if task.metric in metrics else "(not evaluated this epoch)"
    logger.info(
        "%s %s seed %d: epoch %d/%d  train/loss %.4f  %s %s  %.0f images/s  about %s left",
        task.name,
        cfg.variant,
        cfg.seed,
        metrics["epoch"] + 1,
        epochs,
        metrics["train/loss"],
        task.metric,
        headline,
        images_per_s,
        datetime.timedelta(seconds=round(left_s)),
    )


def log_missing_epochs(tracker: Tracker, history: list[dict[str, float]], task: Task) -> None:
    """Log the epochs of a resumed trial's history that its tracker lacks (the worker died before logging them)."""
    logged = tracker.logged_epochs("train/loss")  # every epoch has it, evaluated or not (`preset.eval_every`)
    for i, entry in enumerate(history):
        if int(entry["epoch"]) not in logged:
            tracker.log_epoch({**entry, **summarize(history[: i + 1], task.table_metrics)}, int(entry["epoch"]))


def best_epoch(history: list[dict[str, float]], metric: str) -> int:
    """The index in `history` of the best `metric` (the earliest on ties; a NaN, or an epoch without it, never
    wins); `history` must hold at least one epoch with `metric`."""
    values = [h.get(metric, math.nan) for h in history]
    return max(range(len(values)), key=lambda i: -math.inf if math.isnan(values[i]) else values[i])


def summarize(history: list[dict[str, float]], metrics: tuple[str, ...]) -> dict[str, float]:
    """The thesis' two per-run numbers for each metric: its value at the best epoch, and its mean of the last 5.

    The best epoch is the one of the headline `metrics[0]` for every metric: one model per run, evaluated in
    each mode (thesis table 4.4: whole image, tiles, overlapping tiles of the same model), not each mode's own
    maximum over epochs. Only evaluated epochs count (`preset.eval_every`): the last 5 are the last 5
    evaluations. Empty when no epoch has been evaluated yet.
    """
    history = [h for h in history if metrics[0] in h]
    if not history:
        return {}
    best = history[best_epoch(history, metrics[0])]
    summary = {}
    for metric in metrics:
        name = summary_name(metric)
        summary[f"best/{name}"] = best[metric]
        summary[f"last5/{name}"] = statistics.fmean(h[metric] for h in history[-5:])
    return summary


def diverged(
    cfg: TrialConfig,
    tracker: Tracker | None,
    report: Callable[[dict[str, Any], Path | None], None] | None,
    epoch: int,
    failure: str,
    lr: float,
) -> None:
    """End a diverged trial: log the failure, and report it once more (no checkpoint: the last one holds the last
    good epoch) so that the sweep marks the trial failed instead of retrying what would diverge again."""
    logger.error("%s %s seed %d: %s", cfg.task, cfg.variant, cfg.seed, failure)
    if tracker is not None:
        tracker.log_epoch({"train/loss": math.nan, "lr": lr}, epoch)
        tracker.log_failure(failure)
    if report is not None:
        report({"epoch": epoch, "train/loss": math.nan, "lr": lr, FAILURE_KEY: failure}, None)


def save_checkpoint(state: dict[str, Any], folder: Path, name: str = CHECKPOINT_FILE) -> Path:
    """Write atomically: a crash mid-write leaves the previous file, never a truncated one under the real name."""
    path = folder / name
    tmp = folder / f".{name}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def train(
    cfg: TrialConfig,
    *,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    report: Callable[[dict[str, float], Path | None], None] | None = None,
    resume: dict[str, Any] | None = None,
    tracker: Tracker | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Train one trial and return its summary; `report(metrics, checkpoint_dir)` is called once per epoch.

    Every worker must call `report` equally often (Ray Train's rule); only rank 0 evaluates, checkpoints and
    logs, except that every worker calls the evaluation of a task with `collective_eval` (each evaluates its
    shard of the split; only rank 0's result is used). `resume` is the state of the last checkpoint, to continue after a
    crash. `workdir` holds the checkpoints being written (a temporary folder when None).
    """
    started = time.perf_counter()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep_freed_memory()  # before the loaders start: their worker processes inherit it
    seed_everything(cfg.seed)
    task, preset, root = prepare(cfg)
    autocast(device, preset.amp)  # refuses amp="fp16" on a CPU now, before any data is read
    train_loader, val_loader = task.build_loaders(
        root, preset, rank=rank, world_size=world_size, seed=cfg.seed, workers=cfg.loader_workers
    )
    model = task.build_model(preset, num_classes=task.num_classes(root))
    initialize(model, task, cfg.variant, variant_options(cfg, preset), parse_init(cfg.init), cfg.tracking_uri)
    if preset.sync_bn and world_size > 1 and device.type == "cuda":  # PyTorch's SyncBatchNorm runs on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    # What the task calls: the model, or for a task with masks in its inputs the model taking (images, masks).
    eval_net = MaskInput(model) if getattr(task, "takes_masks", False) else model
    net = eval_net
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(eval_net, device_ids=device_ids)
    optimizer = build_optimizer(model, preset)
    scheduler = build_scheduler(optimizer, preset)
    scaler = torch.amp.GradScaler(device.type, enabled=preset.amp == "fp16")  # fp16 underflows unscaled
    history: list[dict[str, float]] = []
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):  # absent from older checkpoints, empty when the scaler is off
            scaler.load_state_dict(resume["scaler"])
        history, start = resume["history"], resume["epoch"] + 1
        random.setstate(resume["rng"]["python"])
        np.random.set_state(resume["rng"]["numpy"])
        torch.set_rng_state(resume["rng"]["torch"])
        if device.type == "cuda" and "cuda" in resume["rng"]:  # absent from older and from CPU checkpoints
            torch.cuda.set_rng_state(resume["rng"]["cuda"], device)

    own = tempfile.TemporaryDirectory() if workdir is None else None
    workdir = Path(own.name) if own else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    best_value = max((h[task.metric] for h in history if task.metric in h), default=float("-inf"))
    if rank == 0 and tracker is not None and history:
        log_missing_epochs(tracker, history, task)
    # Epochs the run already holds: a worker that outlived its dead controller may have logged an epoch that was
    # never checkpointed, which this retry trains again; logged once, by whichever got there first.
    logged = tracker.logged_epochs("train/loss") if rank == 0 and tracker is not None else set()
    images_per_epoch = train_batches(train_loader, preset) * preset.batch_size  # global batches; drop_last: all full
    # Every rank calls a collective evaluation, at the same epochs (`evaluates` is deterministic), else rank 0 alone.
    collective_eval = getattr(task, "collective_eval", False)
    loop_start = time.perf_counter()
    try:
        for epoch in range(start, preset.epochs):
            epoch_start = time.perf_counter()
            try:
                loss = train_one_epoch(net, task, train_loader, optimizer, device, preset, epoch, scaler=scaler)
            except DivergedError as e:
                failure = str(e)
                diverged(cfg, tracker if rank == 0 else None, report, epoch, failure, scheduler.get_last_lr()[0])
                return {"history": history, FAILURE_KEY: failure}
            train_s = time.perf_counter() - epoch_start
            scheduler.step()
            metrics: dict[str, float] = {"epoch": epoch, "train/loss": loss, "lr": scheduler.get_last_lr()[0]}
            metrics["time/epoch_s"] = time.perf_counter() - epoch_start
            checkpoint_dir = None
            evaluation = None
            if evaluates(epoch, preset) and (rank == 0 or collective_eval):
                if collective_eval and world_size > 1:
                    broadcast_buffers(eval_net)
                evaluation = task.evaluate(eval_net, val_loader, device, preset)
            if rank == 0:
                if evaluation is not None:
                    metrics.update({k: float(v) for k, v in evaluation.scalars.items()})
                history.append(dict(metrics))
                metrics.update(summarize(history, task.table_metrics))
                if evaluation is not None and metrics[task.metric] > best_value:
                    best_value = metrics[task.metric]
                    best = save_checkpoint(
                        {"model": model.state_dict(), "epoch": epoch, "metrics": metrics, "config": cfg.params()},
                        workdir,
                        "best.pt",
                    )
                    # Logged now, not at the end: a worker that crashes and resumes elsewhere keeps its best model.
                    if tracker is not None:
                        tracker.log_best(best, evaluation)
                checkpoint_dir = Path(tempfile.mkdtemp(prefix="ckpt-", dir=workdir))
                save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "rng": {
                            "python": random.getstate(),
                            "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state(),
                            # the GPU's own generator: dropout on the GPU draws from it
                            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                        },
                    },
                    checkpoint_dir,
                )
                per_epoch_s = (time.perf_counter() - loop_start) / (epoch + 1 - start)
                log_epoch_line(
                    cfg,
                    task,
                    metrics,
                    epochs=preset.epochs,
                    images_per_s=images_per_epoch / max(train_s, 1e-9),
                    left_s=per_epoch_s * (preset.epochs - epoch - 1),
                )
            metrics["time/loop_s"] = time.perf_counter() - started  # since this worker entered train()
            if report is not None:
                report(metrics, checkpoint_dir)
            # After the report, whose checkpoint holds this epoch: a trial killed before it redoes the epoch and
            # logs it then; one killed between the two logs it on resume (`log_missing_epochs`). Once either way.
            if rank == 0 and tracker is not None and epoch not in logged:
                tracker.log_epoch(metrics, epoch)
        summary = summarize(history, task.table_metrics) if rank == 0 and history else {}
        if rank == 0 and tracker is not None and summary:
            tracker.log_final(summary, ["train/loss", *task.table_metrics])
            # Training is over: the tracker may load the best weights into `model` and move it to the CPU.
            inputs, _ = next(iter(train_loader))
            tags = {"task": cfg.task, "variant": cfg.variant, "seed": str(cfg.seed), "preset": cfg.preset}
            tracker.log_model(eval_net, model, workdir / "best.pt", inputs, tags)
        return {"history": history, **summary}
    finally:
        if own is not None:
            own.cleanup()
