"""Screenshots of the MLflow UI for the README: a tiny real sweep, its store served, two pages in headless Chromium.

python -m docs.screenshot [--out-dir docs]

Runs classification on the smoke preset (2 arms x 2 seeds x 2 epochs, about a minute or two) into a temporary
folder, serves its store with `orchestrator.ui.serve`, and saves `mlflow_ui.png` (the experiment's runs table, the
sweep's parent run expanded to its trials) and `mlflow_run.png` (the parent run's report, report/report.md) at
1400x900. Needs Playwright's Python package (the `test` extra) and Debian's Chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

from orchestrator import ui
from orchestrator.cli import ArgumentParser, CliError

SIZE = {"width": 1400, "height": 900}
NAME = "demo"
ARMS = ("zero", "partial")
TIMEOUT_MS = 60_000


def run_sweep(root: Path) -> str:
    """The tiny sweep into `root` (store `root/mlflow.db`, Ray storage `root/sweeps`); its tracking URI."""
    from orchestrator import sweep

    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = [
        *("--task", "classification", "--preset", "smoke", "--epochs", "2", "--seeds", "2", "--variants", *ARMS),
        *("--storage", str(root / "sweeps"), "--tracking-uri", uri, "--name", NAME),
    ]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            results = sweep.main(args)
    except BaseException:
        print(out.getvalue())
        raise
    if not results or any(r.status != "ok" for r in results):
        print(out.getvalue())
        raise CliError(f"the demo sweep did not finish every trial: {[r.status for r in results]}")
    return uri


def take(uri: str, out_dir: Path) -> list[Path]:
    """The two screenshots of the store at `uri`, into `out_dir`."""
    try:
        from playwright.sync_api import expect
    except ImportError:
        raise CliError("Playwright is missing: pip install -e '.[test]'") from None
    if not ui.CHROMIUM.is_file():
        raise CliError(f"{ui.CHROMIUM} is missing: apt-get install -y chromium")
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("classification").experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`bench.sweep` = '{NAME}'")
    (parent,) = (r.info.run_id for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags)
    trials = [r.info.run_name for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent]
    with tempfile.TemporaryDirectory() as folder:  # not beside the user's store (--tracking-uri)
        report = Path(client.download_artifacts(parent, "report/report.md", folder)).read_text()
    title = next(line.lstrip("#").strip() for line in report.splitlines() if line.strip())
    expect.set_options(timeout=TIMEOUT_MS)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    with ui.serve(uri) as base_url, ui.browser_page(SIZE["width"], SIZE["height"], TIMEOUT_MS) as page:
        page.goto(ui.runs_table_url(base_url, experiment_id))
        names = page.locator('[col-id="attributes.`Run Name`"]')
        link = names.get_by_role("link", name=NAME, exact=True)
        expect(link).to_be_visible()
        page.locator('[role="row"]', has=link).locator('[col-id="attributes.`Run Name`"] button').first.click()
        for name in trials:
            expect(names.get_by_role("link", name=name, exact=True)).to_be_visible()
        page.mouse.move(0, SIZE["height"] - 1)  # no hover highlight or tooltip in the picture
        saved.append(out_dir / "mlflow_ui.png")
        page.screenshot(path=str(saved[-1]))

        page.goto(ui.run_url(base_url, experiment_id, parent) + "/artifacts")
        page.get_by_text("report", exact=True).click()
        page.get_by_text("report.md", exact=True).click()
        expect(page.get_by_text("report/report.md", exact=True)).to_be_visible()  # the preview's title
        expect(page.get_by_text(title, exact=True).first).to_be_visible()  # the report, rendered
        page.mouse.move(0, SIZE["height"] - 1)
        # Opening the file scrolls the artifact tree and the preview a little: back to their tops.
        page.evaluate("document.querySelectorAll('*').forEach(e => { if (e.scrollTop) e.scrollTop = 0; })")
        page.wait_for_timeout(500)
        saved.append(out_dir / "mlflow_run.png")
        page.screenshot(path=str(saved[-1]))
    return saved


def main(argv: list[str] | None = None) -> list[Path]:
    parser = ArgumentParser(prog="python -m docs.screenshot", description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent, help="where the PNGs go (docs/)")
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help=f"photograph this store's sweep named {NAME!r} (a classification sweep) instead of running one",
    )
    args = parser.parse_args(argv)
    if args.tracking_uri:
        saved = take(args.tracking_uri, args.out_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="mlflow-ui-demo-") as tmp:
            print(f"running a tiny sweep ({' and '.join(ARMS)} x 2 seeds x 2 epochs) into {tmp} ...", flush=True)
            saved = take(run_sweep(Path(tmp)), args.out_dir)
    for path in saved:
        print(f"saved {path} ({path.stat().st_size // 1024} KB)", flush=True)
    return saved


if __name__ == "__main__":
    main()
