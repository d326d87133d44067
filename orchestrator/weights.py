"""Where a trial's weights start (`--init`): from scratch, a checkpoint file, a trial of this project in MLflow, or
torchvision's pretrained weights from the local torch cache (never downloaded here).

The thesis trained every arm from scratch and named converting a pretrained plain model "a new possible research
direction"; its Hotels-50K "+" rows start from the same arm's ImageNet model. `--init` gives both:

- a plain source (`zero`, a raw state dict, torchvision weights) loads into the plain model, which is then
  converted to the trial's variant with new filters starting as copies (`start=copy`, unless the spec says
  otherwise), so the converted model starts from the source's function (partial changes border outputs by design);
- a source of the trial's own variant (a checkpoint of a `partial` trial for a `partial` trial) loads after the
  conversion, every tensor of the backbone.
Each task's `load_pretrained` maps names (a classifier's `fc` is left out of a segmentation or hotels model).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

import convs

logger = logging.getLogger(__name__)

SCRATCH = "scratch"
PLAIN = "zero"  # the variant of a plain model: a raw state dict, torchvision weights
FORMS = (
    "scratch (the default), a checkpoint file (a path), runs:/<run_id> (a trial of this project in MLflow: its "
    "best checkpoint) or torchvision:<WeightsEnum>.<NAME> (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1, read "
    "from the local torch cache)"
)
BEST_CHECKPOINT = "checkpoints/best.pt"  # where a trial's tracker logs its best model (tracking.MlflowTracker)


class InitError(ValueError):
    """An `--init` source that cannot be read, or that does not fit the trial."""


@dataclass(frozen=True)
class Init:
    """A parsed `--init` source."""

    spec: str  # as given, the trial's `init` param and table label
    kind: str  # scratch | file | run | torchvision
    target: str  # the path, the run id or the weights' name ("" for scratch)


def parse_init(spec: str) -> Init:
    """The source `spec` names, by its form alone (nothing is read; see `check_init`).

    Example:
        >>> parse_init("runs:/0a1b2c")
        Init(spec='runs:/0a1b2c', kind='run', target='0a1b2c')
        >>> parse_init("torchvision:ResNet18_Weights.IMAGENET1K_V1").kind
        'torchvision'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InitError(f"--init needs a source: {FORMS}")
    if spec == SCRATCH:
        return Init(spec, "scratch", "")
    if spec.startswith("runs:/"):
        run_id = spec.removeprefix("runs:/").strip("/")
        if not run_id or "/" in run_id:
            raise InitError(f"--init {spec!r}: expected runs:/<run_id> (a trial's run id, nothing after it)")
        return Init(spec, "run", run_id)
    if spec.startswith("torchvision:"):
        name = spec.removeprefix("torchvision:")
        if "." not in name:
            raise InitError(
                f"--init {spec!r}: expected torchvision:<WeightsEnum>.<NAME>, e.g. {FORMS.split('e.g. ')[1]}"
            )
        return Init(spec, "torchvision", name)
    return Init(spec, "file", spec)


def torchvision_file(name: str) -> Path:
    """Where torch keeps the file of torchvision's weights `name` (`torch.hub.get_dir()/checkpoints/`)."""
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise InitError(
            f"--init torchvision:{name}: torchvision has no such weights; names look like "
            "ResNet50_Weights.IMAGENET1K_V1 (see torchvision.models.list_models and get_model_weights)"
        ) from None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def check_init(init: Init, tracking_uri: str | None) -> None:
    """Refuse, before any trial starts, a source that is not there: a missing file, torchvision weights absent
    from the local cache (this bench downloads nothing at run time), an unknown MLflow run or one without a best
    checkpoint."""
    if init.kind == "file" and not Path(init.target).is_file():
        raise InitError(f"--init {init.spec!r}: no such checkpoint file. Expected {FORMS}.")
    if init.kind == "torchvision":
        path = torchvision_file(init.target)
        if not path.is_file():
            raise InitError(
                f"--init {init.spec}: the weights are not in the local torch cache ({path}). Fetch them once on a "
                'machine with internet, e.g. python -c "import torchvision; torchvision.models.get_weight('
                f"'{init.target}').get_state_dict()\", and copy {path.name} there (or set TORCH_HOME)"
            )
    if init.kind == "run":
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        try:
            client.get_run(init.target)
            listed = {a.path for a in client.list_artifacts(init.target, os.path.dirname(BEST_CHECKPOINT))}
        except MlflowException as e:
            raise InitError(f"--init {init.spec}: no such run in {tracking_uri} ({e.message})") from None
        if BEST_CHECKPOINT not in listed:
            raise InitError(
                f"--init {init.spec}: the run has no {BEST_CHECKPOINT}; expected a trial run of this project (a "
                "child of a sweep's run) that finished at least one evaluated epoch"
            )


