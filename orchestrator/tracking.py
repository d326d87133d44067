"""MLflow bookkeeping: one experiment per task, a parent run per sweep, one nested run per trial, and each trial's
best model as an MLflow model (a LoggedModel of its run, PyTorch flavour).

Everything goes through `MlflowClient` with an explicit tracking URI (no global `mlflow.set_tracking_uri`), so
the driver, Tune functions and Ray Train workers each talk to the same store without shared state.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.metadata
import io
import logging
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import mlflow.pytorch
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, Run
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from torch import nn

from .cli import temporary_env

if TYPE_CHECKING:
    from tasks import ClassTable, ConfusionMatrix, Evaluation

SWEEP_TAG, TRIAL_TAG = "bench.sweep", "bench.trial_id"
FAILURE_TAG = "bench.failure"  # why a trial stopped early (a diverged loss), beside its FAILED status
MODEL_ERROR_TAG = "bench.model_error"  # why a trial that trained has no MLflow model (its metrics stand)
PROJECT = "invalid-pixels-bench"  # the distribution whose classes a logged model pickles (converted layers, tasks)

logger = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


def check_tracking_uri(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when a tracking server does not answer (instead of retrying for minutes)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow server at {uri} answered /health with HTTP {response.status}")
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({e}); start one with "
                "`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1` or pass another "
                "--tracking-uri (the default is a local SQLite store, sqlite:///mlflow.db)"
            ) from None
    elif parsed.scheme == "sqlite":
        folder = Path(parsed.path.removeprefix("/")).parent if uri.startswith("sqlite:///") else Path(".")
        if not folder.resolve().exists():
            raise TrackingError(f"the folder of the SQLite tracking store {uri} does not exist: {folder.resolve()}")
    elif parsed.scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {uri!r} is a plain file store, which MLflow 3.17 refuses; use sqlite:///mlflow.db "
            "or a server URL"
        )


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if missing (in the driver, before trials start: creation races), with
    its artifacts at `artifact_location` (None: the store's or server's default, e.g. `mlflow server
    --artifacts-destination s3://...`).

    MLflow cannot change an existing experiment's artifact location: `TrackingError` when `artifact_location` is
    given and the experiment keeps its artifacts elsewhere (silently logging there would put a sweep's checkpoints
    where the user did not ask, perhaps on a disk the cluster's nodes do not share).
    """
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location or beside_store(uri, name))
    if artifact_location and experiment.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        raise TrackingError(
            f"--artifact-location {artifact_location}: the MLflow experiment {name!r} in {uri} already keeps its "
            f"artifacts at {experiment.artifact_location}, and MLflow cannot move an experiment's artifacts. Drop "
            "--artifact-location to log there, use another tracking store (--tracking-uri), or delete the experiment "
            f"(`mlflow experiments delete`, then `mlflow gc`) to recreate it at {artifact_location}"
        )
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def beside_store(uri: str, name: str) -> str | None:
    """The default artifact location of a new experiment in a SQLite store: `mlruns/<name>` in the database's folder.

    MLflow's own default is `./mlruns` in the working directory of whichever process creates the experiment, so two
    stores made from one folder (two sweeps' `--tracking-uri`, or a test's) would mix their artifacts there. None for
    a server, which decides itself (`mlflow server --artifacts-destination`).
    """
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns" / name)


def find_or_create_run(
    uri: str, experiment_id: str, *, tags: dict[str, str], key: str, name: str, parent: str | None = None
) -> str:
    """The run tagged `key`=tags[key] in the experiment, or a new one: resumes and retries never duplicate a run.

    Only a run at the same level counts: a sweep's trial runs carry its tag too, but have a parent.
    """
    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{tags[key]}'")
    runs = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent]
    if runs:
        run_id = runs[0].info.run_id
        if runs[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {**tags, MLFLOW_RUN_NAME: name}
    if parent:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent
    return client.create_run(experiment_id, tags=all_tags, run_name=name).info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    client = MlflowClient(uri)
    existing = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    if new:
        client.log_batch(run_id, params=new)


def get_tag(uri: str, run_id: str, key: str) -> str | None:
    """The run's tag `key`, or None when it has none."""
    return MlflowClient(uri).get_run(run_id).data.tags.get(key)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status=status)


@contextlib.contextmanager
def without_progress_bars() -> Iterator[None]:
    """No MLflow "Downloading artifacts" progress bar on the terminal while inside (MLflow reads the switch at each
    download): the report reads a file per trial, and every trial loads its MLflow model back to check it."""
    with temporary_env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
        yield


