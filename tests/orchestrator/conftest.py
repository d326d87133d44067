"""One local Ray session for all orchestrator tests (ray.init costs seconds; share it), and one small grid sweep
that many tests read (the tracking, the report, the MLflow UI in a browser)."""

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest

GRID_ARMS = ("zero", "gated:norm=inside", "edge_no7")  # a name, a spec with an option, an alias


@dataclass(frozen=True)
class GridSweep:
    root: Path  # the sweep's folder: its MLflow store (mlflow.db) and Ray storage (sweeps/)
    name: str
    args: list  # the command line it ran with: `sweep.main(args + ["--resume"])` resumes it
    results: list  # what sweep.main returned
    out: str  # what it printed

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def sweep_args(root: Path, name: str) -> list[str]:
    """A 2-epoch classification sweep on the smoke preset, its store and storage under `root`."""
    return [
        *("--task", "classification", "--preset", "smoke", "--epochs", "2"),
        *("--storage", str(root / "sweeps"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--name", name),
    ]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server on 127.0.0.1 (started only for tests that ask for it), see s3_server.py."""
    from .s3_server import S3Server

    server = S3Server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def grid_sweep(ray_session, tmp_path_factory) -> GridSweep:
    """Three thesis arms x 2 seeds x 2 epochs of the smoke classification sweep, run once for the session."""
    from orchestrator import sweep

    root = tmp_path_factory.mktemp("grid-sweep")
    args = sweep_args(root, "grid")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = sweep.main([*args, "--variants", *GRID_ARMS, "--seeds", "2"])
    return GridSweep(root, "grid", args, results, out.getvalue())
