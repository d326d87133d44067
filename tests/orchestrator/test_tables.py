"""The report's statistics on hand-made samples, and its tables in every format carrying the same numbers."""

import csv
import io
import math
import statistics

import numpy as np
import pytest
from scipy import stats

from orchestrator import tables
from orchestrator.tables import TrialResult
from tasks import get_task
from tasks.published import Published


def welch_by_hand(a, b) -> float:
    """Welch's two-sided p-value written out: t with each sample's own variance, Welch-Satterthwaite's degrees of
    freedom (not Student's pooled test, whose df would be len(a) + len(b) - 2)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def test_a_large_known_difference_is_significant_and_its_interval_holds_the_truth():
    rng = np.random.default_rng(1)
    base, arm = rng.normal(0, 1, 10), rng.normal(5, 2, 8)  # unequal variances and sizes: Welch's case
    test = tables.compare(arm, base)
    assert test.significant and test.p < 1e-4
    assert test.diff == pytest.approx(arm.mean() - base.mean())
    assert test.ci_low < 5 < test.ci_high  # the true difference
    assert test.ci_low < test.diff < test.ci_high
    assert test.p == pytest.approx(stats.ttest_ind(arm, base, equal_var=False).pvalue, rel=1e-12)
    assert test.p == pytest.approx(welch_by_hand(list(arm), list(base)), rel=1e-9)
    assert test.p != pytest.approx(stats.ttest_ind(arm, base).pvalue, rel=1e-3)  # not Student's
    assert tables.compare(arm, base) == test  # seeded: the same samples give the same interval


def test_identical_samples_are_not_significant_and_few_seeds_are_not_tested():
    same = [75.6, 75.9, 75.7]
    test = tables.compare(same, same)
    assert not test.significant and test.p == pytest.approx(1.0) and test.diff == 0
    assert test.ci_low <= 0 <= test.ci_high
    constant = tables.compare([1.0, 1.0], [1.0, 1.0])  # no variance at all: scipy's p is NaN
    assert not constant.significant and not constant.tested and "same value" in constant.note
    one = tables.compare([76.0], [75.0, 75.5])
    assert not one.tested and one.note == tables.NO_TEST and one.diff == pytest.approx(0.75)
    assert math.isnan(tables.compare([], [1.0, 2.0]).diff)


def test_the_thesis_table_4_1_numbers_come_out_of_the_tables():
    """The thesis' own per-run values through `build`: its means, stds (n-1) and differences (Table 4.1)."""
    runs = {
        "zero": (75.614, 75.668, 75.884),
        "partial": (76.148, 75.908, 76.138),
        "edge": (75.046, 74.458, 75.034),
    }
    results = [TrialResult(arm, s, {"best/top1": v}) for arm, values in runs.items() for s, v in enumerate(values)]
    built = tables.build(results, ["best/top1"])
    assert built.arms == ["zero", "edge", "partial"]
    zero, partial, edge = (built.rows["best/top1", a] for a in ("zero", "partial", "edge"))
    assert round(zero.mean, 3) == 75.722 and round(zero.std, 3) == 0.143
    assert round(partial.test.diff, 3) == 0.343 and round(partial.std, 3) == 0.136
    assert round(edge.test.diff, 3) == -0.876 and round(edge.std, 3) == 0.336
    assert partial.test.tested and edge.test.tested and zero.test is None  # the baseline is not tested against itself
    assert partial.test.p == pytest.approx(stats.ttest_ind(runs["partial"], runs["zero"], equal_var=False).pvalue)


def sweep_like(arms, seeds, columns, holes=()) -> list[TrialResult]:
    rng = np.random.default_rng(0)
    results = []
    for i, arm in enumerate(arms):
        for seed in seeds:
            if (arm, seed) in holes:
                status = holes[arm, seed]
                if status != "missing":
                    results.append(TrialResult(arm, seed, {}, status, "diverged" if status == "failed" else ""))
                continue
            results.append(TrialResult(arm, seed, {c: 70 + i + float(rng.normal()) for c in columns}))
    return results


