"""The MLflow UI of a sweep's store: `python -m orchestrator.ui [--tracking-uri URI] [--port N]`.

Starts `mlflow server` on 127.0.0.1 only, waits until it answers, prints its address and each experiment's runs
table (the parent run is the sweep, its nested runs the trials, the report under the parent run's artifacts,
report/), then stays in the foreground until Ctrl-C. `serve()` does the same for tests and docs/screenshot.py.

The server runs with one uvicorn worker and without MLflow's job runner (GenAI scorers and trace rollups, which a
training store has no use for): it answers in about 6 s here instead of about 20 s. Experiments of a SQLite store
keep their artifacts at an absolute local path (`<db folder>/mlruns/<task>`, see `tracking.beside_store`), which the
server reads directly; artifacts of experiments created through the server go to `<db folder>/mlartifacts`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from orchestrator.cli import ArgumentParser, CliError, default_tracking_uri

DEFAULT_PORT = 5000  # MLflow's own default, and the port the sweep's closing lines link to
HOST = "127.0.0.1"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's: `playwright install` cannot download its own browsers here
# MLflow 3.17 keeps these in the browser's localStorage: no assistant panel opening itself over the page on first
# load, and the classic (model training) view of experiments and runs rather than the GenAI one. Looks only.
BROWSER_STATE = """
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
"""
START_TIMEOUT = 180.0  # seconds until /health answers: about 6 s on an idle 2-core machine, much more when it is busy

# Joins the server's process group and SIGKILLs the whole group (the `mlflow server` CLI, its uvicorn, and itself)
# once the process that started it is gone, so that a parent killed without cleanup (SIGKILL, a crashed test
# session) leaves no server holding the port. A normal exit kills the group, this reaper with it.
REAPER = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.5)
os.killpg(group, signal.SIGKILL)
"""


class UiError(RuntimeError):
    """The MLflow UI cannot be started: no store, a busy port, a server that does not come up."""


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The classic runs table of an experiment (MLflow 3.17 opens experiments in a GenAI view otherwise); child
    runs (trials) are collapsed under their parent run (the sweep)."""
    return f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    return f"{base_url}/#/experiments/{experiment_id}/runs/{run_id}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the working directory, as MLflow reads it), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).resolve()


def check_store(uri: str) -> None:
    """`UiError` when the store cannot be shown: a SQLite file that does not exist, or a plain file store."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise UiError(
            f"no MLflow store at {uri} ({path} does not exist): run a sweep first (`make sweep`, or "
            "`python -m orchestrator.sweep --task classification`), or pass --tracking-uri sqlite:///path/to/mlflow.db"
        )
    if uri.startswith("file:") or "://" not in uri:
        raise UiError(f"tracking URI {uri!r} is a plain file store, which MLflow 3.17 refuses; pass sqlite:///...")


def free_port() -> int:
    """A TCP port nobody listens on now on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """`UiError` naming another port when `port` on 127.0.0.1 is taken (another MLflow UI, a sweep's server...)."""
    if not 0 < port < 65536:
        raise UiError(f"--port {port} is not a TCP port (1-65535)")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a just-stopped server's port is free
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise UiError(
                f"port {port} on {HOST} is busy ({e.strerror}; another MLflow UI?): pass another --port, "
                f"e.g. --port {free_port()}"
            ) from None


def server_command(uri: str, port: int) -> list[str]:
    """`mlflow server` of this interpreter, bound to 127.0.0.1, with one worker (a UI for one user)."""
    store = f"sqlite:///{path}" if (path := sqlite_path(uri)) else uri
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store]
    command += ["--host", HOST, "--port", str(port), "--workers", "1"]
    if path is not None:  # beside the store, not ./mlartifacts of wherever the UI was started
        command += ["--artifacts-destination", str(path.parent / "mlartifacts")]
    return command


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return False


