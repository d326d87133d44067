"""Training recipes: the fields every task reads, each checked against its valid range when a preset is built."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Self


class PresetError(ValueError):
    """A preset key that does not exist, or a value outside its valid range."""


def _invalid(name: str, value: Any, expected: str, example: str) -> PresetError:
    return PresetError(f"Invalid preset value {name}={value!r}: expected {expected} (e.g. {example}).")


@dataclass(frozen=True)
class Integer:
    """A whole number >= `minimum` (an integral float such as 12.0 is taken as 12; bools are refused)."""

    minimum: int = 1
    optional: bool = False  # None allowed, meaning "no limit" or "use the default"
    example: str = ""

    def __call__(self, name: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral or value < self.minimum:
            expected = f"an integer >= {self.minimum}"
            raise _invalid(name, value, f"None or {expected}" if self.optional else expected, self.example)
        return int(value)


@dataclass(frozen=True)
class Number:
    """A finite real number in the interval given by `low`/`high`, each bound open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    example: str = ""

    def __call__(self, name: str, value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise _invalid(name, value, f"a number {self.describe()}", self.example)
        return float(value)

    def describe(self) -> str:
        """The valid range in words, e.g. "in [0, 1)" or "> 0"."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "(any finite value)"


@dataclass(frozen=True)
class Interval:
    """A pair (lo, hi) of numbers with `low` < lo <= hi (<= `high` when given); a list is taken as a tuple."""

    low: float = 0.0
    high: float | None = None
    example: str = ""

    def __call__(self, name: str, value: Any) -> tuple[float, float]:
        pair = isinstance(value, tuple | list) and len(value) == 2
        if pair:
            pair = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not pair or not self.low < value[0] <= value[1] or (self.high is not None and value[1] > self.high):
            upper = f" <= {self.high:g}" if self.high is not None else ""
            raise _invalid(name, value, f"a pair (lo, hi) with {self.low:g} < lo <= hi{upper}", self.example)
        return float(value[0]), float(value[1])


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of names (or None, when `optional`)."""

    choices: tuple[str, ...]
    optional: bool = False  # None allowed, meaning "off"
    example: str = ""

    def __call__(self, name: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or value not in self.choices:
            expected = f"one of {', '.join(self.choices)}"
            raise _invalid(name, value, f"None or {expected}" if self.optional else expected, self.example)
        return value


@dataclass(frozen=True)
class Text:
    """A non-empty string."""

    what: str = "a non-empty string"
    example: str = ""

    def __call__(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _invalid(name, value, self.what, self.example)
        return value


@dataclass(frozen=True)
class Texts:
    """A non-empty tuple of distinct non-empty strings (a list is taken as a tuple; a lone string is refused)."""

    what: str = "a non-empty tuple of distinct non-empty strings"
    example: str = ""

    def __call__(self, name: str, value: Any) -> tuple[str, ...]:
        ok = isinstance(value, tuple | list) and len(value) > 0
        ok = ok and all(isinstance(v, str) and v.strip() for v in value) and len(set(value)) == len(value)
        if not ok:
            raise _invalid(name, value, self.what, self.example)
        return tuple(value)


@dataclass(frozen=True)
class Flag:
    """True or False (not 0/1: a typo for another field's number should not pass as a switch)."""

    example: str = ""

    def __call__(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _invalid(name, value, "True or False", self.example)
        return value


@dataclass(frozen=True)
class Options:
    """A dict of keyword arguments (checked by whoever receives them)."""

    example: str = ""

    def __call__(self, name: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise _invalid(name, value, "a dict", self.example)
        return value


@dataclass(frozen=True)
class Preset:
    """A training recipe. Every field can be overridden per sweep (`--epochs`, `--space lr=...`).

    Tasks extend it with the fields only they read (`ClassificationPreset`, `SegmentationPreset`). Every field has
    an entry in `checks`: a bad value fails when the preset is built, so a sweep refuses it before any trial starts.
    """

    model: str  # torchvision builder name, e.g. "resnet50"
    epochs: int  # full passes over the training split
    batch_size: int  # global: split evenly across a trial's Ray Train workers (the thesis' 64, and 16 = 8 GPUs x 2)
    lr: float  # peak learning rate
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9  # SGD momentum (Adam: beta1)
    weight_decay: float = 1e-4
    schedule: str = "step"  # step: x gamma every step_size epochs | poly: (1 - t/T)^power | constant
    step_size: int = 30
    gamma: float = 0.1
    poly_power: float = 1.0
    image_size: int = 224  # training crop side in pixels
    max_batches: int | None = None  # cap on batches per epoch and per evaluation (smoke tests)
    eval_batch_size: int | None = None  # validation batch size on rank 0 (None: the per-worker training batch)
    eval_every: int = 1  # evaluate every this many epochs, and always after the last one
    sync_bn: bool = False  # synchronized BatchNorm across the Ray Train workers (used on GPUs)
    amp: str | None = None  # mixed precision: None = fp32 (the thesis), "bf16", or "fp16" (GPUs, with loss scaling)
    variants: tuple[str, ...] = ("zero", "partial", "gated", "edge", "affine")  # specs a sweep runs by default
    variant_start: str = "copy"  # how converted layers' new filters start, where a variant asks: copy | random
    model_options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the task's model
    synthetic: dict[str, Any] = field(default_factory=dict)  # size of the generated stand-in dataset
    # An image file that cannot be decoded (truncated, garbled; also a Cityscapes label or a hotels mask PNG):
    # "fail" stops the trial with an error naming the file; "skip" leaves the file out, a warning naming it, and
    # serves the next item of its class or hotel in its place (tasks/images.py). "fail" in every preset: a damaged
    # file means a damaged copy of the dataset, which the thesis' numbers do not allow for and which should be
    # noticed, not averaged over; the generated stand-ins have none, so cpu and smoke lose nothing by it, and a
    # user who points them at real data learns about it too. Choose "skip" knowingly, e.g. for a download with a
    # few broken files that cannot be fetched again.
    bad_images: str = "fail"

    # field -> its check (returns the value, normalised: 12.0 -> 12, [0.5, 1] -> (0.5, 1.0)); subclasses add theirs
    checks: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "model": Text("a non-empty torchvision model name", example="model=resnet50"),
        "epochs": Integer(1, example="--epochs 12"),
        "batch_size": Integer(1, example="batch_size=32"),
        "lr": Number(low=0, low_open=True, example="lr=0.01"),
        "optimizer": Choice(("sgd", "adam"), example="optimizer=adam"),
        "momentum": Number(low=0, high=1, high_open=True, example="momentum=0.9"),
        "weight_decay": Number(low=0, example="weight_decay=1e-4"),
        "schedule": Choice(("step", "poly", "constant"), example="schedule=poly"),
        "step_size": Integer(1, example="step_size=30"),
        "gamma": Number(low=0, low_open=True, example="gamma=0.1"),
        "poly_power": Number(low=0, low_open=True, example="poly_power=1.0"),
        "image_size": Integer(1, example="image_size=224"),
        "max_batches": Integer(1, optional=True, example="max_batches=8, or None for whole epochs"),
        "eval_batch_size": Integer(1, optional=True, example="eval_batch_size=8, or None for batch_size"),
        "eval_every": Integer(1, example="eval_every=2"),
        "sync_bn": Flag(example="sync_bn=True"),
        "amp": Choice(("bf16", "fp16"), optional=True, example='amp="bf16", or None for fp32'),
        # names only: the sweep checks each spec against convs (tasks never import convs)
        "variants": Texts("a non-empty tuple of distinct variant specs", example='variants=("zero", "partial")'),
        "variant_start": Choice(("copy", "random"), example='variant_start="random"'),
        "model_options": Options(example='model_options={"output_stride": 16}'),
        "synthetic": Options(example='synthetic={"size": 64}'),
        "bad_images": Choice(("fail", "skip"), example='bad_images="skip"'),
    }

    def __post_init__(self) -> None:
        for f in fields(self):
            check = self.checks.get(f.name)
            if check is None:  # a new field without a range: a programming error, caught by any preset
                raise TypeError(f"{type(self).__name__}.{f.name} has no entry in {type(self).__name__}.checks")
            object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))

    def updated(self, **overrides: Any) -> Self:
        """A copy with `overrides` applied; unknown keys and out-of-range values are an error, never ignored."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise PresetError(f"Unknown preset key(s) {unknown}. Known keys: {', '.join(sorted(known))}.")
        return replace(self, **overrides)