def search_all_runs(
    client: MlflowClient, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None
) -> list[Run]:
    """Every run matching, page after page (a sweep on a cluster can hold more than one page of trials)."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, max_results=1000, order_by=order_by, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def end_running_trials(
    uri: str, experiment_id: str, sweep: str, status: str, failed: Collection[str] = ()
) -> list[str]:
    """Give every trial run of `sweep` still RUNNING a terminal status: FAILED when its trial id is in `failed`,
    else `status` (KILLED after Ctrl-C); return their ids."""
    client = MlflowClient(uri)
    runs = search_all_runs(
        client,
        [experiment_id],
        f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{TRIAL_TAG}` != '' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status="FAILED" if run.data.tags[TRIAL_TAG] in failed else status)
    return [run.info.run_id for run in runs]


def log_text(uri: str, run_id: str, text: str, path: str) -> None:
    MlflowClient(uri).log_text(run_id, text, path)


@functools.cache
def _pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend (Ray workers have no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_csv(confusion: ConfusionMatrix) -> str:
    """The confusion matrix as CSV: a `true \\ predicted` header of class names, then one row of counts per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true \\ predicted", *confusion.classes])
    for name, row in zip(confusion.classes, confusion.counts.tolist(), strict=True):
        writer.writerow([name, *row])
    return buffer.getvalue()