def _tail(log: IO[bytes], lines: int = 15) -> str:
    log.flush()
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the server's process group (uvicorn shuts down cleanly), SIGKILL it after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def serve(
    uri: str, port: int | None = None, *, log: IO[bytes] | None = None, timeout: float = START_TIMEOUT
) -> Iterator[str]:
    """The MLflow UI of store `uri` on 127.0.0.1:`port` (a free port when None) while the block runs; its base URL.

    The server runs in a process group of its own, stopped with it at exit; a reaper in that group kills it when
    this process dies without cleaning up. Its output goes to `log` (a binary file; a temporary one when None);
    `UiError`, with the output's last lines, when it exits or does not answer /health within `timeout` seconds.
    """
    check_store(uri)
    if port is None:
        port = free_port()
    else:
        check_port(port)
    base_url = f"http://{HOST}:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # see the module's docstring
    with contextlib.ExitStack() as stack:
        if log is None:
            log = stack.enter_context(tempfile.TemporaryFile(prefix="mlflow-ui-"))
        process = subprocess.Popen(
            server_command(uri, port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            process_group=0,  # its own group: Ctrl-C in a terminal reaches us, and we stop the whole group
        )
        reapers: list[subprocess.Popen] = []

        @stack.callback
        def stop() -> None:
            _stop(process)
            for reaper in reapers:  # stopped with the group
                reaper.wait()

        reapers.append(
            subprocess.Popen(
                [sys.executable, "-c", REAPER, str(os.getpid()), str(process.pid)],
                stdin=subprocess.DEVNULL,
                process_group=process.pid,
            )
        )
        deadline = time.monotonic() + timeout
        while not _healthy(base_url):
            if process.poll() is not None:
                output = _tail(log)
                if "address already in use" in output.lower():
                    raise UiError(f"port {port} on {HOST} is busy: pass another --port, e.g. --port {free_port()}")
                raise UiError(f"`mlflow server` exited with status {process.returncode}:\n{output}")
            if time.monotonic() > deadline:
                raise UiError(f"`mlflow server` did not answer {base_url}/health within {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.25)
        yield base_url


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 900, timeout_ms: int = 30_000) -> Iterator[Any]:
    """A Playwright page in headless Chromium (`CHROMIUM`) set up for the MLflow UI (`BROWSER_STATE`), for the
    browser test and docs/screenshot.py. Needs Playwright's Python package (the `test` extra)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.add_init_script(BROWSER_STATE)
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


def experiments(base_url: str) -> list[tuple[str, str]]:
    """(id, name) of the server's active experiments but MLflow's empty "Default", through its REST API."""
    request = urllib.request.Request(
        f"{base_url}/api/2.0/mlflow/experiments/search",
        data=json.dumps({"max_results": 1000, "view_type": "ACTIVE_ONLY"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        found = json.load(response).get("experiments", [])
    return sorted((e["experiment_id"], e["name"]) for e in found if e["experiment_id"] != "0")


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m orchestrator.ui", description=__doc__)
    p.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        metavar="URI",
        help="MLflow store, as for the sweep (default: $MLFLOW_TRACKING_URI when set, else sqlite:///mlflow.db)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    uri = args.tracking_uri
    if uri.startswith(("http://", "https://")):
        print(f"{uri} is an MLflow server already: open {uri.rstrip('/')} in a browser", flush=True)
        return
    try:
        check_store(uri)
        check_port(args.port)
        print(f"Starting the MLflow UI of {uri} on {HOST}:{args.port} ...", flush=True)
        with serve(uri, args.port) as base_url:
            print(f"\nMLflow UI: {base_url}", flush=True)
            for experiment_id, name in experiments(base_url):
                print(f"  {name}: {runs_table_url(base_url, experiment_id)}", flush=True)
            print(
                "\nIn an experiment's runs table each sweep is a parent run: expand it (+) for its trials; the "
                "sweep's report is under the parent run's Artifacts, report/.\nCtrl-C stops the server.",
                flush=True,
            )
            misses = 0
            while misses < 5:  # a busy machine may miss one health check; a dead server misses them all
                time.sleep(2)
                misses = 0 if _healthy(base_url) else misses + 1
            raise UiError(f"the MLflow server at {base_url} stopped answering")
    except KeyboardInterrupt:
        print("\nMLflow UI stopped.", flush=True)
    except UiError as e:
        raise CliError(str(e)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