def load_init(init: Init, tracking_uri: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, the variant spec of the model it belongs to: "zero" for a plain one) of a non-scratch source."""
    if init.kind == "scratch":
        raise InitError("scratch has no weights to load")
    if init.kind == "torchvision":
        check_init(init, tracking_uri)
        return torch.load(torchvision_file(init.target), map_location="cpu", weights_only=True), PLAIN
    if init.kind == "run":
        import mlflow.artifacts

        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=init.target, artifact_path=BEST_CHECKPOINT, dst_path=tmp, tracking_uri=tracking_uri
            )
            return _read_checkpoint(Path(path), init.spec)
    return _read_checkpoint(Path(init.target), init.spec)


def _read_checkpoint(path: Path, spec: str) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint of this project ({"model": ..., "config": {"variant": ...}}) or a raw state dict (plain)."""
    try:
        saved: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise InitError(
            f"--init {spec}: cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from None
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
        variant = (saved.get("config") or {}).get("variant", PLAIN)  # a resume checkpoint has no config: plain
        return saved["model"], variant
    if isinstance(saved, dict) and saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
        return saved, PLAIN
    raise InitError(
        f"--init {spec}: {path} holds neither a state dict nor a checkpoint of this project (a dict with 'model')"
    )


def same_variant(a: str, b: str) -> bool:
    """Whether two variant specs build the same layers (aliases resolved: gated_311 == gated:norm=inside)."""
    x, y = convs.parse_variant(a), convs.parse_variant(b)
    return (x.base, x.options, getattr(x.skip, "__name__", None)) == (
        y.base,
        y.options,
        getattr(y.skip, "__name__", None),
    )


def start_is_open(variant: str) -> bool:
    """Whether `variant` takes a `start` option its spec leaves unset (`edge`: yes; `edge:start=copy`, `partial`,
    `zero`: no), so that the caller may choose how its new filters start."""
    accepted = getattr(convs.get(variant), "convert_options", None)  # nn.Conv2d (zero) has none
    return accepted is not None and "start" in accepted() and "start" not in convs.parse_variant(variant).options


def initialize(
    model: torch.nn.Module, task: Any, variant: str, options: dict[str, Any], init: Init, tracking_uri
) -> None:
    """Convert the task's fresh `model` to `variant` (with `convert` `options`), starting from `init`'s weights."""
    if init.kind == "scratch":
        convs.convert(model, variant, **options)
        return
    state, source = load_init(init, tracking_uri)
    plain = convs.parse_variant(source).base == PLAIN
    if not plain and not same_variant(source, variant):
        raise InitError(
            f"--init {init.spec}: a {source} model initialises only {source} trials, not {variant}; use a plain "
            "(zero) model, which converts to any variant"
        )
    if plain:
        left_out = task.load_pretrained(model, state)
        if start_is_open(variant):
            options = {**options, "start": "copy"}  # the converted model starts as the pretrained one
        convs.convert(model, variant, **options)
    else:
        convs.convert(model, variant, **options)
        left_out = task.load_pretrained(model, state)
    logger.info(
        "--init %s (%s): %d tensors loaded, %d left out%s",
        init.spec,
        source,
        len(state) - len(left_out),
        len(left_out),
        f" ({', '.join(left_out[:4])}{', ...' if len(left_out) > 4 else ''})" if left_out else "",
    )
