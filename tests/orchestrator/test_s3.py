"""--storage s3:// and --artifact-location s3:// against moto's S3 server on 127.0.0.1, with AWS_ENDPOINT_URL alone
selecting it: one real sweep (Tune state, checkpoints, MLflow artifacts in the bucket; resumed from it; no
planted secret anywhere) and a two-worker one (Ray Train's state and checkpoints in the bucket), the checks made
before Ray starts, and the shared-storage check of a local path."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.store.artifact import s3_artifact_repo
from mlflow.tracking import MlflowClient

from orchestrator import storage, sweep, tracking
from orchestrator.cli import CliError

from .s3_server import BUCKET, FAKE, SECRETS, S3Server, point_at

NAME = "s3sweep"
DDP_NAME = "s3ddp"  # a sweep of one two-worker trial: through Ray Train, not the Tune function alone
STORAGE = f"s3://{BUCKET}/sweeps"
ARTIFACTS = f"s3://{BUCKET}/mlflow"
VARIANTS = ("zero", "partial")


@pytest.fixture
def s3_env(moto_s3, monkeypatch, tmp_path) -> S3Server:
    """The AWS variables pointing at moto (fake credentials), and the bucket."""
    point_at(monkeypatch, moto_s3, tmp_path)
    moto_s3.ensure_bucket()
    return moto_s3


def plan_of(tmp_path, *extra: str) -> sweep.Plan:
    args = sweep.get_args_parser().parse_args(
        ["--task", "classification", "--preset", "smoke", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", *extra]
    )
    return sweep.plan(args, cuda=False)


# one sweep on S3 -----------------------------------------------------------------------------------------------------


@dataclass
class S3Sweep:
    server: S3Server
    tracking_uri: str
    results: list
    resumed: list
    runs: dict  # run id -> (status, number of val/top1 values), after the first run
    objects: dict  # bucket key -> size, after the first run
    output: str  # everything both runs printed (stdout and stderr, ours, Ray's and MLflow's)
    ray_results: list[Path]  # the local files of Tune and Train results (Ray's staging of what goes to the storage)
    workers_env: dict  # the planted secrets as a Ray worker sees them
    ddp: list  # the results of the two-worker sweep (its own MLflow store: ddp_tracking_uri)
    ddp_tracking_uri: str


@contextlib.contextmanager
def _captured_fds(request, path: Path):
    """stdout and stderr at the file-descriptor level into `path` (Ray's log stream and C++ writes included), with
    pytest's own capture set aside meanwhile (a module fixture cannot use capfd)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext(), open(path, "wb") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            time.sleep(6)  # Ray forwards the workers' last lines up to 5 s later (RAY_DEDUP_LOGS_AGG_WINDOW_S)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _ray_seeing(request, names: list[str]) -> tuple:
    """The shared Ray session with its workers started in this environment, and the values of `names` a worker
    sees. Ray's processes inherit the variables of the process that started Ray, so they must be set first: if an
    earlier test started Ray, it is restarted."""
    ray = request.getfixturevalue("ray_session")

    @ray.remote(num_cpus=0)
    def read(keys):
        return {k: os.environ.get(k) for k in keys}

    if ray.get(read.remote(names)) != {k: os.environ.get(k) for k in names}:
        ray.shutdown()
        ray.init(num_cpus=2, configure_logging=False)  # as the ray_session fixture does, which shuts it down
    return ray, ray.get(read.remote(names))


@pytest.fixture(scope="module")
def s3_sweep(request, moto_s3, tmp_path_factory) -> S3Sweep:
    root = tmp_path_factory.mktemp("s3sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        point_at(mp, moto_s3, root)
        moto_s3.ensure_bucket()
        ray, seen = _ray_seeing(request, ["AWS_ENDPOINT_URL", *SECRETS])
        args = ["--task", "classification", "--preset", "smoke", "--epochs", "2", "--variants", *VARIANTS]
        args += ["--seeds", "1", "--storage", STORAGE, "--artifact-location", ARTIFACTS]
        args += ["--tracking-uri", uri, "--name", NAME]
        with _captured_fds(request, root / "output.txt"):
            results = sweep.main(args)
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("classification")
            runs = {
                r.info.run_id: (r.info.status, len(client.get_metric_history(r.info.run_id, "val/top1")))
                for r in client.search_runs([experiment.experiment_id])
            }
            objects = moto_s3.objects()
            resumed = sweep.main(["--resume", "--name", NAME, "--storage", STORAGE])
            ddp_uri = f"sqlite:///{root / 'ddp.db'}"
            ddp_args = ["--task", "classification", "--preset", "smoke", "--epochs", "2", "--variants", "zero"]
            ddp_args += ["--seeds", "1", "--workers-per-trial", "2", "--storage", STORAGE, "--tracking-uri", ddp_uri]
            ddp = sweep.main([*ddp_args, "--name", DDP_NAME])
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    ray_results = [f for f in (session / "artifacts").rglob("*") if f.is_file() and NAME in str(f)]
    output = (root / "output.txt").read_text(errors="replace")
    workers_env = {k: v for k, v in seen.items() if k in SECRETS}
    return S3Sweep(moto_s3, uri, results, resumed, runs, objects, output, ray_results, workers_env, ddp, ddp_uri)


def _children(s: S3Sweep):
    client = MlflowClient(s.tracking_uri)
    experiment = client.get_experiment_by_name("classification")
    runs = client.search_runs([experiment.experiment_id])
    return client, experiment, [r for r in runs if "mlflow.parentRunId" in r.data.tags], runs


@pytest.mark.slow
def test_sweep_on_s3_finishes_every_trial(s3_sweep):
    assert sorted((r.variant, r.seed, r.status) for r in s3_sweep.results) == [("partial", 0, "ok"), ("zero", 0, "ok")]
    assert all(r.metrics["epoch"] == 1 for r in s3_sweep.results)
    assert "difference to zero" in s3_sweep.output


@pytest.mark.slow
def test_tune_state_and_checkpoints_land_in_the_bucket(s3_sweep):
    keys = set(s3_sweep.objects)
    prefix = f"sweeps/{NAME}/"
    saved = json.loads(s3_sweep.server.read(prefix + sweep.ARGS_FILE))
    assert saved["storage"] == STORAGE and saved["artifact_location"] == ARTIFACTS and saved["name"] == NAME
    assert any(k.startswith(prefix + "experiment_state") for k in keys)  # Tune's state: what --resume restores
    assert prefix + "tuner.pkl" in keys
    _, _, children, _ = _children(s3_sweep)
    trial_ids = sorted(c.data.tags[tracking.TRIAL_TAG] for c in children)
    assert len(trial_ids) == 2
    for trial_id in trial_ids:
        (results,) = [k for k in keys if k.startswith(f"{prefix}run_trial_{trial_id}_") and k.endswith("/result.json")]
        # Each epoch's checkpoint went to the bucket before its report (Tune names it in the report)...
        reports = [json.loads(line) for line in s3_sweep.server.read(results).splitlines() if line.strip()]
        assert [r["checkpoint_dir_name"] for r in reports] == ["checkpoint_000000", "checkpoint_000001"]
        # ...but a finished trial's resume checkpoint is gone (unfinished ones keep theirs: test_sweep's resume tests)
        assert not [k for k in keys if k.startswith(results.removesuffix("result.json") + "checkpoint_")]
    assert not [k for k in s3_sweep.server.objects() if storage.MARKER_PREFIX in k]  # the write checks cleaned up


@pytest.mark.slow
def test_mlflow_artifacts_land_in_the_bucket(s3_sweep, s3_env):
    """The artifacts are in the bucket, and MLflow's client lists them. The listing runs with the environment
    pointing at moto again (s3_env): the sweep's fixture restored it on exit. MLflow keeps its boto client for up
    to 5 minutes, so without the variables this read passed or went to the real AWS depending on the clock; the
    cache is emptied so that the read builds its client from the environment every time."""
    s3_artifact_repo._cached_get_s3_client.cache_clear()
    client, experiment, children, runs = _children(s3_sweep)
    assert experiment.artifact_location == ARTIFACTS
    keys = set(s3_sweep.server.objects(prefix="mlflow/"))
    for run in runs:
        assert run.info.artifact_uri == f"{ARTIFACTS}/{run.info.run_id}/artifacts"
    for child in children:
        base = f"mlflow/{child.info.run_id}/artifacts/"
        assert {base + "checkpoints/best.pt", base + "summary.json", base + "confusion_matrix.csv"} <= keys
        summary = json.loads(s3_sweep.server.read(base + "summary.json"))
        assert isinstance(summary, dict) and summary
        assert {"checkpoints", "summary.json"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert f"mlflow/{parent.info.run_id}/artifacts/report/report.md" in keys


@pytest.mark.slow
def test_resume_reads_the_sweep_back_from_s3(s3_sweep):
    """`--resume --name X --storage s3://...` alone: the saved arguments and Tune's state come back from the bucket,
    the finished trials are kept (nothing trains again) and no MLflow run is added."""
    before = sorted((r.variant, r.seed, r.status, r.metrics["epoch"]) for r in s3_sweep.results)
    assert sorted((r.variant, r.seed, r.status, r.metrics["epoch"]) for r in s3_sweep.resumed) == before
    _, _, children, runs = _children(s3_sweep)
    assert {r.info.run_id for r in runs} == set(s3_sweep.runs)  # the same runs, none added
    assert all(s3_sweep.runs[c.info.run_id] == ("FINISHED", 2) for c in children)
    client = MlflowClient(s3_sweep.tracking_uri)
    assert all(len(client.get_metric_history(c.info.run_id, "val/top1")) == 2 for c in children)
    trials = s3_sweep.server.objects(prefix=f"sweeps/{NAME}/run_trial_")  # no report and no checkpoint added
    assert trials == {k: v for k, v in s3_sweep.objects.items() if k.startswith(f"sweeps/{NAME}/run_trial_")}


@pytest.mark.slow
def test_a_two_worker_trial_keeps_ray_train_state_in_the_bucket_and_drops_its_checkpoints(s3_sweep):
    """A trial of two workers trains through Ray Train, whose run state and checkpoints go to the bucket under
    train/; once the trial has finished, its resume checkpoints are gone from there, and nothing was checkpointed
    through Tune."""
    (result,) = s3_sweep.ddp
    assert result.status == "ok" and result.metrics["epoch"] == 1
    prefix = f"sweeps/{DDP_NAME}/"
    keys = set(s3_sweep.server.objects(prefix=prefix))
    train = f"{prefix}train/train-{result.trial_id}/"
    # Train's run state is in the bucket, and names the checkpoints Train wrote there: they are gone.
    snapshot = json.loads(s3_sweep.server.read(train + "checkpoint_manager_snapshot.json"))
    written = {c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]}
    assert written and not [k for k in keys if any(k.startswith(train + name) for name in written)]
    assert not [k for k in keys if re.match(rf"{prefix}run_trial_[^/]+/checkpoint_", k)]
    client = MlflowClient(s3_sweep.ddp_tracking_uri)
    (child,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("classification").experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    ]
    assert child.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val/top1")) == [0, 1]


@pytest.mark.slow
def test_no_planted_secret_reaches_output_storage_ray_results_or_mlflow(s3_sweep):
    """Fake AWS and MLflow credentials were in the environment of the driver and of every Ray worker (the AWS ones
    signed every request to moto). None may appear in what the sweep printed, in any object of the bucket (Tune's
    state and results, Train's checkpoints, the saved arguments, MLflow's artifacts), in the local files of Tune's
    and Train's results, or in MLflow's store (every param, tag, metric name; the raw SQLite file too).

    Ray's own session logs (raylet, GCS, worker logs) are Ray's business, not what this project writes, and are not
    scanned."""
    found = []

    def scan(where: str, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        found.extend(f"{name} in {where}" for name, value in SECRETS.items() if value.encode() in data)

    scan("a self-check", f"x{SECRETS['AWS_SESSION_TOKEN']}x")
    assert found == ["AWS_SESSION_TOKEN in a self-check"]
    found.clear()
    scan("the sweep's stdout/stderr", s3_sweep.output)
    bucket = s3_sweep.server.objects()
    assert any(k.startswith("mlflow/") for k in bucket) and any(k.startswith("sweeps/") for k in bucket)
    _, _, _, runs = _children(s3_sweep)
    assert all(r.info.artifact_uri.startswith(ARTIFACTS) for r in runs)  # so every MLflow artifact is scanned here
    for key in bucket:
        scan(f"s3://{BUCKET}/{key}", key)
        scan(f"s3://{BUCKET}/{key}", s3_sweep.server.read(key))
    assert any(f.name == "result.json" for f in s3_sweep.ray_results), "found no local Tune results to scan"
    for path in s3_sweep.ray_results:
        scan(str(path), path.read_bytes())
    client, experiment, _, runs = _children(s3_sweep)
    scan("the experiment's tags and location", json.dumps([experiment.tags, experiment.artifact_location]))
    for run in runs:
        scan(f"run {run.info.run_id} params", json.dumps(run.data.params))
        scan(f"run {run.info.run_id} tags", json.dumps(run.data.tags))
        scan(f"run {run.info.run_id} metric names", json.dumps(sorted(run.data.metrics)))
    scan("the MLflow SQLite store", Path(s3_sweep.tracking_uri.removeprefix("sqlite:///")).read_bytes())
    assert found == []
    assert s3_sweep.workers_env == {k: FAKE[k] for k in SECRETS}  # they were there to leak, in every Ray worker


# shared storage ------------------------------------------------------------------------------------------------------


def test_marker_check_on_a_node_that_cannot_see_the_storage(tmp_path):
    """The per-node part of the shared-storage check (a two-node cluster is not available here)."""
    assert not storage.marker_visible(str(tmp_path / "not-mounted" / ".bench-check-x"), "token")
    marker = tmp_path / ".bench-check-x"
    marker.write_text("token")
    assert storage.marker_visible(str(marker), "token")
    assert not storage.marker_visible(str(marker), "another check's token")  # a stale marker does not count
    message = storage.shared_storage_error(str(tmp_path), {"f" * 56: "10.0.0.7"}, 3)
    assert f"--storage {tmp_path} is a local path" in message and "1 of the cluster's 3 nodes" in message
    assert "10.0.0.7 (node ffffffffffff)" in message and "s3://" in message and "gs://" in message


@pytest.mark.slow
def test_pinned_marker_check_names_the_node_that_cannot_see_it(s3_sweep, tmp_path):
    """The Ray part on the one real node (after the S3 sweep, which set up the Ray session's environment)."""
    import ray

    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    marker = tmp_path / ".bench-check-y"
    assert storage.nodes_missing_marker(nodes, str(marker), "y") == sorted(nodes)
    marker.write_text("y")
    assert storage.nodes_missing_marker(nodes, str(marker), "y") == []
    storage.check_shared_storage(str(tmp_path / "one-node"))  # one node: nothing to check, nothing written
    assert not (tmp_path / "one-node").exists()


# checks before Ray starts -------------------------------------------------------------------------------------------


def test_a_missing_bucket_is_refused_before_ray_starts(s3_env, tmp_path):
    with pytest.raises(CliError) as caught:
        sweep.check_services(plan_of(tmp_path, "--storage", "s3://no-such-bucket/sweeps"))
    message = caught.value.message
    assert "--storage s3://no-such-bucket/sweeps" in message and s3_env.url in message
    assert "bucket 'no-such-bucket' does not exist" in message and "aws s3 mb s3://no-such-bucket" in message
    with pytest.raises(CliError, match=r"--artifact-location s3://no-artifacts/m .*bucket 'no-artifacts' does not"):
        sweep.check_services(plan_of(tmp_path, "--storage", STORAGE, "--artifact-location", "s3://no-artifacts/m"))
    sweep.check_services(plan_of(tmp_path, "--storage", STORAGE, "--artifact-location", ARTIFACTS))  # both fine


def test_the_endpoint_comes_from_aws_endpoint_url_s3_too(s3_env, monkeypatch):
    """boto3 (the check) and pyarrow (Ray) both prefer the S3-specific variable."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.url)
    storage.check_storage(STORAGE)


def test_refused_credentials_and_a_read_only_role_are_refused(s3_env, monkeypatch):
    """moto checks keys, signatures and IAM policies once told to: an unknown key, a wrong secret, and a user that
    may list and read but not write."""
    iam = s3_env.iam()
    user = f"reader-{os.getpid()}"
    iam.create_user(UserName=user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
            }
        ],
    }
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    s3_env.require_auth(True)
    try:
        with pytest.raises(CliError, match=r"credentials were refused \(InvalidAccessKeyId") as caught:
            storage.check_storage(STORAGE)
        assert "AWS_ACCESS_KEY_ID" in caught.value.message and FAKE["AWS_SECRET_ACCESS_KEY"] not in caught.value.message
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        with pytest.raises(CliError, match=r"credentials were refused \(SignatureDoesNotMatch") as caught:
            storage.check_storage(STORAGE)
        assert FAKE["AWS_SECRET_ACCESS_KEY"] not in caught.value.message
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(CliError, match="access denied when trying to write under s3://bench/sweeps") as caught:
            storage.check_storage(STORAGE)
        assert "s3:PutObject and s3:DeleteObject on arn:aws:s3:::bench/sweeps/*" in caught.value.message
        assert key["SecretAccessKey"] not in caught.value.message
    finally:
        s3_env.require_auth(False)


def test_missing_credentials_and_an_unreachable_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(CliError, match=r"--storage s3://bench/sweeps \(endpoint http://127.0.0.1:9\): cannot reach"):
        storage.check_storage(STORAGE)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.url)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    with pytest.raises(CliError, match="no usable AWS credentials.*set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        storage.check_storage(STORAGE)


def test_uri_forms_refused_with_the_fix(tmp_path):
    with pytest.raises(CliError, match=r"query .* not supported.*AWS_ENDPOINT_URL"):
        storage.check_storage("s3://bench/sweeps?endpoint_override=localhost:9000")
    with pytest.raises(CliError, match="holds credentials") as caught:
        storage.check_storage("s3://AKIA:hunter2@bench/sweeps")
    assert "hunter2" not in caught.value.message
    with pytest.raises(CliError, match="no bucket"):
        storage.check_storage("s3:///sweeps")
    with pytest.raises(CliError, match="--artifact-location 'mlruns': expected a URI"):
        sweep.check_services(plan_of(tmp_path, "--storage", str(tmp_path), "--artifact-location", "mlruns"))


def test_an_experiment_kept_elsewhere_is_an_error(tmp_path):
    """MLflow cannot move an experiment's artifacts: --artifact-location must agree with an existing experiment."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    first = tracking.ensure_experiment(uri, "classification", "s3://bench/a")
    assert tracking.ensure_experiment(uri, "classification", "s3://bench/a/") == first
    assert tracking.ensure_experiment(uri, "classification") == first  # no flag: wherever it is
    with pytest.raises(tracking.TrackingError, match=r"already keeps its artifacts at s3://bench/a.*Drop"):
        tracking.ensure_experiment(uri, "classification", "s3://bench/b")
