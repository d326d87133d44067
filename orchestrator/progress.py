"""What a sweep prints while it runs: one line per trial event, from the driver.

Started, resumed, each epoch (k/N with the headline metric), finished, failed, restarted after a crash: a Ray Tune
callback turns Tune's events into these lines, so the terminal reads the same whether the trials run here or on a
cluster. Ray's own output (Tune's status tables and config boxes, Train's checkpoint paths, the workers' logs) goes
to Ray's log files unless the sweep runs with `--verbose` (`sweep.main` starts Ray with `log_to_driver` off and gives
Tune `verbose=0`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import ray.tune

import tasks

from . import report, tables
from .config import SweepSettings
from .loop import FAILURE_KEY

log = logging.getLogger("orchestrator.sweep")


class TrialProgress(ray.tune.Callback):
    """Logs each trial's events as one line, `<arm> seed <k>: <event>`; Optuna trials add their sampled values."""

    def __init__(self) -> None:
        self._trials: dict[str, tuple[str, int, str]] = {}  # trial id: (label, epochs, headline metric)

    def __getstate__(self) -> dict[str, Any]:
        return {"_trials": {}}  # saved with Tune's state for --resume; what it caches is rebuilt from the configs

    def describe(self, trial: Any) -> tuple[str, int, str]:
        """(label, epochs, headline metric) of a Tune trial, from its config."""
        if trial.trial_id not in self._trials:
            config = trial.config
            cfg = SweepSettings.from_dict(config[SweepSettings.KEY]).trial_config(config)
            task = tasks.get_task(cfg.task)
            epochs = task.presets[cfg.preset].updated(**cfg.overrides).epochs
            sampled = " ".join(
                f"{k.removeprefix('space.')}={_short(v)}" for k, v in config.items() if k.startswith("space.")
            )
            label = f"{report.arm_label(cfg.variant, cfg.init)} seed {cfg.seed}" + (f" [{sampled}]" if sampled else "")
            self._trials[trial.trial_id] = (label, epochs, task.metric)
        return self._trials[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        label, epochs, _ = self.describe(trial)
        epoch = (trial.last_result or {}).get("epoch")
        if isinstance(epoch, int | float) and not (trial.last_result or {}).get(FAILURE_KEY):
            log.info("%s: resumed after epoch %d/%d", label, int(epoch) + 1, epochs)
        else:
            log.info("%s: started", label)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(FAILURE_KEY) or "epoch" not in result:
            return  # a diverged trial's last report: on_trial_complete says why it failed
        label, epochs, metric = self.describe(trial)
        value = result.get(metric)
        shown = f"  {metric} {value:.2f}" if isinstance(value, int | float) and math.isfinite(value) else ""
        seconds = result.get("time/epoch_s")
        pace = f"  {seconds:.0f} s/epoch" if isinstance(seconds, int | float) else ""
        log.info("%s: epoch %d/%d%s%s", label, int(result["epoch"]) + 1, epochs, shown, pace)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        label, epochs, metric = self.describe(trial)
        last = trial.last_result or {}
        if last.get(FAILURE_KEY):
            log.warning("%s: failed: %s", label, last[FAILURE_KEY])
            return
        best = last.get(f"best/{tables.summary_name(metric)}")
        if last.get("epoch") == epochs - 1:
            shown = f", best {metric} {best:.2f}" if isinstance(best, int | float) else ""
            log.info("%s: finished%s", label, shown)
        else:
            log.info("%s: ended after epoch %s/%d", label, int(last["epoch"]) + 1 if "epoch" in last else 0, epochs)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        label, _, _ = self.describe(trial)
        log.warning("%s: crashed (%s); restarting from its last checkpoint", label, _error_line(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        label, _, _ = self.describe(trial)
        where = f" (traceback: {trial.error_file})" if trial.error_file else ""
        log.error("%s: failed: %s%s", label, _error_line(trial), where)


def _error_line(trial: Any) -> str:
    """The last line of the trial's error (the exception and its message), or a pointer to Ray's logs."""
    try:
        error = trial.get_error()
    except Exception:  # noqa: BLE001 - a missing or unreadable error file must not break the sweep's output
        error = None
    lines = [line for line in str(error or "").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "see Ray's logs"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
