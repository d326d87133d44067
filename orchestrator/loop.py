"""The one training loop every task shares: seed, build, convert, train one epoch, evaluate, checkpoint, report.

Ray-free on purpose: `orchestrator.trial` runs it inside Ray Train workers, tests run it directly. Reads like
torchvision's reference trainers: `train_one_epoch`, `evaluate`, `train`.
"""

from __future__ import annotations

import itertools
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

import convs
from tasks import Preset, Task, default_cache_dir, ensure_synthetic, get_task

from .config import TrialConfig

CHECKPOINT_FILE = "checkpoint.pt"


class Tracker(Protocol):
    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None: ...
    def log_best(self, best_checkpoint: Path, extras: dict[str, Any]) -> None: ...
    def log_final(self, summary: dict[str, float], curves: list[str]) -> None: ...


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) for a reproducible trial."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, preset: Preset) -> torch.optim.Optimizer:
    if preset.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=preset.lr, momentum=preset.momentum, weight_decay=preset.weight_decay
        )
    if preset.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=preset.lr, betas=(preset.momentum, 0.999), weight_decay=preset.weight_decay
        )
    raise ValueError(f"Invalid optimizer {preset.optimizer!r}. Only sgd and adam are supported.")


def build_scheduler(optimizer: torch.optim.Optimizer, preset: Preset) -> torch.optim.lr_scheduler.LRScheduler:
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
    if cfg.variant not in task.variants:
        raise ValueError(f"Task {cfg.task} does not support variant {cfg.variant!r}; it supports {task.variants}.")
    if cfg.data_root:
        root = Path(cfg.data_root)
        task.check_layout(root)
    else:
        root = ensure_synthetic(task, preset, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    return task, preset, root


def train_one_epoch(model, task, loader, optimizer, device, preset, epoch: int) -> float:
    """One pass over the (sharded) training loader; returns the mean loss over this worker's batches."""
    model.train()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)  # a different, seeded order every epoch
    total, count = 0.0, 0
    for images, targets in itertools.islice(loader, preset.max_batches):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = task.loss(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        count += 1
    return total / max(count, 1)


def summarize(history: list[dict[str, float]], metrics: tuple[str, ...]) -> dict[str, float]:
    """The thesis' two per-run numbers for each metric: best value over all epochs, and mean of the last 5 epochs."""
    summary = {}
    for metric in metrics:
        values = [h[metric] for h in history]
        name = metric.split("/", 1)[-1]
        summary.update({f"best/{name}": max(values), f"last5/{name}": statistics.fmean(values[-5:])})
    return summary


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
    logs. `resume` is the state of the last checkpoint, to continue after a crash. `workdir` holds the
    checkpoints being written (a temporary folder when None).
    """
    started = time.perf_counter()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(cfg.seed)
    task, preset, root = prepare(cfg)
    train_loader, val_loader = task.build_loaders(
        root, preset, rank=rank, world_size=world_size, seed=cfg.seed, workers=cfg.loader_workers
    )
    model = task.build_model(preset, num_classes=task.num_classes(root))
    convs.convert(model, cfg.variant, **cfg.variant_options)
    if preset.sync_bn and world_size > 1 and device.type == "cuda":  # PyTorch's SyncBatchNorm runs on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    net = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, preset)
    scheduler = build_scheduler(optimizer, preset)
    history: list[dict[str, float]] = []
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        history, start = resume["history"], resume["epoch"] + 1
        random.setstate(resume["rng"]["python"])
        np.random.set_state(resume["rng"]["numpy"])
        torch.set_rng_state(resume["rng"]["torch"])

    own = tempfile.TemporaryDirectory() if workdir is None else None
    workdir = Path(own.name) if own else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    best_value = max((h[task.metric] for h in history), default=float("-inf"))
    try:
        for epoch in range(start, preset.epochs):
            epoch_start = time.perf_counter()
            loss = train_one_epoch(net, task, train_loader, optimizer, device, preset, epoch)
            scheduler.step()
            if world_size > 1:
                mean = torch.tensor([loss], device=device)
                dist.all_reduce(mean)
                loss = mean.item() / world_size
            metrics: dict[str, float] = {"epoch": epoch, "train/loss": loss, "lr": scheduler.get_last_lr()[0]}
            metrics["time/epoch_s"] = time.perf_counter() - epoch_start
            checkpoint_dir = None
            if rank == 0:
                result = task.evaluate(model, val_loader, device, preset)
                metrics.update({k: float(v) for k, v in result.items() if isinstance(v, int | float)})
                history.append(dict(metrics))
                metrics.update(summarize(history, task.table_metrics))
                if metrics[task.metric] > best_value:
                    best_value = metrics[task.metric]
                    best = save_checkpoint(
                        {"model": model.state_dict(), "epoch": epoch, "metrics": metrics, "config": cfg.params()},
                        workdir,
                        "best.pt",
                    )
                    # Logged now, not at the end: a worker that crashes and resumes elsewhere keeps its best model.
                    if tracker is not None:
                        extras = {k: v for k, v in result.items() if not isinstance(v, int | float)}
                        tracker.log_best(best, extras)
                if tracker is not None:
                    tracker.log_epoch(metrics, epoch)
                checkpoint_dir = Path(tempfile.mkdtemp(prefix="ckpt-", dir=workdir))
                save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "rng": {
                            "python": random.getstate(),
                            "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state(),
                        },
                    },
                    checkpoint_dir,
                )
            metrics["time/loop_s"] = time.perf_counter() - started  # since this worker entered train()
            if report is not None:
                report(metrics, checkpoint_dir)
        summary = summarize(history, task.table_metrics) if rank == 0 and history else {}
        if rank == 0 and tracker is not None and summary:
            tracker.log_final(summary, ["train/loss", *task.table_metrics])
        return {"history": history, **summary}
    finally:
        if own is not None:
            own.cleanup()
