"""The thesis' tables from a sweep's per-trial results: per-seed values, mean, std and difference to zero, with
Welch's t-test and a bootstrap interval of each difference, rendered as Markdown, CSV, LaTeX and a terminal view."""

from __future__ import annotations

import csv
import io
import math
import statistics
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from tasks.published import Published


@dataclass(frozen=True)
class TrialResult:
    variant: str
    seed: int
    metrics: dict[str, float]  # e.g. {"best/top1": 76.2, "last5/top1": 75.9}; best/* at the headline's best epoch
    # ok | failed | interrupted | running | missing: such a trial stays in the table, never silently dropped
    status: str = "ok"
    reason: str = ""  # why a failed trial failed, when known (a diverged loss)
    run_id: str = ""  # its MLflow run, when the report read it from there
    trial_id: str = ""  # its Ray Tune trial id, when the sweep collected it from Tune


def summary_name(metric: str) -> str:
    """The name of a metric in a run's summary (`best/<name>`, `last5/<name>`): the metric without its `val/`
    prefix ("val/top1" -> "top1"); other metrics keep their full key ("test_low/instance_top1")."""
    return metric.removeprefix("val/")


def columns(table_metrics: tuple[str, ...]) -> list[str]:
    """The closing table's columns: every table metric at the headline's best epoch, then the headline's last-5 mean."""
    names = [summary_name(m) for m in table_metrics]
    return [*(f"best/{n}" for n in names), f"last5/{names[0]}"]


