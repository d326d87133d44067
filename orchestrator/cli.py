"""What every command line of the project shares: one error style, and logging set-up for the project's loggers."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

PROJECT_LOGGERS = ("convs", "tasks", "orchestrator", "benchmarks")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3.17 refuses a plain ./mlruns file store


def default_tracking_uri() -> str:
    """The MLflow store every command uses by default: $MLFLOW_TRACKING_URI when set (the cluster YAMLs set it on
    the head to its MLflow server), else `sqlite:///mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class CliError(SystemExit):
    """A bad command line or an unusable environment: exits with status 1 and a message, never a traceback.

    Raised by our own checks and by argparse's (see `ArgumentParser`), so every mistake reads the same way.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")
        self.message = message


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: `error: <what> (see <prog> --help)` as a `CliError`."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)")


def setup_logging(level: int = logging.INFO) -> None:
    """Send the project's log records (convs, tasks, orchestrator, benchmarks) to stderr with a timestamp.

    Only the project's loggers get a handler: Ray's and MLflow's keep their own settings. Idempotent, so the CLI
    and every Ray worker process can call it.
    """
    formatter = logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S")
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_project", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(formatter)
            handler._project = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False


@contextlib.contextmanager
def temporary_env(key: str, value: str) -> Iterator[None]:
    """`os.environ[key] = value` inside the block, the previous value (or none) restored after it."""
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
