"""The settings of a trial and of a sweep: plain dataclasses that travel through Ray Tune's param space as dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import convs


@dataclass
class TrialConfig:
    task: str  # a key of tasks.TASKS
    variant: str  # a variant spec: a name of convs.VARIANTS, NAME:OPTION=VALUE,... or an alias (convs.ALIASES)
    seed: int  # seeds torch, numpy, python and the data order
    preset: str = "smoke"  # a key of the task's presets
    overrides: dict[str, Any] = field(default_factory=dict)  # preset fields to change (--epochs, --space ...)
    variant_options: dict[str, Any] = field(default_factory=dict)  # passed to convs.convert
    init: str = "scratch"  # where the weights start (--init): scratch, a checkpoint path, runs:/<id>, torchvision:<W>
    data_root: str | None = None  # real data; None = the synthetic stand-in, generated once into cache_dir
    cache_dir: str | None = None  # where the synthetic dataset lives (None = tasks.default_cache_dir())
    loader_workers: int = 2  # DataLoader processes per Ray Train worker
    tracking_uri: str | None = None  # MLflow store; None = no MLflow logging (unit tests of the loop)
    mlflow_run_id: str | None = None  # the trial's nested run, found or created before training starts

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrialConfig:
        """Build from a Tune config; keys Tune adds (`__trial_index__`) and sampled preset keys are folded in."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        extra = {k: v for k, v in config.items() if k not in known and not k.startswith("__")}
        unknown = sorted(k for k in extra if not k.startswith("space."))
        if unknown:
            raise ValueError(f"Unknown config key(s) {unknown}. Known keys: {', '.join(sorted(known))}.")
        overrides = dict(values.pop("overrides", {}) or {})
        overrides.update({k.removeprefix("space."): v for k, v in extra.items()})
        return cls(**values, overrides=overrides)

    def params(self) -> dict[str, Any]:
        """Flat settings for MLflow params (variant and seed under those names)."""
        flat = {k: v for k, v in asdict(self).items() if k not in ("overrides", "variant_options", "mlflow_run_id")}
        flat.update({f"preset.{k}": v for k, v in self.overrides.items()})
        spec = convs.parse_variant(self.variant)
        flat["variant.base"] = spec.base
        flat.update({f"variant.{k}": v for k, v in {**spec.options, **self.variant_options}.items()})
        return flat


@dataclass(frozen=True)
class SweepSettings:
    """What every trial of a sweep shares, decided once by the driver; travels in each trial's config as a dict.

    Stored in Tune's experiment state, so a resumed sweep reads the dict an older version of this class wrote:
    `from_dict` fills fields added since with their defaults.
    """

    name: str  # the sweep's name (--name): Tune experiment, MLflow parent run tag
    tracking_uri: str  # MLflow store, absolute (Ray workers run in other folders)
    experiment_id: str  # the task's MLflow experiment
    parent_run_id: str  # the sweep's MLflow run; trial runs nest under it
    variants: list[str]  # in grid order: Optuna's Repeater index maps to (variant, init, seed) through these
    seeds: list[int]
    train_storage: str  # where each trial's Ray Train run keeps its checkpoints
    workers_per_trial: int = 1  # Ray Train workers (DDP) per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2  # restarts of a crashed trial from its last checkpoint (by Train, or by Tune in_function)
    local: bool = False  # a Ray started on this machine: one node, nothing to be preempted
    # Each trial trains in its Tune function's process (Ray Train's local mode): a single worker on a local Ray. Decided
    # when the sweep starts and kept with each trial's config, so a sweep saved before this existed (False: Train's
    # worker processes, checkpoints under `train_storage`) resumes its trials the way they started.
    in_function: bool = False
    inits: list[str] = field(default_factory=lambda: ["scratch"])  # --init sources, a grid axis like the variants

    KEY: ClassVar[str] = "__sweep"  # its key in a trial's config (TrialConfig ignores "__" keys)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def function_resources(self) -> dict[str, float]:
        """What a trial's Tune function asks of Ray: the worker's CPUs and GPUs when it trains itself; otherwise no
        CPU (Train's workers take whole cores) and a token of memory, as a placement-group bundle needs a resource
        (with 0.01 CPU, two trials on 2 CPUs would need 2.02 and the second's worker would wait for a core until
        Train's 60 s start-up timeout)."""
        if self.in_function:
            return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}
        return {"CPU": 0, "memory": 2**20}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SweepSettings:
        """Read a dict written by `to_dict` of this or an older version; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown sweep setting(s) {unknown}. Known settings: {', '.join(sorted(known))}.")
        return cls(**values)

    def identity(self, config: dict[str, Any]) -> tuple[str, str, int]:
        """(variant, init, seed) of a trial's config: from the grid, or from Repeater's `__trial_index__` (Optuna:
        variant-major, then init, then seed)."""
        if "__trial_index__" in config:
            index = config["__trial_index__"]
            per_variant = len(self.inits) * len(self.seeds)
            rest = index % per_variant
            return (
                self.variants[index // per_variant],
                self.inits[rest // len(self.seeds)],
                self.seeds[rest % len(self.seeds)],
            )
        return config["variant"], config.get("init", "scratch"), config["seed"]

    def trial_config(self, config: dict[str, Any]) -> TrialConfig:
        """The TrialConfig of a Tune trial's config, variant, init and seed included."""
        variant, init, seed = self.identity(config)
        values = {k: v for k, v in config.items() if not k.startswith("__")}
        values.update(variant=variant, init=init, seed=seed, tracking_uri=self.tracking_uri)
        return TrialConfig.from_dict(values)
