"""What a Ray Train worker process imports: the loop, Ray Train and the trial's own task, nothing of the sweep."""

import subprocess
import sys


def test_a_classification_worker_imports_neither_tune_mlflow_nor_the_other_tasks():
    """A fresh interpreter, as each worker of each trial is: import the module Ray unpickles `worker_loop` from and
    build the trial's task. Ray Tune, MLflow (rank 0 imports it when it logs), scipy, faiss and the other tasks'
    packages stay out; the control shows the same check does see what `orchestrator.trial` pulls in."""
    heavy = ("ray.tune", "mlflow", "scipy", "faiss", "pytorch_metric_learning", "tasks.hotels", "tasks.segmentation")
    probe = (
        "import sys, {module}, tasks; tasks.get_task('classification'); "
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    )

    def loaded(module: str) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-c", probe.format(module=module)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return set(done.stdout.split())

    assert loaded("orchestrator.worker") == set()
    assert {"ray.tune", "mlflow"} <= loaded("orchestrator.trial")  # the Tune function's module does import them
