"""The published numbers: docs/published.md and tasks/*/published.py hold the same ones, every row names a real arm
of the task's thesis preset, and a pretrained ("+") row sits beside the arms started from weights."""

import importlib
import math
import re
import statistics
from pathlib import Path

import pytest

import convs
from orchestrator import tables
from orchestrator.report import arm_label
from tasks import get_task
from tasks.published import Published

DOC = Path(__file__).resolve().parents[2] / "docs" / "published.md"
TASKS = ("classification", "segmentation", "hotels")
ROUNDING = 0.0015  # a printed mean or difference, rounded from unrounded runs, against one from the printed runs


def doc_tables() -> list[dict]:
    """Each table of the doc under its `<!-- published: TASK CONST[,CONST] runs|values KEY... -->` comment: the
    task, the source constants, the kind, the report columns, the header and the rows (lists of stripped cells)."""
    lines = DOC.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if not line.startswith("<!-- published:"):
            continue
        task, constants, kind, *keys = line.removeprefix("<!-- published:").removesuffix("-->").split()
        block = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                break
            block.append([cell.strip() for cell in row.strip().strip("|").split("|")])
        assert len(block) > 2 and set(block[1]) == {"---"}, f"no table under {line}"
        found.append(dict(task=task, constants=constants.split(","), kind=kind, keys=keys, header=block[0]))
        found[-1]["rows"] = block[2:]
    return found


def number(cell: str) -> float | None:
    return None if cell == "-" else float(cell)


def matching(table: dict, label: str, arm: str) -> Published:
    module = importlib.import_module(f"tasks.{table['task']}.published")
    sources = {getattr(module, constant) for constant in table["constants"]}
    rows = [p for p in get_task(table["task"]).published if p.source in sources and (p.label, p.arm) == (label, arm)]
    assert len(rows) == 1, (table["task"], label, arm, len(rows))
    return rows[0]


def test_the_doc_holds_every_published_number_and_only_those():
    tables_ = doc_tables()
    assert {t["task"] for t in tables_} == set(TASKS)
    seen: dict[str, set] = {task: set() for task in TASKS}
    for table in tables_:
        header = table["header"]
        assert header[:2] in (["Thesis row", "Our arm"], ["Row", "Our arm"]), header
        if table["kind"] == "runs":
            (key,) = table["keys"]
            runs_at = [i for i, h in enumerate(header) if h.startswith("Run ")]
            mean_at, diff_at = header.index("Mean"), header.index("Diff to Zero")
            baseline = None
            for cells in table["rows"]:
                p = matching(table, cells[0], cells[1])
                runs = tuple(float(cells[i]) for i in runs_at)
                assert p.runs[key] == runs and p.values[key] == float(cells[mean_at]), p.label
                assert p.values[key] == pytest.approx(statistics.fmean(runs), abs=ROUNDING), p.label
                if "Std" in header:
                    assert round(p.std(key), 3) == float(cells[header.index("Std")]), p.label
                if cells[diff_at] == "-":
                    assert p.arm == "zero" and baseline is None
                    baseline = p.values[key]
                else:
                    assert float(cells[diff_at]) == pytest.approx(p.values[key] - baseline, abs=ROUNDING), p.label
                seen[table["task"]] |= {(p.source, p.label, key, "runs"), (p.source, p.label, key, "value")}
        else:
            assert table["kind"] == "values" and len(header) == 2 + len(table["keys"]), header
            for cells in table["rows"]:
                p = matching(table, cells[0], cells[1])
                for key, cell in zip(table["keys"], cells[2:], strict=True):
                    assert p.values.get(key) == number(cell), (p.label, key)  # a blank ("-"): an absent key
                    if key in p.values:
                        seen[table["task"]].add((p.source, p.label, key, "value"))
    for task in TASKS:
        published = get_task(task).published
        expected = {(p.source, p.label, k, "value") for p in published for k in p.values}
        expected |= {(p.source, p.label, k, "runs") for p in published for k in p.runs}
        assert seen[task] == expected, task  # every module number in the doc, and nothing else


def test_every_row_names_an_arm_of_the_tasks_thesis_preset_in_a_report_column():
    for task in TASKS:
        arms = get_task(task).presets["thesis"].variants
        columns = set(tables.columns(get_task(task).table_metrics))
        for p in get_task(task).published:
            variant = p.arm.removesuffix(" +init")
            assert variant in arms and convs.parse_variant(variant).spec == variant, (task, p.label)
            assert p.arm.endswith(" +init") == ("+" in p.label), (task, p.label)  # the thesis' "+": pretrained
            assert p.values and set(p.values) <= columns and set(p.runs) <= set(p.values), (task, p.label)
            assert all(0 <= v <= 100 and not math.isnan(v) for v in p.values.values()), (task, p.label)  # percent


def test_a_row_matches_its_arm_and_a_pretrained_row_the_arms_started_from_weights():
    hotels = {p.label: p for p in get_task("hotels").published}
    assert hotels["Zero"].matches("zero") and not hotels["Zero"].matches(arm_label("zero", "runs:/abc"))
    assert hotels["Zero+"].matches(arm_label("zero", "runs:/abc")) and not hotels["Zero+"].matches("zero")
    assert not hotels["Zero+"].matches(arm_label("zero_x", "runs:/abc"))
    assert hotels["Gated+ (eq. 3.11)"].matches(arm_label("gated:norm=inside", "torchvision:ResNet50_Weights.V1"))
    assert not hotels["Partial"].matches("partial_1ch") and not hotels["Partial"].matches("partial +init x")
    classification = [p for p in get_task("classification").published if p.arm == "gated:norm=inside"]
    assert [p.label for p in classification] == ["Gated (eq. 3.11)"]  # eq. 3.11 here, eq. 3.12 in segmentation
    assert {p.label for p in get_task("segmentation").published if p.arm == "gated"} == {"WN38_gated (eq. 3.12)"}


def test_the_report_puts_the_pretrained_rows_beside_a_pretrained_arm():
    columns = tables.columns(get_task("hotels").table_metrics)
    pretrained = arm_label("zero", "runs:/0123456789abcdef")
    results = [
        tables.TrialResult(arm, seed, {c: 5.0 + seed for c in columns})
        for arm in ("zero", pretrained)
        for seed in (0, 1)
    ]
    view = tables.build(results, columns, published=get_task("hotels").published).terminal()
    rows = [re.match(r"  (.+?) +\d+\.\d{3}  ([^,]+),", line) for line in view.splitlines()]
    rows = [(m[1].split()[:2], m[2]) for m in rows if m]
    assert rows == [(["zero", "+init"], "Zero+*"), (["zero"], "Zero"), (["zero", "+init"], "Zero+")]
    assert "Partial" not in view  # no partial arm in this sweep
