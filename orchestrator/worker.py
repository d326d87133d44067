"""The function every Ray Train worker runs: resume from the trial's last checkpoint, train, report each epoch
(`worker_loop`); and its twin for Train's local mode, a single-worker trial in its Tune function (`local_loop`).

A module of its own, lean on purpose: Ray pickles `worker_loop` by reference, so each worker process imports this
module and what it imports, afresh for every trial. It needs the training loop and Ray Train, not Ray Tune, the
sweep's command line or (outside rank 0) MLflow; `tasks.get_task` imports only the trial's own task.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from .cli import setup_logging
from .config import TrialConfig
from .loop import CHECKPOINT_FILE, train


def worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: resume from the last checkpoint if any, train, report every epoch."""
    context = ray.train.get_context()

    def save(metrics: dict[str, float], folder: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)  # uploads synchronously to the storage

    device = ray.train.torch.get_device()
    _run(config, ray.train.get_checkpoint(), save, device, context.get_world_rank(), context.get_world_size())


def local_loop(config: dict[str, Any]) -> None:
    """A single-worker trial on a local Ray: runs in Ray Train's local mode (`ScalingConfig(num_workers=0)`), in the
    Tune function's own process, where Train keeps reports and checkpoints in memory only. So this trial resumes from
    and reports to Ray Tune: its checkpoints are Tune's (in the trial's folder), its retries Tune's FailureConfig."""
    import ray.tune  # already loaded: this runs in the Tune function's process

    def save(metrics: dict[str, float], folder: Path | None) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(str(folder)) if folder else None
        ray.tune.report(metrics, checkpoint=checkpoint)  # persists synchronously into the trial's folder

    # Train's local mode picks a GPU whenever torch sees one; the trial's own request decides here (Ray tells this
    # process its GPUs): a CPU trial on a GPU machine stays on the CPU, as a Train worker without a GPU does.
    device = ray.train.torch.get_device() if ray.get_gpu_ids() else torch.device("cpu")
    try:
        _run(config, ray.tune.get_checkpoint(), save, device, 0, 1)
    finally:
        # Tune reuses this process for the slot's next trial: free this trial's model, optimizer and loaders now,
        # and hand the GPU memory that torch's allocator still caches back to the device.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run(config: dict[str, Any], checkpoint, save, device: torch.device, rank: int, world_size: int) -> None:
    """Resume from `checkpoint` (None: from the start), train, and `save` each epoch's report (metrics and the
    epoch's checkpoint, if any) synchronously; the local copy of the checkpoint is deleted once saved."""
    setup_logging()  # rank 0's per-epoch lines: in Ray's log files, on the terminal with the sweep's --verbose
    cfg = TrialConfig.from_dict(config)
    resume = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    tracker = None
    if rank == 0 and cfg.tracking_uri and cfg.mlflow_run_id:
        from . import tracking  # MLflow: rank 0 logs, the other workers never import it

        tracker = tracking.MlflowTracker(cfg.tracking_uri, cfg.mlflow_run_id)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        save(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    with tempfile.TemporaryDirectory(prefix="trial-") as workdir:
        train(
            cfg,
            device=device,
            rank=rank,
            world_size=world_size,
            report=report,
            resume=resume,
            tracker=tracker,
            workdir=Path(workdir),
        )
