"""The settings of one trial: a plain dataclass that travels through Ray Tune's param space as a dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrialConfig:
    task: str  # a key of tasks.TASKS
    variant: str  # a key of convs.VARIANTS
    seed: int  # seeds torch, numpy, python and the data order
    preset: str = "smoke"  # a key of the task's presets
    overrides: dict[str, Any] = field(default_factory=dict)  # preset fields to change (--epochs, --space ...)
    variant_options: dict[str, Any] = field(default_factory=dict)  # passed to convs.convert
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
        flat.update({f"variant.{k}": v for k, v in self.variant_options.items()})
        return flat
