"""The MLflow UI of a real sweep (the session's `grid_sweep`), seen in headless Chromium: the experiment, the sweep's
parent run with its trials nested under it, a trial's metric chart and the sweep's report among the parent run's
artifacts. And `python -m orchestrator.ui` itself: its links, its errors, and no server left behind.

Needs Playwright's Python package (the `test` extra) and Debian's Chromium (`playwright install` cannot download
browsers here): skipped without them, except in CI (`CI` set, as .ci/run does), where a missing browser fails.
Screenshots of each page go to the test's tmp folder, and to $BENCH_SCREENSHOTS when set.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from orchestrator import ui
from orchestrator.cli import CliError

TIMEOUT_MS = 30_000


def browser_or_skip():
    """Playwright's sync API, or a skip (a failure in CI) saying how to install what is missing."""
    missing = []
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
        missing.append("Playwright's Python package (pip install -e '.[test]')")
    if not ui.CHROMIUM.is_file():
        missing.append(
            f"{ui.CHROMIUM} (apt-get install -y chromium; `playwright install` cannot download browsers here)"
        )
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_api


class Sweep:
    """The grid sweep's ids in MLflow: experiment, parent run, trial runs {id: name}."""

    def __init__(self, grid_sweep) -> None:
        client = MlflowClient(grid_sweep.tracking_uri)
        self.experiment_id = client.get_experiment_by_name("classification").experiment_id
        runs = client.search_runs([self.experiment_id], filter_string=f"tags.`bench.sweep` = '{grid_sweep.name}'")
        parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
        assert len(parents) == 1, [r.info.run_name for r in parents]
        self.parent = parents[0].info.run_id
        self.trials = {
            r.info.run_id: r.info.run_name for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == self.parent
        }
        self.name = grid_sweep.name
        self.uri = grid_sweep.tracking_uri
        self.client = client


@pytest.fixture(scope="module")
def sweep(grid_sweep) -> Sweep:
    return Sweep(grid_sweep)


@dataclass
class Ui:
    """One browser page on the sweep's MLflow UI, and where its screenshots go."""

    page: Any
    base_url: str
    shots: list[Path]

    def screenshot(self, name: str) -> None:
        first = self.shots[0] / f"{name}.png"
        self.page.screenshot(path=str(first))
        for folder in self.shots[1:]:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(first, folder / first.name)


@pytest.fixture(scope="module")
def browser_ui(grid_sweep, tmp_path_factory) -> Iterator[Ui]:
    """One page in headless Chromium for the module, on the grid sweep's MLflow UI (`ui.serve`, a free port)."""
    sync_api = browser_or_skip()
    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    shots = [tmp_path_factory.mktemp("ui-screenshots")]
    if os.environ.get("BENCH_SCREENSHOTS"):
        shots.append(Path(os.environ["BENCH_SCREENSHOTS"]))
    with ui.serve(grid_sweep.tracking_uri) as base_url, ui.browser_page(timeout_ms=TIMEOUT_MS) as page:
        yield Ui(page, base_url, shots)


@pytest.mark.slow
def test_runs_table_shows_the_sweep_and_its_trials(browser_ui, sweep):
    from playwright.sync_api import expect

    page = browser_ui.page

    assert len(sweep.trials) == 6  # 3 arms x 2 seeds
    page.goto(ui.runs_table_url(browser_ui.base_url, sweep.experiment_id))
    expect(page.get_by_text("classification", exact=True).first).to_be_visible()
    names = page.locator('[col-id="attributes.`Run Name`"]')
    parent = names.locator(f'a[href="#/experiments/{sweep.experiment_id}/runs/{sweep.parent}"]')
    expect(parent).to_have_text(sweep.name)
    first_trial = names.get_by_role("link", name=next(iter(sweep.trials.values())), exact=True)
    expect(first_trial).to_have_count(0)  # collapsed under the parent
    browser_ui.screenshot("runs_table")

    page.locator('[role="row"]', has=parent).locator('[col-id="attributes.`Run Name`"] button').first.click()
    for name in sweep.trials.values():
        expect(names.get_by_role("link", name=name, exact=True)).to_be_visible()
    assert any(name.startswith("zero-seed0-") for name in sweep.trials.values())
    browser_ui.screenshot("runs_table_expanded")


@pytest.mark.slow
def test_a_trial_shows_its_metric_chart(browser_ui, sweep):
    from playwright.sync_api import expect

    page = browser_ui.page

    trial, name = next((i, n) for i, n in sweep.trials.items() if n.startswith("zero-seed0-"))
    page.goto(ui.run_url(browser_ui.base_url, sweep.experiment_id, trial))
    expect(page.get_by_text(name, exact=True).first).to_be_visible()
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_placeholder("Search metric charts").fill("val/top1")
    expect(page.locator('h4[title="val/top1"]')).to_be_visible()
    expect(page.get_by_text(f"{name} (val/top1)")).to_be_visible()  # the chart's legend
    expect(page.locator(".js-plotly-plot .js-line").first).to_be_visible()  # a plotted curve
    browser_ui.screenshot("trial_metrics")


@pytest.mark.slow
def test_the_parent_run_shows_the_report(browser_ui, sweep, tmp_path):
    from playwright.sync_api import expect

    page = browser_ui.page

    logged = [f.path for f in sweep.client.list_artifacts(sweep.parent, "report")]
    assert "report/report.md" in logged, f"the sweep's parent run has no report/report.md (has {logged}): not the UI"
    page.goto(ui.run_url(browser_ui.base_url, sweep.experiment_id, sweep.parent) + "/artifacts")
    expect(page.get_by_text(sweep.name, exact=True).first).to_be_visible()
    page.get_by_text("report", exact=True).click()
    page.get_by_text("report.md", exact=True).click()
    expect(page.get_by_text("report/report.md", exact=True)).to_be_visible()  # the preview's title
    text = Path(sweep.client.download_artifacts(sweep.parent, "report/report.md", str(tmp_path))).read_text()
    first_line = next(line.lstrip("#").strip() for line in text.splitlines() if line.strip())
    expect(page.get_by_text(first_line, exact=True).first).to_be_visible()  # the report itself, rendered
    browser_ui.screenshot("parent_report")


@pytest.mark.slow
def test_the_command_prints_the_links_and_leaves_no_server(grid_sweep, sweep):
    """`python -m orchestrator.ui` prints the runs table's link; SIGKILLed, it takes its server with it."""
    port = ui.free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.ui", "--tracking-uri", grid_sweep.tracking_uri, "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out = ""
        for line in process.stdout:
            out += line
            if "Ctrl-C" in line:
                break
        assert ui.runs_table_url(f"http://127.0.0.1:{port}", sweep.experiment_id) in out, out
        process.send_signal(signal.SIGKILL)  # no cleanup: the reaper must stop the server
        deadline = time.monotonic() + 15
        while port_open(port):
            assert time.monotonic() < deadline, "the MLflow server outlived `python -m orchestrator.ui`"
            time.sleep(0.5)
    finally:
        process.kill()
        process.wait()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_missing_store_says_to_run_a_sweep(tmp_path):
    with pytest.raises(CliError, match="make sweep"):
        ui.main(["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])


def test_a_busy_port_names_another(tmp_path):
    (tmp_path / "mlflow.db").touch()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(CliError, match=rf"port {port} .* busy.*--port \d+"):
            ui.main(["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)])
