"""Published numbers a sweep's report shows beside its own: what the thesis and the papers it compares with reported.

Each task lists its rows as `published` (see `tasks/base.py`); docs/published.md restates them with their sources,
and a test keeps the two equal.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Published:
    """One published row: an arm's numbers from one source, keyed like the report's columns (`best/top1`,
    `last5/top1`, `best/miou_tile`, `best/test_low/instance_top10`, ...); a metric the source leaves blank is absent.

    `runs` holds the per-run values where the source gives them; `values` are always the numbers the source prints."""

    # The arm of this project the row corresponds to, e.g. "gated:norm=inside"; a pretrained row ends in " +init"
    # (the thesis' "Zero+"): it matches every arm of that variant started from weights, "zero +init <weights>".
    arm: str
    label: str  # the row's name in the source, e.g. "Gated (eq. 3.11)"
    source: str  # where and on which data, e.g. "thesis Table 4.1: ImageNet val, ResNet50, 100 epochs"
    values: dict[str, float]
    runs: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @classmethod
    def from_runs(
        cls, arm: str, label: str, source: str, runs: dict[str, tuple[float, ...]], means: dict[str, float]
    ) -> Published:
        """A row with its per-run values and the means the source prints (rounded there from unrounded runs: the
        thesis' 75.963 is not the mean of its rounded runs, 75.962)."""
        return cls(arm, label, source, dict(means), runs)

    def matches(self, arm: str) -> bool:
        """Whether this row belongs beside a sweep's arm of that label (`orchestrator.report.arm_label`)."""
        return arm == self.arm or (self.arm.endswith(" +init") and arm.startswith(self.arm + " "))

    def std(self, column: str) -> float | None:
        """The std (n-1) over the published runs of `column`, when the source gives two or more."""
        runs = self.runs.get(column, ())
        return statistics.stdev(runs) if len(runs) > 1 else None