def test_every_format_carries_the_same_numbers_and_the_terminal_fits_120_columns():
    columns = tables.columns(get_task("hotels").table_metrics)  # 25 columns
    arms = ["zero", "partial", "gated:norm=inside +init /very/long/path/to/a/checkpoint.pt", "edge", "affine", "x"]
    holes = {("edge", 1): "failed", ("affine", 2): "running", **{("x", s): "missing" for s in range(4)}}
    results = sweep_like(arms, range(5), columns, holes)
    published = get_task("hotels").published
    built = tables.build(results, columns, seeds=range(5), published=published, alpha=0.01)
    view = built.terminal()
    assert max(len(line) for line in view.splitlines()) <= 120
    assert view.splitlines()[0].startswith(columns[0])  # the headline first
    assert all(column in view for column in columns[1:])

    lines = list(csv.DictReader(io.StringIO(built.csv())))
    ours = {(r["metric"], r["arm"]): r for r in lines if r["source"] == "this sweep"}
    assert len(ours) == len(columns) * len(arms)
    for (column, arm), line in ours.items():
        row = built.rows[column, arm]
        values = [r.metrics[column] for r in results if r.variant == arm and r.status == "ok"]
        assert line["n"] == f"{len(values)}/5" == row.n
        if values:
            assert float(line["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
        if len(values) > 1:
            assert float(line["std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
        if arm != "zero" and len(values) > 1:
            base = [r.metrics[column] for r in results if r.variant == "zero"]
            assert float(line["diff"]) == pytest.approx(statistics.fmean(values) - statistics.fmean(base))
            assert float(line["p"]) == pytest.approx(stats.ttest_ind(values, base, equal_var=False).pvalue)
            family = [float(ours[column, a]["p"]) for a in arms if a != "zero" and ours[column, a]["p"]]
            m = len(family)  # the arms with a test on this metric; Holm's bound for this p is at least m times the
            assert m == 4 and float(line["p_holm"]) >= min(1.0, m * min(family)) - 1e-12  # smallest p's, at most
            assert float(line["p"]) <= float(line["p_holm"]) <= min(1.0, m * float(line["p"])) + 1e-12
            assert line["significant"] == str(float(line["p_holm"]) < 0.01).lower()
            cell = f"{float(line['mean']):.3f}"
            assert cell in built.markdown() and cell in built.latex()
    assert ours[columns[0], "edge"]["seed 1"] == "failed" and ours[columns[0], "edge"]["n"] == "4/5"
    assert ours[columns[0], "affine"]["seed 2"] == "running" and ours[columns[0], "x"]["seed 0"] == "missing"
    assert ours[columns[0], "x"]["note"] == tables.NO_TEST

    sources = {r["source"] for r in lines if r["source"] != "this sweep"}
    assert sources == {p.source for p in published}
    latex = built.latex()
    assert latex.count("\\toprule") == latex.count("\\bottomrule") == len(columns)
    assert "best/test\\_low/instance\\_top10" in latex and "Edge\\_no7" not in latex
    markdown = built.markdown()
    assert markdown.count("### ") == len(columns) and "Published" in markdown and "Zero+*" in markdown


def test_holm_adjusts_each_p_by_its_rank_and_keeps_their_order():
    # sorted 0.01 < 0.03 < 0.04 of m = 3: 3 x 0.01, 2 x 0.03, then max(0.06, 1 x 0.04); NaN is no test, not counted
    assert tables.holm([0.04, 0.01, math.nan, 0.03]) == pytest.approx([0.06, 0.03, math.nan, 0.06], nan_ok=True)
    assert tables.holm([0.5, 0.9]) == [1.0, 1.0] and tables.holm([]) == [] and tables.holm([0.02]) == [0.02]


def test_a_report_marks_significance_by_the_holm_adjusted_p():
    """One arm better than zero (Welch p = 0.028 alone) beside two that are not: adjusted for the three
    comparisons (3 x 0.028) it is not significant, and the report says so in every format; the same arm with one
    other, clearly better arm beside it keeps its star (Holm compares the largest p with alpha itself)."""
    runs = {
        "zero": [70.0, 70.4, 69.6, 70.2],
        "a": [70.1, 69.7, 70.5, 70.0],
        "b": [70.3, 70.6, 69.9, 70.1],
        "c": [70.6, 71.0, 70.4, 70.7],
    }
    results = [TrialResult(arm, s, {"best/top1": v}) for arm, values in runs.items() for s, v in enumerate(values)]
    built = tables.build(results, ["best/top1"])
    c = built.rows["best/top1", "c"].test
    assert c.p == pytest.approx(0.0283, abs=1e-4) and c.p_holm == pytest.approx(3 * c.p) and not c.significant
    assert not any(built.rows["best/top1", arm].test.significant for arm in "ab")
    line = next(line for line in built.terminal().splitlines() if line.startswith("c "))
    assert f"{c.p:.3g}" in line and f"{c.p_holm:.3g}" in line and not line.endswith("*")
    assert "Holm" in built.terminal() and "p (Holm)" in built.markdown() and "p_\\mathrm{Holm}" in built.latex()
    rows = {r["arm"]: r for r in csv.DictReader(io.StringIO(built.csv()))}
    assert rows["c"]["significant"] == "false" and float(rows["c"]["p_holm"]) == pytest.approx(c.p_holm)

    runs["b"] = [75.0, 75.3, 74.8, 75.1]  # now clearly better: c's p is the larger of two tested below alpha
    del runs["a"]
    results = [TrialResult(arm, s, {"best/top1": v}) for arm, values in runs.items() for s, v in enumerate(values)]
    built = tables.build(results, ["best/top1"])
    b, c = (built.rows["best/top1", arm].test for arm in "bc")
    assert b.p_holm == pytest.approx(2 * b.p) and c.p_holm == pytest.approx(c.p) and b.significant and c.significant


def test_published_rows_match_the_thesis_tables():
    rows = {(p.source.split(":")[0], p.label): p for p in get_task("classification").published}
    zero = rows["thesis Tables 4.1/4.2", "Zero"]
    assert zero.arm == "zero" and zero.values["best/top1"] == 75.722 and round(zero.std("best/top1"), 3) == 0.143
    assert rows["thesis Tables 4.1/4.2", "Gated (eq. 3.11)"].values["last5/top1"] == 74.748
    hotels = {p.label: p for p in get_task("hotels").published}
    assert hotels["Zero+*"].values["best/test_high/instance_top100"] == 24.0
    assert "best/test_low/chain_top1" not in hotels["Zero+*"].values  # blank in the thesis
    assert hotels["Gated+ (eq. 3.11)"].values["best/test_medium/chain_top3"] == 41.3
    seg = [p for p in get_task("segmentation").published if p.label == "WN38_partial*"][0]
    assert seg.values == {"best/miou": 79.082, "best/miou_tile": 79.907, "best/miou_tile_overlap": 80.079}
    for task in ("classification", "segmentation", "hotels"):
        columns = set(tables.columns(get_task(task).table_metrics))
        for p in get_task(task).published:
            assert set(p.values) <= columns, (task, p.label)  # every published number lands in a report column
    published = Published.from_runs("a", "A", "s", {"best/x": (1.0, 3.0)}, {"best/x": 2.0})
    assert published.values == {"best/x": 2.0} and published.std("best/x") == pytest.approx(math.sqrt(2))


def test_a_degenerate_sample_still_gets_a_finite_percentile_interval():
    """One arm without variance (every seed the same top-1, common on small data): BCa's jackknife would give NaN
    and a warning; the percentile interval stays finite and holds the difference."""
    test = tables.compare([71.0, 71.0, 71.0], [70.0, 70.5, 69.5])
    assert test.tested and math.isfinite(test.ci_low) and test.ci_low <= test.diff == 1.0 <= test.ci_high


def test_a_seed_run_twice_keeps_its_finished_value_and_no_results_render():
    results = [
        TrialResult("zero", 0, {"best/top1": 70.0}),
        TrialResult("zero", 0, {}, "interrupted"),  # the same seed, a later attempt cut short
        TrialResult("zero", 1, {}, "failed"),
        TrialResult("zero", 1, {"best/top1": 71.0}),
    ]
    built = tables.build(results, ["best/top1"], seeds=[0, 1, 2])
    row = built.rows["best/top1", "zero"]
    assert row.cells == {0: 70.0, 1: 71.0} and row.n == "2/3" and "missing" in built.markdown()
    empty = tables.build([], ["best/top1"], seeds=[0])
    assert empty.terminal() == "(no results)" and "### best/top1" in empty.markdown()
    assert empty.csv().startswith("metric,") and "\\bottomrule" in empty.latex()


def test_the_terminal_wraps_truncates_and_points_to_the_files():
    columns = tables.columns(get_task("hotels").table_metrics)
    long = "gated:norm=inside +init /very/long/path.pt"
    arms = ["zero", long, *(f"arm{i}" for i in range(9))]  # more arms than the grid of other metrics holds
    built = tables.build(sweep_like(arms, range(3), columns), columns, seeds=range(3))
    lines = built.terminal(width=120).splitlines()
    assert all(len(line) <= 120 for line in lines) and not any(line.endswith(" ") for line in lines)
    assert lines[0].startswith(columns[0]) and not lines[0].endswith("…")  # the header wraps, not cut
    assert any(line.startswith("gated:norm=inside +init /ve…") for line in lines)  # the arm cut, with "…"
    grid = lines[next(i for i, line in enumerate(lines) if line.startswith("other metrics")) + 1 :]
    assert len(grid) == 1 + len(columns) - 1 + 1 and "more arms in report.md" in grid[-1]
    assert all(line.split()[0] == column for line, column in zip(grid[1:-1], columns[1:], strict=True))
    narrow = built.terminal(width=80).splitlines()
    assert all(len(line) <= 80 for line in narrow)
    latex = tables.build([TrialResult("a~b^c_d", 0, {"x": 1.0})], ["x"], baseline="a~b^c_d").latex()
    assert r"a\textasciitilde{}b\textasciicircum{}c\_d" in latex