def table_csv(table: ClassTable) -> str:
    """A per-class table as CSV: `class` and the column names, then one row per class (`table.digits` decimals)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["class", *table.columns])
    for i, name in enumerate(table.classes):
        writer.writerow([name, *(f"{values[i]:.{table.digits}f}" for values in table.columns.values())])
    return buffer.getvalue()


class ModelMismatchError(RuntimeError):
    """A logged model that would not be the trained one."""


class PackedInputs(nn.Module):
    """A model of several inputs (images, masks) that also takes them as one tensor, concatenated along dim 1.

    MLflow's PyTorch pyfunc (`mlflow.pyfunc.load_model`, `mlflow models serve`) calls the model with exactly one
    tensor (MLflow 3.17 refuses a dict or list input), so a two-input model is served with its inputs packed:
    `channels` says how to split them again. Called with all its inputs, it is the model as it is.
    """

    def __init__(self, net: nn.Module, channels: list[int]) -> None:
        super().__init__()
        self.net, self.channels = net, list(channels)

    def forward(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) == 1 and len(self.channels) > 1:
            inputs = torch.split(inputs[0], self.channels, dim=1)
        return self.net(*inputs)


def tensor_spec(tensor: torch.Tensor) -> TensorSpec:
    """The signature of a batch: its batch dimension variable and, for an image batch (N, C, H, W), its height and
    width too (a convolutional model takes other sizes than its training crops: whole images, an evaluation size)."""
    array = tensor.detach().cpu().numpy()
    shape = (-1, array.shape[1], -1, -1) if array.ndim == 4 else (-1, *array.shape[1:])
    return TensorSpec(array.dtype, shape)


def model_requirements() -> list[str]:
    """What loading a logged model needs, pinned: torch (without a local build label such as +cu130, unknown to
    PyPI), cloudpickle (MLflow pickles the model with it) and this project (the pickled classes: converted layers,
    task models). Given explicitly, MLflow skips its requirement inference, a subprocess that loads the model."""
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"cloudpickle=={importlib.metadata.version('cloudpickle')}",
    ]
    try:
        requirements.append(f"{PROJECT}=={importlib.metadata.version(PROJECT)}")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        pass
    return requirements


def check_reloaded(reloaded: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
    """`ModelMismatchError` unless the model as MLflow loads it back gives `output` on `inputs`.

    A module whose state does not survive pickling is logged silently wrong otherwise: `convs.Masked` keeps its
    mask-aware layers by id(), so its copy runs those layers without the mask.
    """
    with torch.no_grad():
        again = reloaded(*inputs)
    try:
        torch.testing.assert_close(again, output)
    except AssertionError as e:
        raise ModelMismatchError(
            "the model as MLflow loads it back does not give the trained model's output on the example batch "
            f"(a module whose state does not survive pickling?): {str(e).strip().splitlines()[0]}"
        ) from None


@contextlib.contextmanager
def _quiet(log: logging.Logger, text: str) -> Iterator[None]:
    """Drop `log`'s records that contain `text` for the duration (MLflow warns on every pickled model)."""

    def drop(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class MlflowTracker:
    """Per-trial logging from rank 0 of the Ray Train run: per-epoch metrics, the best epoch, the final summary,
    the best model.

    Task-agnostic: whatever confusion matrix and per-class tables a task's `Evaluation` holds are drawn the same way.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.client, self.run_id = MlflowClient(uri), run_id

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """Every metric but `epoch` itself, at step `epoch`."""
        timestamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), timestamp, epoch) for k, v in metrics.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=batch)

    def logged_epochs(self, metric: str) -> set[int]:
        """The steps (epochs) at which `metric` is logged in this run."""
        return {m.step for m in self.client.get_metric_history(self.run_id, metric)}

    def log_failure(self, reason: str) -> None:
        """Why the trial stopped early, as the run's `bench.failure` tag (the trial function ends it FAILED)."""
        self.client.set_tag(self.run_id, FAILURE_TAG, reason)

    def log_best(self, best_checkpoint: Path, evaluation: Evaluation) -> None:
        """The best epoch so far: its checkpoint (`checkpoints/best.pt`), confusion matrix (`confusion_matrix.csv`,
        `.png`) and per-class tables (`<name>.csv`, `.png`), each replacing the previous best's."""
        self.client.log_artifact(self.run_id, str(best_checkpoint), "checkpoints")
        if evaluation.confusion is not None:
            self.client.log_text(self.run_id, confusion_csv(evaluation.confusion), "confusion_matrix.csv")
            self._log_confusion_png(evaluation.confusion)
        for table in evaluation.tables:
            self.client.log_text(self.run_id, table_csv(table), f"{table.name}.csv")
            self._log_table_png(table)
        logger.debug("run %s: best checkpoint and evaluation artifacts logged", self.run_id)

    def log_final(self, summary: dict[str, float], curves: list[str]) -> None:
        """The per-run numbers (best, last-5 mean) and the training curves of the metrics in `curves`."""
        self.client.log_dict(self.run_id, summary, "summary.json")
        self._log_curves(curves)

    def log_model(
        self, net: nn.Module, weights: nn.Module, best_checkpoint: Path, inputs: Any, tags: dict[str, str]
    ) -> str | None:
        """The best epoch's model as an MLflow model (PyTorch flavour, a LoggedModel of this run); its id, or None.

        `best_checkpoint`'s "model" state (the run's logged copy when the file is gone: a trial resumed in another
        worker) loads into `weights`, the module inside `net` that the loop trains; `net` (what the task calls, e.g.
        the model taking images and masks), in eval mode on the CPU, is what is logged: call this once training is
        over. `inputs`, a batch as the loader gives it (a tensor, or a tuple of the model's inputs), gives the
        signature through a real forward pass. `tags` (task, variant, seed...) become the model's, with the run's
        trial and sweep tags; its params are the run's. Weights only: no optimizer state.

        A failure is logged as a warning and as the run's `bench.model_error` tag, never raised: the trial's metrics
        stand without their model.
        """
        try:
            return self._log_model(net, weights, best_checkpoint, inputs, tags)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            logger.warning("run %s: the best model was not logged as an MLflow model: %s", self.run_id, reason)
            try:
                self.client.set_tag(self.run_id, MODEL_ERROR_TAG, reason[:5000])
            except Exception as tag_error:
                logger.warning("run %s: cannot set the %s tag either: %s", self.run_id, MODEL_ERROR_TAG, tag_error)
            return None

    def _log_model(
        self, net: nn.Module, weights: nn.Module, best_checkpoint: Path, inputs: Any, tags: dict[str, str]
    ) -> str:
        # Loading the model back (and the checkpoint, on a resumed trial) counts as downloading artifacts.
        with tempfile.TemporaryDirectory(prefix="best-model-") as tmp, without_progress_bars():
            if not best_checkpoint.is_file():
                best_checkpoint = Path(
                    self.client.download_artifacts(self.run_id, f"checkpoints/{best_checkpoint.name}", tmp)
                )
            best = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
            weights.load_state_dict(best["model"])
            net.to("cpu").eval()
            inputs = tuple(x[:2].cpu() for x in (inputs if isinstance(inputs, tuple | list) else (inputs,)))
            with torch.no_grad():
                output = net(*inputs)
            logged = net if len(inputs) == 1 else PackedInputs(net, [x.shape[1] for x in inputs])
            signature = ModelSignature(
                Schema([tensor_spec(torch.cat(inputs, dim=1))]),
                Schema([tensor_spec(output)]) if isinstance(output, torch.Tensor) else None,
            )
            run = self.client.get_run(self.run_id)
            model_tags = {k: run.data.tags[k] for k in (TRIAL_TAG, SWEEP_TAG) if k in run.data.tags}
            model = self.client.create_logged_model(
                run.info.experiment_id,
                # A name may not hold / : . % or quotes; variant specs have colons (gated:norm=inside).
                name=re.sub(r"[/:.%\"']", "_", run.data.tags.get(MLFLOW_RUN_NAME) or "best"),
                source_run_id=self.run_id,
                tags={**model_tags, **{k: str(v) for k, v in tags.items()}},
                params=run.data.params,
            )
            try:
                # What `mlflow.pytorch.log_model` does, through this tracker's client rather than MLflow's global
                # tracking URI and active run. Pickled, not MLflow's default pt2 (torch.export): an exported graph
                # is fixed to the example's image size and takes seconds; the pickle is the model itself.
                metadata = {"packed_inputs": logged.channels} if isinstance(logged, PackedInputs) else None
                local = Path(tmp) / "model"
                with _quiet(logging.getLogger("mlflow.pytorch"), "Pickle or CloudPickle"):  # see above why
                    mlflow.pytorch.save_model(
                        logged,
                        str(local),
                        mlflow_model=Model(
                            artifact_path=model.artifact_location,
                            model_uuid=model.model_id,
                            run_id=self.run_id,
                            model_id=model.model_id,
                        ),
                        signature=signature,
                        metadata=metadata,
                        serialization_format="pickle",
                        pip_requirements=model_requirements(),
                    )
                check_reloaded(mlflow.pytorch.load_model(str(local)), inputs, output)
                self.client.log_model_artifacts(model.model_id, str(local))
                epoch = int(best.get("epoch", 0))
                self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=epoch)])
                self._link_metrics(model.model_id, epoch, run.data.metrics)
            except BaseException:
                self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
                raise
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        logger.debug("run %s: best model (epoch %d) logged as %s", self.run_id, epoch, model.model_id)
        return model.model_id

    def _link_metrics(self, model_id: str, epoch: int, keys: Iterable[str]) -> None:
        """The run's metrics at the best epoch, linked to the model (its page shows them; search_logged_models
        filters on them). Re-logged with their own timestamps, so the run's history gains no point."""
        linked = [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=self.run_id)
            for key in keys
            for m in self.client.get_metric_history(self.run_id, key)
            if m.step == epoch and m.model_id is None
        ]
        if linked:
            self.client.log_batch(self.run_id, metrics=linked)

    def _log_table_png(self, table: ClassTable) -> None:
        """A grouped bar chart: one group per class, one bar per column (NaN, e.g. an absent class: no bar)."""
        plt = _pyplot()
        names, columns = table.classes, list(table.columns)
        fig, ax = plt.subplots(figsize=(2 + 0.55 * len(names), 3.5))
        width = 0.8 / max(len(columns), 1)
        for k, column in enumerate(columns):
            values = np.nan_to_num(np.asarray(table.columns[column], dtype=float), nan=0.0)
            ax.bar(np.arange(len(names)) + (k - (len(columns) - 1) / 2) * width, values, width, label=column)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(table.ylabel)
        if table.ylim is not None:
            ax.set_ylim(*table.ylim)
        ax.legend(fontsize=8)
        fig.tight_layout()
        self.client.log_figure(self.run_id, fig, f"{table.name}.png")
        plt.close(fig)

    def _log_confusion_png(self, confusion: ConfusionMatrix) -> None:
        plt = _pyplot()
        names, counts = confusion.classes, confusion.counts.numpy()
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(names), 1 + 0.6 * len(names)))
        ax.imshow(counts, cmap="Blues")
        if len(names) <= 12:  # counts stay readable; with 19 classes the colours tell the story
            for (i, j), v in np.ndenumerate(counts):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.tight_layout()
        self.client.log_figure(self.run_id, fig, "confusion_matrix.png")
        plt.close(fig)

    def _log_curves(self, keys: list[str]) -> None:
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            points = sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
            ax.set_title(key)
            ax.set_xlabel("epoch")
        fig.tight_layout()
        self.client.log_figure(self.run_id, fig, "curves.png")
        plt.close(fig)
