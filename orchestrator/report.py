"""The thesis' tables from a sweep's per-trial results: per-seed values, mean, std and difference to zero."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class TrialResult:
    variant: str
    seed: int
    metrics: dict[str, float]  # e.g. {"best/top1": 76.2, "last5/top1": 75.9}; best/* at the headline's best epoch
    status: str = "ok"  # ok | failed | interrupted: such a trial stays in the table, never silently dropped
    reason: str = ""  # why a failed trial failed, when known (a diverged loss)


def summary_name(metric: str) -> str:
    """The name of a metric in a run's summary (`best/<name>`, `last5/<name>`): the metric without its `val/`
    prefix ("val/top1" -> "top1"); other metrics keep their full key ("test_low/instance_top1")."""
    return metric.removeprefix("val/")


def columns(table_metrics: tuple[str, ...]) -> list[str]:
    """The closing table's columns: every table metric at the headline's best epoch, then the headline's last-5 mean."""
    names = [summary_name(m) for m in table_metrics]
    return [*(f"best/{n}" for n in names), f"last5/{names[0]}"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def comparison(results: list[TrialResult], columns: list[str], *, baseline: str = "zero") -> list[dict]:
    """One row per variant: per-seed values, mean, std and mean difference to `baseline`, for each column."""
    variants = sorted({r.variant for r in results}, key=lambda v: (v != baseline, v))
    seeds = sorted({r.seed for r in results})
    rows = []
    means: dict[tuple[str, str], float] = {}
    for variant in variants:
        row: dict = {"variant": variant}
        for column in columns:
            values = []
            for seed in seeds:
                found = [r for r in results if r.variant == variant and r.seed == seed]
                if not found:
                    row[f"{column} seed {seed}"] = "missing"
                elif found[0].status != "ok" or column not in found[0].metrics:
                    row[f"{column} seed {seed}"] = found[0].status if found[0].status != "ok" else "no value"
                else:
                    values.append(found[0].metrics[column])
                    row[f"{column} seed {seed}"] = found[0].metrics[column]
            mean, std = _mean_std(values)
            row[f"{column} mean"], row[f"{column} std"] = mean, std
            means[variant, column] = mean
        rows.append(row)
    for row in rows:
        for column in columns:
            base = means.get((baseline, column), math.nan)
            row[f"{column} diff to {baseline}"] = row[f"{column} mean"] - base
    return rows


def layout_table(results: list[TrialResult], cells: tuple[tuple[str, str], ...], *, baseline: str = "zero") -> str:
    """A thesis-layout table (e.g. tables 4.5/4.6: occlusion level x k): one row per variant, one column per
    (header, table metric) of `cells`, each cell the mean over the variant's finished seeds at the headline's best
    epoch, with the std over seeds (n-1) when there are several; `seeds` counts them (failed or unfinished trials
    are not averaged in, and show in the full comparison)."""
    variants = sorted({r.variant for r in results}, key=lambda v: (v != baseline, v))
    rows = []
    for variant in variants:
        done = [r for r in results if r.variant == variant and r.status == "ok"]
        row = [variant, f"{len(done)}/{sum(r.variant == variant for r in results)}"]
        for _, metric in cells:
            values = [
                r.metrics[f"best/{summary_name(metric)}"] for r in done if f"best/{summary_name(metric)}" in r.metrics
            ]
            mean, std = _mean_std(values)
            row.append("n/a" if math.isnan(mean) else f"{mean:.1f}" + (f"±{std:.1f}" if len(values) > 1 else ""))
        rows.append(row)
    return markdown_table(["variant", "seeds", *(header for header, _ in cells)], rows)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain Markdown table of strings, columns padded to their widest cell (it reads fine in a terminal too)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def markdown(rows: list[dict]) -> str:
    """The comparison rows as a Markdown table, numbers with 3 decimals and NaN as n/a."""
    if not rows:
        return "(no results)"
    headers = list(rows[0])
    return markdown_table(headers, [[_fmt(row.get(h, "")) for h in headers] for row in rows])


def to_csv(rows: list[dict]) -> str:
    """The comparison rows as CSV text, one column per key of the first row."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
