"""Node loss: a sweep on a 2-node Ray (both nodes on this machine, see ray_nodes.py) loses its worker node mid-trial.

The sweep runs in a subprocess against the cluster (`--address`): the pytest process may hold another Ray session
(the `ray_session` fixture). Each node has 1 CPU and each trial's Train worker takes 1, so the two trials train one
on each node; once the worker node's trial has logged an epoch, every process of that node gets SIGKILL at once.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import tracking

from . import ray_nodes

EPOCHS = 3  # epoch 0 logged before the kill, the kill in epoch 1, epochs 1 and 2 trained after the resume
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


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the nodes' processes through /proc")
def test_lost_worker_node_trial_resumes_on_the_head(tmp_path, record_property):
    """SIGKILL the worker node while its trial trains: the sweep finishes on the head, the lost trial resumes from its
    last checkpoint into the same MLflow run, and every epoch of both trials is logged exactly once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "sweep.log"
    cluster = ray_nodes.start_head(num_cpus=1, env=HEALTH_CHECKS)
    sweep = None
    try:
        cluster.add_worker(num_cpus=1)
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

        # Kill once the trial has checkpointed and logged an epoch: from scratch it would log that epoch again.
        client = MlflowClient(uri)
        deadline = time.monotonic() + 300
        while True:
            assert sweep.poll() is None and time.monotonic() < deadline, f"no epoch logged in time:\n{_tail(log)}"
            run = _run_of_trial(client, trial_id)
            if run and client.get_metric_history(run.info.run_id, "val/top1") and list(train_dir.glob("checkpoint_*")):
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

    # Resumed, not restarted: the epochs logged before the kill are not logged again, and the first epoch trained
    # after it follows them. An epoch is "trained" where it has time/loop_s: the resumed worker backfills an epoch
    # that its checkpoint holds but MLflow lacks (killed between the two) from the checkpoint's history, without it.
    history = client.get_metric_history(lost.info.run_id, "val/top1")
    before = sorted(m.step for m in history if m.timestamp < killed_at * 1000)
    assert before and before == list(range(len(before))) and len(before) < EPOCHS, before
    trained = sorted((m.step, m.timestamp) for m in client.get_metric_history(lost.info.run_id, "time/loop_s"))
    steps = [step for step, _ in trained]
    assert len(steps) == len(set(steps)), trained  # no epoch reported twice
    first_after = min((step, ts) for step, ts in trained if ts > killed_at * 1000)
    assert first_after[0] >= len(before), (first_after, before)  # from scratch it would be epoch 0
    assert set(range(first_after[0], EPOCHS)) <= set(steps)
    resumed_s = min(m.timestamp for m in history if m.timestamp > killed_at * 1000) / 1000 - killed_at
    next_epoch_s = first_after[1] / 1000 - killed_at

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
        "resumed_at_epoch": first_after[0],
        "lost_train_worker_pid": pid,
        "worker_node_processes": " ".join(on_worker),
        "head_processes": " ".join(on_head),
    }
    for key, value in figures.items():
        record_property(key, value)
    print("\nnode loss:", ", ".join(f"{k}={v}" for k, v in figures.items()))
    assert figures["epochs_lost"] == 0 and figures["duplicate_runs"] == 0
