"""Node loss: a sweep on a 2-node Ray (both nodes on this machine, see ray_nodes.py) loses its worker node mid-trial.

The sweep runs in a subprocess against the cluster (`--address`): the pytest process may hold another Ray session
(the `ray_session` fixture). Each node has 1 CPU and each trial's Train worker takes 1, so the two trials train one
on each node; once the worker node's trial has logged an epoch, every process of that node gets SIGKILL at once.

Where a trial's other processes run decides what the loss takes with it. On a cluster (`--address`) its Tune function
asks for no CPU and 1 MiB of Ray's `memory` resource (`SweepSettings.function_resources`: here Train's workers train,
not the function itself as in a local Ray's single-worker trials), and Ray Train pins the trial's controller to the Tune
function's node; the tests steer the Tune functions with the nodes' `memory` resource, not the orchestrator's requests.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import tracking

from . import ray_nodes

MIB = 2**20  # what a trial's Tune function asks of Ray's `memory` resource
EPOCHS = 3  # epoch 0 logged before the kill, the kill in epoch 1, epochs 1 and 2 trained after the resume
RECOVERY_TIMEOUT = 600  # seconds from the kill to the end of the sweep (about 60 s here, on a busy machine)
REPO = Path(__file__).resolve().parents[2]
# The head's GCS marks a node dead after `failure_threshold` missed health checks, `period_ms` apart (Ray's defaults,
# 3000 ms x 5 with a 10 s timeout, take up to 30 s): here about 3 s.
HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def _train_run_of_worker_node(cluster: ray_nodes.Cluster, sweep: subprocess.Popen, log: Path, timeout: float):
    """(pid, Train run name) of the Ray Train worker on the worker node: Train runs each worker in a folder named
    after its run (`train-<trial id>`, see `StorageContext.local_working_directory`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert sweep.poll() is None, f"the sweep ended before a trial ran on the worker node:\n{_tail(log)}"
        for pid, title in cluster.worker.worker_titles().items():
            if title.startswith("ray::RayTrainWorker"):
                try:
                    name = Path(os.readlink(f"/proc/{pid}/cwd")).name
                except OSError:
                    continue
                if name.startswith("train-"):
                    return pid, name
        time.sleep(0.5)
    raise AssertionError(f"no Ray Train worker on the worker node after {timeout} s:\n{_tail(log)}")


def _run_of_trial(client: MlflowClient, trial_id: str):
    runs = client.search_runs(
        [client.get_experiment_by_name("classification").experiment_id],
        filter_string=f"tags.`{tracking.TRIAL_TAG}` = '{trial_id}'",
    )
    return runs[0] if runs else None


def _registered_epoch(train_dir: Path) -> int | None:
    """The epoch of the Train run's latest registered checkpoint (its controller's snapshot), None before one."""
    try:
        snapshot = json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being written
        return None


def _reported_epochs(sweep_dir: Path, trial_id: str) -> list[int]:
    """The epochs a trial reported to Tune, in order: its result.json, one line per report, every attempt."""
    (result,) = sweep_dir.glob(f"run_trial_{trial_id}_*/result.json")
    return [int(json.loads(line)["epoch"]) for line in result.read_text().splitlines() if line.strip()]


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def _lose_worker_node(tmp_path: Path, *, head_args: list[str], worker_args: list[str]) -> dict:
    """Run the sweep on the 2 nodes, SIGKILL the worker node while its trial trains and check that the sweep finishes
    on the head, the lost trial resumed from its last checkpoint into the same MLflow run, and every epoch of both
    trials is logged exactly once; returns what was measured."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "sweep.log"
    cluster = ray_nodes.start_head(num_cpus=1, env=HEALTH_CHECKS, args=head_args)
    sweep = None
    try:
        cluster.add_worker(num_cpus=1, args=worker_args)
        with log.open("wb") as out:
            sweep = subprocess.Popen(
                [
                    *(sys.executable, "-m", "orchestrator.sweep", "--address", cluster.address),
                    *("--task", "classification", "--preset", "smoke", "--epochs", str(EPOCHS)),
                    *("--variants", "zero", "partial", "--seeds", "1", "--max-failures", "3"),
                    *("--storage", str(tmp_path / "sweeps"), "--tracking-uri", uri, "--name", "nodeloss"),
                ],
                cwd=REPO,
                env=cluster.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=ray_nodes.die_with_parent,
            )
        pid, run_name = _train_run_of_worker_node(cluster, sweep, log, timeout=600)
        trial_id = run_name.removeprefix("train-")
        train_dir = tmp_path / "sweeps" / "nodeloss" / "train" / run_name

        # Kill once Ray Train has registered a checkpoint of the trial (its controller's snapshot: what a resumed run
        # starts from; a checkpoint folder alone is not enough) and MLflow holds an epoch.
        client = MlflowClient(uri)
        deadline = time.monotonic() + 300
        while True:
            assert sweep.poll() is None and time.monotonic() < deadline, f"no checkpoint in time:\n{_tail(log)}"
            run = _run_of_trial(client, trial_id)
            checkpointed = _registered_epoch(train_dir)
            if checkpointed is not None and run and client.get_metric_history(run.info.run_id, "val/top1"):
                break
            time.sleep(0.2)
        on_worker = sorted({title.split()[0] for title in cluster.worker.worker_titles().values()})
        on_head = sorted({title.split()[0] for title in cluster.head.worker_titles().values()})
        head_train_workers = {p for p, t in cluster.head.worker_titles().items() if t.startswith("ray::RayTrainWorker")}
        print(f"\nkilling the worker node in {run_name}: its processes {on_worker}; the head's {on_head}", flush=True)
        killed_at = time.time()
        cluster.worker.kill()

        # While the sweep goes on: when the head's GCS marks the node dead, when a new Train worker starts on the head.
        dead_s = restarted_s = None
        while sweep.poll() is None:
            now = time.time() - killed_at
            assert now < RECOVERY_TIMEOUT, (
                f"the sweep did not finish {RECOVERY_TIMEOUT} s after the kill:\n{_tail(log)}"
            )
            if dead_s is None and ray_nodes.alive_nodes(cluster.address) == 1:
                dead_s = now
            if restarted_s is None:
                workers = {p for p, t in cluster.head.worker_titles().items() if t.startswith("ray::RayTrainWorker")}
                if workers - head_train_workers:
                    restarted_s = now
            time.sleep(0.5)
        assert sweep.wait(timeout=900) == 0, _tail(log)
    finally:
        if sweep is not None and sweep.poll() is None:
            for p in ray_nodes.descendants(sweep.pid):
                os.kill(p, 9)
            sweep.wait()
        cluster.stop()

    # MLflow: the sweep's run and one run per trial, no duplicate; both trials FINISHED with every epoch once.
    experiment = client.get_experiment_by_name("classification")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["variant"] for r in children) == ["partial", "zero"]  # 2 trial runs, no duplicate
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "val/top1")
        assert sorted(m.step for m in history) == list(range(EPOCHS))  # every epoch once: none lost, none twice
    lost = next(r for r in children if r.data.tags[tracking.TRIAL_TAG] == trial_id)

    # Resumed, not restarted: the epochs Ray Train reported to Tune (the trial's result.json, in order, across Train's
    # and Tune's retries) come once each, so no epoch before the last registered checkpoint ran again; from scratch
    # epoch 0 would come twice.
    reported = _reported_epochs(tmp_path / "sweeps" / "nodeloss", trial_id)
    assert reported == list(range(EPOCHS)), reported
    assert checkpointed in reported
    history = client.get_metric_history(lost.info.run_id, "val/top1")
    assert min(m.timestamp for m in history) < killed_at * 1000  # an epoch in MLflow before the kill
    # Seconds from the kill: to the trial's first MLflow entry after it (an epoch it trained, or one that its
    # checkpoint holds and MLflow lacked), and to its first epoch trained after it (those carry time/loop_s).
    after = [m.timestamp / 1000 - killed_at for m in history if m.timestamp > killed_at * 1000]
    trained = client.get_metric_history(lost.info.run_id, "time/loop_s")
    trained_after = [m.timestamp / 1000 - killed_at for m in trained if m.timestamp > killed_at * 1000]
    resumed_s, next_epoch_s = min(after), min(trained_after)

    output = log.read_text(errors="replace")
    figures = {
        "faults_survived": 1,  # the worker node, lost with every process on it
        "epochs_lost": EPOCHS - len({m.step for m in history}),
        "duplicate_runs": len(runs) - 3,
        "train_retries": output.count("[FailurePolicy] RETRY"),  # Ray Train's own count, from the driver's log
        "tune_trial_errors": len(list((tmp_path / "sweeps" / "nodeloss").glob("run_trial_*/error.txt"))),
        "node_marked_dead_s": round(dead_s, 1) if dead_s is not None else None,
        "train_worker_restarted_s": round(restarted_s, 1) if restarted_s is not None else None,
        "trial_resumed_s": round(resumed_s, 1),
        "next_epoch_reported_s": round(next_epoch_s, 1),
        "checkpoint_epoch_at_kill": checkpointed,
        "lost_train_worker_pid": pid,
        "worker_node_processes": " ".join(on_worker),
        "head_processes": " ".join(on_head),
    }
    print("\nnode loss:", ", ".join(f"{k}={v}" for k, v in figures.items()))
    assert figures["epochs_lost"] == 0 and figures["duplicate_runs"] == 0
    return figures


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the nodes' processes through /proc")
def test_lost_worker_node_trial_resumes_on_the_head(tmp_path, record_property):
    """The worker node offers 1 byte of `memory`, so both Tune functions, and the Train controllers pinned to them,
    run on the head: the lost node takes one Train worker with it, and Ray Train restarts that on the head from the
    trial's last checkpoint (under the trial's FailureConfig; Tune sees no failure)."""
    figures = _lose_worker_node(tmp_path, head_args=[], worker_args=["--memory", "1"])
    for key, value in figures.items():
        record_property(key, value)
    assert "ray::ImplicitFunc" not in figures["worker_node_processes"]
    assert figures["tune_trial_errors"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the nodes' processes through /proc")
def test_lost_node_with_the_tune_functions_retries_the_trials_on_the_head(tmp_path, record_property):
    """The head offers 3 MiB of `memory`, room for the two Tune functions, the worker node gigabytes: Ray packs both on
    the emptier worker node (checked below), so the node takes the Tune functions and the Train controllers with it.
    Tune retries both trials on the head (its FailureConfig) and each new controller resumes its Train run by name
    from the storage: each epoch once, in the same MLflow runs.

    Needs Ray's State API (the dashboard of ray[default]): Train's PlacementGroupCleaner asks it whether a controller
    is alive and removes a dead one's worker placement group. With ray[tune,train] alone it cannot ask, the lost
    controllers' placement groups (Ray keeps them until the job ends) hold the head's CPU, and the retried trials
    wait forever (seen here three times: PENDING until the test gave up, up to 25 minutes).

    A Train worker on the head whose controller was lost keeps training until Ray kills it (seconds later): an epoch
    it finishes then reaches MLflow but not the controller's checkpoint list, so the retry trains and logs it again
    (1 run in 3 here) unless orchestrator/loop.py skips the epochs MLflow already holds."""
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:
        pytest.skip(
            f"needs ray[default] (the State API) for Train's PlacementGroupCleaner: {get_dashboard_dependency_error()}"
        )
    figures = _lose_worker_node(tmp_path, head_args=["--memory", str(3 * MIB)], worker_args=[])
    for key, value in figures.items():
        record_property(key, value)
    assert "ray::ImplicitFunc" in figures["worker_node_processes"], "the Tune functions were not on the worker node"
    assert figures["tune_trial_errors"] >= 1  # Tune saw the trial fail and retried it