def arm_order(results: list[TrialResult], baseline: str = "zero") -> list[str]:
    """The arms of `results`, the baseline first, then by name: the row order of every table and plot."""
    return sorted({r.variant for r in results}, key=lambda v: (v != baseline, v))


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def layout_table(results: list[TrialResult], cells: tuple[tuple[str, str], ...], *, baseline: str = "zero") -> str:
    """A thesis-layout table (e.g. tables 4.5/4.6: occlusion level x k): one row per variant, one column per
    (header, table metric) of `cells`, each cell the mean over the variant's finished seeds at the headline's best
    epoch, with the std over seeds (n-1) when there are several; `seeds` counts them (failed or unfinished trials
    are not averaged in, and show in the full comparison)."""
    variants = arm_order(results, baseline)
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


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain Markdown table of strings, columns padded to their widest cell (it reads fine in a terminal too)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# statistics ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    """An arm against the baseline: the difference of means, Welch's t-test and a bootstrap 95% interval.

    `p_holm` is `p` adjusted for the other arms tested against the same baseline on the same metric (`holm`); a
    report marks an arm significant by it. Alone (`compare`), it is `p`."""

    diff: float
    p: float = math.nan  # Welch's two-sided p-value; NaN when no test was possible
    ci_low: float = math.nan
    ci_high: float = math.nan
    significant: bool = False  # p_holm < alpha
    note: str = ""  # why there is no p-value or interval, when there is none
    p_holm: float = math.nan

    @property
    def tested(self) -> bool:
        return not math.isnan(self.p)


NO_TEST = "no test possible: fewer than 2 finished seeds"


def compare(
    arm: Sequence[float], base: Sequence[float], *, alpha: float = 0.05, resamples: int = 9999, seed: int = 0
) -> Test:
    """`arm` against `base` (values per seed): mean(arm) - mean(base), Welch's t-test (unequal variances, scipy's
    `ttest_ind(equal_var=False)`) and a percentile bootstrap 95% interval of the difference of means (each sample
    resampled on its own, `resamples` times, seeded: the same samples always give the same interval).

    The percentile method rather than scipy's default BCa: BCa's jackknife degenerates on the 2-3 seeds a sweep has
    (a NaN interval and a warning when a sample's values are equal). With so few seeds any bootstrap interval is
    too narrow (it can only reshuffle the values it saw); the t-test is the one to trust for significance."""
    arm, base = np.asarray(arm, dtype=float), np.asarray(base, dtype=float)
    if len(arm) == 0 or len(base) == 0:
        return Test(math.nan, note=NO_TEST)
    diff = float(arm.mean() - base.mean())
    if len(arm) < 2 or len(base) < 2:
        return Test(diff, note=NO_TEST)
    from scipy import stats  # here, not at the top: the training loop imports this module in every worker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance in both samples: scipy's p is NaN
        p = float(stats.ttest_ind(arm, base, equal_var=False).pvalue)
        interval = stats.bootstrap(
            (arm, base),
            lambda a, b, axis: np.mean(a, axis=axis) - np.mean(b, axis=axis),
            vectorized=True,
            n_resamples=resamples,
            confidence_level=0.95,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
    if math.isnan(p):
        return Test(diff, note="no test possible: every seed of both arms gave the same value")
    return Test(diff, p, float(interval.low), float(interval.high), p < alpha, p_holm=p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their order (NaN, an untested arm, stays NaN and is
    not counted): the i-th smallest of m is multiplied by m - i + 1, capped at 1, and no adjusted value is smaller
    than that of a smaller p. Declaring significant those whose adjusted p is below alpha keeps the chance of any
    false finding in the family at alpha (Holm 1979), for p-values that depend on each other too, as comparisons
    against one shared baseline do. scipy has the false-discovery-rate adjustments, not this one."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


# the report's tables -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One arm in one metric's table."""

    metric: str
    arm: str
    cells: dict[int, float | str]  # seed -> value, or the trial's status when it has none (failed, running, ...)
    expected: int  # seeds expected in this cell
    values: tuple[float, ...]  # the finished seeds' values
    test: Test | None  # against the baseline; None for the baseline itself

    @property
    def n(self) -> str:
        return f"{len(self.values)}/{self.expected}"

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


@dataclass
class Built:
    """Every table metric's rows, and the published rows beside them: what the renderers below print."""

    columns: list[str]
    arms: list[str]
    seeds: list[int]
    rows: dict[tuple[str, str], Row]
    baseline: str
    alpha: float
    published: tuple[Published, ...] = field(default_factory=tuple)

    def published_for(self, column: str) -> list[Published]:
        return [p for p in self.published if column in p.values]

    # Markdown -----------------------------------------------------------------------------------------------------

    def markdown(self) -> str:
        """One thesis-style table per metric (every seed, mean, std n-1, difference and test against the
        baseline), then the published rows for that metric."""
        parts = [
            f"Per metric: each seed's value (at the trial's best epoch by the headline metric; last5: the mean of the "
            f"last 5 epochs), the number of finished seeds, their mean and std (n-1), the difference of means to "
            f"`{self.baseline}` with a bootstrap 95% interval (percentile, 9999 resamples), Welch's t-test p-value, "
            f"and that p-value adjusted by Holm's method for the arms tested against `{self.baseline}` on the same "
            f"metric; * marks an adjusted p < {self.alpha:g}. A cell without a value shows its trial's state."
        ]
        for column in self.columns:
            headers = ["arm", *(f"seed {s}" for s in self.seeds), "seeds", "mean", "std"]
            headers += [f"diff to {self.baseline}", "95% CI of diff", "p (Welch)", "p (Holm)", "sig"]
            body = []
            for arm in self.arms:
                row = self.rows[column, arm]
                test = row.test
                body.append(
                    [
                        arm,
                        *(_cell(row.cells.get(s, "missing")) for s in self.seeds),
                        row.n,
                        _num(row.mean),
                        _num(row.std),
                        "" if test is None else _num(test.diff, signed=True),
                        "" if test is None else _ci(test) or test.note,
                        "" if test is None or not test.tested else _p(test.p),
                        "" if test is None or not test.tested else _p(test.p_holm),
                        "*" if test is not None and test.significant else "",
                    ]
                )
            parts.append(f"### {column}\n\n{markdown_table(headers, body)}")
            published = self.published_for(column)
            if published:
                rows = [
                    [
                        p.source,
                        p.label,
                        p.arm,
                        " ".join(_num(v) for v in p.runs.get(column, ())) or "single",
                        _num(p.values[column]),
                        _num(p.std(column) if p.std(column) is not None else math.nan),
                    ]
                    for p in published
                ]
                parts.append(
                    "Published (other data and scale than a synthetic sweep: for orientation, not comparison):\n\n"
                    + markdown_table(["source", "row", "our arm", "runs", "mean", "std"], rows)
                )
        return "\n\n".join(parts) + "\n"

    # CSV ----------------------------------------------------------------------------------------------------------

    def csv(self) -> str:
        """Long format: one line per (metric, arm) of this sweep (`source` = "this sweep"), then the published
        lines (`source` = where they come from); numbers unrounded."""
        seed_columns = [f"seed {s}" for s in self.seeds]
        fields = ["metric", "source", "arm", "row", *seed_columns, "n", "mean", "std"]
        fields += ["diff", "ci_low", "ci_high", "p", "p_holm", "significant", "note"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for column in self.columns:
            for arm in self.arms:
                row, test = self.rows[column, arm], self.rows[column, arm].test
                line = {"metric": column, "source": "this sweep", "arm": arm, "row": arm, "n": row.n}
                line.update({f"seed {s}": _raw(row.cells.get(s, "missing")) for s in self.seeds})
                line.update(mean=_raw(row.mean), std=_raw(row.std))
                if test is not None:
                    line.update(diff=_raw(test.diff), ci_low=_raw(test.ci_low), ci_high=_raw(test.ci_high))
                    line.update(p=_raw(test.p), p_holm=_raw(test.p_holm), note=test.note)
                    line["significant"] = str(test.significant).lower()
                writer.writerow(line)
            for p in self.published_for(column):
                runs = p.runs.get(column, ())
                line = {"metric": column, "source": p.source, "arm": p.arm, "row": p.label, "n": len(runs) or 1}
                line.update(mean=p.values[column], std=_raw(p.std(column) if p.std(column) is not None else math.nan))
                line["note"] = "runs: " + " ".join(f"{v:g}" for v in runs) if runs else "single run"
                writer.writerow(line)
        return buffer.getvalue()

    # LaTeX --------------------------------------------------------------------------------------------------------

    def latex(self) -> str:
        """One booktabs table per metric, the published rows under a rule of their own."""
        out = ["% Needs \\usepackage{booktabs}. Generated by python -m orchestrator.report."]
        for column in self.columns:
            seeds = [f"Seed {s}" for s in self.seeds]
            n_cols = len(seeds) + 8
            out += [
                "\\begin{table}[ht]",
                "\\centering",
                f"\\caption{{{_tex(column)}: per seed, mean, std ($n-1$), difference to {_tex(self.baseline)} with "
                f"a bootstrap 95\\% interval, Welch's $p$ and $p$ adjusted by Holm's method over the arms "
                f"($^*$: adjusted $p < {self.alpha:g}$)}}",
                "\\begin{tabular}{l" + "r" * (len(seeds) + 4) + "crr}",
                "\\toprule",
                " & ".join(["Arm", *seeds, "$n$", "Mean", "Std", "$\\Delta$", "95\\% CI", "$p$", "$p_\\mathrm{Holm}$"])
                + " \\\\",
                "\\midrule",
            ]
            for arm in self.arms:
                row, test = self.rows[column, arm], self.rows[column, arm].test
                cells = [_tex(arm), *(_tex(_cell(row.cells.get(s, "missing"))) for s in self.seeds), row.n]
                cells += [_num(row.mean), _num(row.std, blank="--")]
                if test is None:
                    cells += ["--", "--", "--", "--"]
                elif not test.tested:
                    cells += [_num(test.diff, signed=True), "\\multicolumn{3}{c}{no test}"]
                else:
                    mark = "$^*$" if test.significant else ""
                    cells += [_num(test.diff, signed=True) + mark, _tex(_ci(test))]
                    cells += [_p(test.p).replace("<", "$<$"), _p(test.p_holm).replace("<", "$<$")]
                out.append(" & ".join(cells) + " \\\\")
            published = self.published_for(column)
            if published:
                out.append("\\midrule")
                out.append(f"\\multicolumn{{{n_cols}}}{{l}}{{\\emph{{Published (other data and scale)}}}} \\\\")
                for p in published:
                    std = p.std(column)
                    label = f"{_tex(p.label)} ({_tex(_short(p.source))})"
                    runs = [_num(v) for v in p.runs.get(column, ())]
                    runs = runs if len(runs) <= len(seeds) else []  # more runs than columns: mean and std only
                    cells = [label, *(runs + [""] * len(seeds))[: len(seeds)], str(len(p.runs.get(column, ())) or 1)]
                    cells += [_num(p.values[column]), "--" if std is None else _num(std), "", "", "", ""]
                    out.append(" & ".join(cells) + " \\\\")
            out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
        return "\n".join(out)

    # terminal -----------------------------------------------------------------------------------------------------

    def terminal(self, width: int = 120) -> str:
        """The headline metric (the first column) in full, one line per arm; the published headline rows for the
        arms of this sweep; then the other metrics as a grid of differences to the baseline, one line per metric
        and one column per arm (* where significant), as many arms as `width` holds. No line is longer than
        `width`; arm names that do not fit end in "…"."""
        if not self.arms or not self.columns:
            return "(no results)"
        head = self.columns[0]
        arm_width = min(max(len(a) for a in self.arms), 28)
        intro = (
            f"{head}: mean ± std over finished seeds, difference to {self.baseline} with its bootstrap 95% CI, "
            f"Welch p and p adjusted by Holm's method over the {len(self.arms) - 1} arms (* adjusted p < "
            f"{self.alpha:g})"
        )
        lines = textwrap.wrap(intro, width)
        header = f"{'arm':<{arm_width}}  seeds  {'mean ± std':<17}  {'diff':>8}  {'95% CI':<19}  {'p':>7}"
        lines.append(f"{header}  {'p Holm':>7}")
        for arm in self.arms:
            row, test = self.rows[head, arm], self.rows[head, arm].test
            spread = _num(row.mean) + (f" ± {_num(row.std)}" if len(row.values) > 1 else "")
            text = f"{_fit(arm, arm_width):<{arm_width}}  {row.n:<5}  {spread:<17}  "
            if test is None:
                text += f"{'(baseline)':>8}"
            elif not test.tested:
                text += f"{_num(test.diff, signed=True):>8}  {test.note}"
            else:
                text += f"{_num(test.diff, signed=True):>8}  {_ci(test):<19}  {_p(test.p):>7}  {_p(test.p_holm):>7}"
                text += " *" if test.significant else ""
            lines.append(text)
        published = self.published_for(head)
        ours = [(arm, p) for p in published for arm in self.arms if p.matches(arm)]
        if ours:
            lines.append(f"published for these arms, other data and scale ({len(published)} rows in report.md):")
            for arm, p in ours:
                lines.append(f"  {_fit(arm, arm_width):<{arm_width}}  {_num(p.values[head])}  {p.label}, {p.source}")
        elif published:
            lines.append(f"published: {len(published)} rows for other arms, in report.md")
        others = [a for a in self.arms if a != self.baseline]
        if len(self.columns) > 1 and others:
            lines += self._grid(others, width)
        return "\n".join(_fit(line.rstrip(), width) for line in lines)

    def _grid(self, arms: list[str], width: int) -> list[str]:
        """The other metrics' differences to the baseline: one line per metric, one column per arm."""
        metric_width = min(max(len(c) for c in self.columns[1:]), 40)
        cell = max(9, min(max(len(a) for a in arms), 14))
        fits = max(1, (width - metric_width - 2) // (cell + 2))
        shown = arms[:fits]
        lines = [
            f"other metrics, difference to {self.baseline} (* Holm-adjusted p < {self.alpha:g}; no test: under 2 "
            f"seeds or no variance; all in report.md):",
            f"  {'':<{metric_width}}" + "".join(f"  {_fit(a, cell):>{cell}}" for a in shown),
        ]
        for column in self.columns[1:]:
            cells = []
            for arm in shown:
                test = self.rows[column, arm].test
                if test is None or math.isnan(test.diff):
                    text = "n/a"
                elif not test.tested:
                    text = "no test"
                else:
                    text = _num(test.diff, signed=True) + ("*" if test.significant else " ")
                cells.append(f"  {text:>{cell}}")
            lines.append(f"  {_fit(column, metric_width):<{metric_width}}" + "".join(cells))
        if len(arms) > len(shown):
            lines.append(f"  ({len(arms) - len(shown)} more arms in report.md: {', '.join(arms[len(shown) :])})")
        return lines


def build(
    results: list[TrialResult],
    columns: list[str],
    *,
    baseline: str = "zero",
    alpha: float = 0.05,
    seeds: Sequence[int] | None = None,
    published: Sequence[Published] = (),
) -> Built:
    """Each column's rows: every arm (the baseline first), its value per seed (or the trial's state), and for
    every other arm the test against the baseline over the finished seeds. `seeds`: those expected (default: every
    seed among the results)."""
    arms = arm_order(results, baseline)
    all_seeds = sorted(set(seeds or ()) | {r.seed for r in results})
    rows = {}
    for column in columns:
        values = {}
        for arm in arms:
            cells: dict[int, float | str] = {}
            for r in results:
                if r.variant != arm:
                    continue
                ok = r.status == "ok" and column in r.metrics and not math.isnan(r.metrics[column])
                if ok or isinstance(cells.get(r.seed, ""), str):  # a seed run twice: its finished value wins
                    cells[r.seed] = r.metrics[column] if ok else (r.status if r.status != "ok" else "no value")
            values[arm] = tuple(v for _, v in sorted(cells.items()) if not isinstance(v, str))
            expected = len(set(seeds or ()) | set(cells))
            rows[column, arm] = (cells, expected)
        tests = {arm: compare(values[arm], values.get(baseline, ()), alpha=alpha) for arm in arms if arm != baseline}
        adjusted = dict(zip(tests, holm([t.p for t in tests.values()]), strict=True))
        for arm, test in tests.items():
            if test.tested:
                tests[arm] = replace(test, p_holm=adjusted[arm], significant=adjusted[arm] < alpha)
        for arm in arms:
            cells, expected = rows[column, arm]
            rows[column, arm] = Row(column, arm, cells, expected, values[arm], tests.get(arm))
    return Built(list(columns), arms, all_seeds, rows, baseline, alpha, tuple(published))


def _num(value: float, *, signed: bool = False, blank: str = "n/a") -> str:
    if value is None or math.isnan(value):
        return blank
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _raw(value) -> str:
    if isinstance(value, str):
        return value
    return "" if value is None or math.isnan(value) else repr(float(value))


def _cell(value) -> str:
    return value if isinstance(value, str) else _num(value)


def _ci(test: Test) -> str:
    if math.isnan(test.ci_low):
        return ""
    return f"[{test.ci_low:+.3f}, {test.ci_high:+.3f}]"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(source: str) -> str:
    """A source up to its colon: "thesis Table 4.1"."""
    return source.split(":")[0]


_TEX = {
    **{c: "\\" + c for c in "_%&#${}"},
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in text).replace("±", r"$\pm$").replace("…", r"\ldots{}")
