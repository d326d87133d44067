"""Ray glue: the Tune function that runs one trial as a Ray Train TorchTrainer (the per-worker loop: `worker`).

Ray 2.60 (Train V2) no longer accepts `Tuner(TorchTrainer(...))`: Tune runs a plain function per trial, and that
function builds and fits a TorchTrainer whose `TuneReportCallback` forwards the workers' reports to Tune.

A single-worker trial on a local Ray needs none of what Train adds around a run (a controller, a worker group and a
placement-group cleaner, each a new process importing torch: 5-6 s per trial on a 2-core laptop): it runs in
Train's local mode (`ScalingConfig(num_workers=0)`), in the Tune function's own process, checkpointing to Tune
(`worker.local_loop`). Clusters and multi-worker trials keep Train's workers, whose runs survive a lost node.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any

import ray.exceptions
import ray.train
import ray.train.torch
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from . import tracking
from .config import SweepSettings
from .loop import FAILURE_KEY
from .worker import local_loop, worker_loop

logger = logging.getLogger(__name__)


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: find or open the trial's MLflow run, then fit a TorchTrainer named after the trial id."""
    sweep = SweepSettings.from_dict(config[SweepSettings.KEY])
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = sweep.trial_config(config)
    variant, seed = cfg.variant, cfg.seed
    run_id = tracking.find_or_create_run(
        sweep.tracking_uri,
        sweep.experiment_id,
        tags={tracking.TRIAL_TAG: trial_id, tracking.SWEEP_TAG: sweep.name, "variant": variant, "seed": str(seed)},
        key=tracking.TRIAL_TAG,
        name=f"{variant}-seed{seed}-{trial_id}",
        parent=sweep.parent_run_id,
    )
    cfg.mlflow_run_id = run_id
    tracking.log_params(sweep.tracking_uri, run_id, {**cfg.params(), "trial_id": trial_id})
    gpus = sweep.gpus_per_worker
    if sweep.in_function:
        trainer = ray.train.torch.TorchTrainer(
            local_loop,
            train_loop_config=asdict(cfg),
            scaling_config=ray.train.ScalingConfig(num_workers=0, use_gpu=gpus > 0),
            run_config=ray.train.RunConfig(name=f"train-{trial_id}"),
        )
        try:
            trainer.fit()
        except Exception:
            # The training's own error: the run says FAILED until Tune's retry (from the last checkpoint) opens it
            # again (`find_or_create_run`). Tune stopping the trial (Ctrl-C, the sweep's end) raises SystemExit in
            # this thread instead, and a killed process raises nothing: the run stays RUNNING, for the retry to
            # reopen or for the sweep's end to mark KILLED (or FAILED when Tune gave up on the trial).
            tracking.finish_run(sweep.tracking_uri, run_id, "FAILED")
            raise
        end_run(sweep, run_id)  # `DropFinishedCheckpoints` deletes the finished trial's Tune checkpoint
        return
    # Ray Train's controller polls its workers every 2 s by default; at 0.2 s a trial ends seconds sooner (the
    # controller process reads this when this function creates it).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if sweep.local:
        # Ray Train starts a preemption watcher actor per run (one more process per trial) that polls the nodes'
        # drain state; a local Ray is one machine that no cloud provider reclaims. Clusters keep it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Train's controller and worker metrics feed Ray's Prometheus export, which a local Ray without the
        # dashboard never serves.
        os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    trainer = ray.train.torch.TorchTrainer(
        worker_loop,
        train_loop_config=asdict(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sweep.workers_per_trial,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": sweep.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})},
        ),
        run_config=ray.train.RunConfig(
            # Derived from the trial id, never a timestamp: a restarted trial finds and resumes this run.
            name=f"train-{trial_id}",
            storage_path=sweep.train_storage,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=sweep.max_failures),
            # Only the latest checkpoint is needed to resume (Ray registers a new one before deleting the old),
            # and an edge or affine model with its optimizer state is several times the size of the plain one.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    try:
        result = trainer.fit()
    except ray.exceptions.RayActorError:
        # Train's controller died under this function: Tune is stopping the trial (Ctrl-C, or the end of the sweep
        # removing its placement group) or the node went away. Not a training failure: the run stays RUNNING, for
        # Tune's retry to reopen or for the sweep's end to mark KILLED (or FAILED when Tune reports the trial failed).
        raise
    except BaseException:
        tracking.finish_run(sweep.tracking_uri, run_id, "FAILED")
        raise
    if end_run(sweep, run_id):
        drop_resume_checkpoints(result)


def end_run(sweep: SweepSettings, run_id: str) -> bool:
    """End a trial's MLflow run after training returned: FINISHED, or FAILED for a diverged trial; True if finished.

    A diverged trial returns normally, its reason in its last report (read by the sweep's table) and in the run's
    failure tag (set by rank 0; Train's own result holds only the metrics of the last checkpoint): raising would make
    Tune restart it from its last checkpoint, to diverge again."""
    failed = tracking.get_tag(sweep.tracking_uri, run_id, tracking.FAILURE_TAG) is not None
    tracking.finish_run(sweep.tracking_uri, run_id, "FAILED" if failed else "FINISHED")
    return not failed


def drop_resume_checkpoints(result: ray.train.Result) -> None:
    """Delete a finished trial's resume checkpoint: Tune never runs a finished trial again, its best model is in
    MLflow, and the checkpoint (weights, optimizer moments, ...) is several times the model: most of a sweep's disk.
    A failed (diverged) trial keeps its checkpoint for a look at what went wrong; an unfinished one, to resume."""
    checkpoints = [checkpoint for checkpoint, _ in result.best_checkpoints or []]
    if result.checkpoint is not None:
        checkpoints.append(result.checkpoint)
    _delete(checkpoints)


def _delete(checkpoints: list[ray.train.Checkpoint]) -> None:
    for path, filesystem in {c.path: c.filesystem for c in checkpoints}.items():
        try:
            filesystem.delete_dir(path)
        except OSError as e:  # the trial is done and tracked; a checkpoint left behind only costs disk
            logger.warning("could not delete the finished trial's checkpoint %s (%s); delete it by hand", path, e)


class DropFinishedCheckpoints(ray.tune.Callback):
    """In the driver: delete the Tune checkpoint of a trial that trained in its Tune function (`local_loop`) once it
    finished, as `drop_resume_checkpoints` does with Train's (a Train-run trial reports no checkpoint to Tune).
    A diverged trial keeps its checkpoint, like a failed or unfinished one."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.checkpoint is not None and not trial.last_result.get(FAILURE_KEY):
            _delete([trial.checkpoint])
