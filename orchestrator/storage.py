"""Where a sweep keeps its state: a local path or an `s3://bucket/prefix` URI, checked before any trial starts.

Three layers touch the storage, and all three take the endpoint and the credentials from the standard AWS settings
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_PROFILE`, an instance role; `AWS_ENDPOINT_URL`
or `AWS_ENDPOINT_URL_S3` for an S3-compatible store), so the project passes no filesystem object and no credential
around (checked with pyarrow 25, boto3 1.44, MLflow 3.17 against moto's server):

- Ray Tune and Ray Train write their state and checkpoints through `pyarrow.fs.FileSystem.from_uri`, in every
  process that writes (the driver, each Train worker);
- MLflow's S3 artifact repository is a boto3 client whose `endpoint_url` is `MLFLOW_S3_ENDPOINT_URL` when set, else
  None, and boto3 then reads `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL` itself;
- the checks here use boto3 (clear error codes), then pyarrow once, as Ray will.

So each process that writes (on a cluster: every node) needs those variables or an instance role; nothing reaches a
Ray worker through the trial's config, which Tune saves in the storage.

Boto3 and Ray are used here only: `check_bucket` (boto3), `check_shared_storage` (Ray tasks pinned to each node).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .cli import CliError

log = logging.getLogger("orchestrator.storage")

MARKER_PREFIX = ".bench-check-"  # a marker object or file written, read and removed by the checks below
REFUSED = {  # error codes of refused credentials (S3 answers 403 with these)
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}
ENDPOINT_HELP = (
    "AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) selects an S3-compatible endpoint, e.g. http://127.0.0.1:9000 "
    "for MinIO; unset, it is AWS S3"
)
CREDENTIALS_HELP = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary credentials), or "
    "AWS_PROFILE, or run where an instance role provides them"
)


def is_uri(storage: str) -> bool:
    """A URI (s3://, gs://, ...), as opposed to a local path (which `plan` makes absolute)."""
    return "://" in storage


def filesystem(storage: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local path or a URI: the layer Ray's storage goes through, with the
    same endpoint and credentials."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)


def check_uri(uri: str, flag: str) -> None:
    """The form of a --storage or --artifact-location URI: no credentials or query in it, a bucket for s3://."""
    parsed = urlparse(uri)
    if parsed.username or parsed.password:
        raise CliError(
            f"{flag} holds credentials (user:password@); they would be saved with the sweep's state and params. Give "
            f"the URI without them and set the credentials in the environment: {CREDENTIALS_HELP}"
        )
    if parsed.query or parsed.fragment:
        raise CliError(
            f"{flag} {uri}: a query (?...) or fragment is not supported, the sweep's name is appended to the URI; "
            f"give s3://bucket/prefix and set the endpoint in the environment: {ENDPOINT_HELP}"
        )
    if parsed.scheme == "s3" and not parsed.netloc:
        raise CliError(f"{flag} {uri}: no bucket; expected s3://bucket/prefix")


def check_bucket(uri: str, flag: str, *, endpoint_url: str | None = None, timeout: float = 5.0) -> None:
    """Before any trial starts: the bucket of an s3:// `uri` exists, the credentials are accepted, and an object can
    be written and deleted under its prefix (a read-only role would otherwise fail at the first checkpoint); then
    pyarrow, which Ray uses, can read the prefix too. `CliError` with the fix for each failure.

    `endpoint_url` None lets boto3 read AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL, as Ray's pyarrow and MLflow do.
    Messages carry the error's code and message only: a SignatureDoesNotMatch response body holds the canonical
    request, session token included.
    """
    import boto3
    import botocore.config
    import botocore.exceptions as bce

    check_uri(uri, flag)
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    marker = f"{prefix}/{MARKER_PREFIX}{uuid.uuid4().hex}" if prefix else f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    config = botocore.config.Config(
        connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2, "mode": "standard"}
    )
    client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
    where = f"{flag} {uri} (endpoint {client.meta.endpoint_url})"
    step = "list"
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        step = "write"
        client.put_object(Bucket=bucket, Key=marker, Body=b"write check of the sweep, deleted at once\n")
        step = "delete"
        client.delete_object(Bucket=bucket, Key=marker)
    except (bce.NoCredentialsError, bce.PartialCredentialsError) as e:
        raise CliError(f"{where}: no usable AWS credentials ({e}); {CREDENTIALS_HELP}") from None
    except (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ReadTimeoutError) as e:
        raise CliError(f"{where}: cannot reach the S3 endpoint ({e}); {ENDPOINT_HELP}") from None
    except bce.ClientError as e:
        error = e.response.get("Error", {})
        code, message = str(error.get("Code", "")), str(error.get("Message", ""))
        said = f"{code}: {message}" if message else code
        if code in ("NoSuchBucket", "404"):
            raise CliError(
                f"{where}: bucket {bucket!r} does not exist ({said}); create it (aws s3 mb s3://{bucket}) or fix the "
                f"bucket name; {ENDPOINT_HELP}"
            ) from None
        if code in REFUSED:
            raise CliError(f"{where}: the AWS credentials were refused ({said}); {CREDENTIALS_HELP}") from None
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            if step == "list":
                needs = f"s3:ListBucket on arn:aws:s3:::{bucket}"
            else:
                needs = f"s3:PutObject and s3:DeleteObject on arn:aws:s3:::{bucket}/{prefix + '/' if prefix else ''}*"
            raise CliError(
                f"{where}: access denied when trying to {step} under s3://{bucket}/{prefix} ({said}); the sweep "
                f"writes checkpoints there and deletes old ones: grant {needs}, or use other credentials "
                "(a read-only role fails at the first checkpoint)"
            ) from None
        raise CliError(f"{where}: S3 answered {said} when trying to {step} under s3://{bucket}/{prefix}") from None
    if flag == "--storage":  # Ray reads and writes through pyarrow: same settings, its own client, one more look
        try:
            fs, path = filesystem(uri)
            fs.get_file_info(path)
        except (OSError, ValueError) as e:
            raise CliError(
                f"{where}: boto3 can write there but pyarrow, through which Ray writes, cannot ({e}); check that the "
                "credentials come from the environment, ~/.aws or an instance role"
            ) from None


def check_storage(storage: str) -> None:
    """--storage before Ray starts: an s3:// bucket is checked (`check_bucket`); another URI must be one that pyarrow
    (Ray's storage layer) knows; a local path is checked after ray.init by `check_shared_storage`."""
    if not is_uri(storage):
        return
    check_uri(storage, "--storage")
    if urlparse(storage).scheme == "s3":
        check_bucket(storage, "--storage")
        return
    try:
        filesystem(storage)
    except (OSError, ValueError) as e:
        raise CliError(f"--storage {storage}: pyarrow, through which Ray writes, cannot open it ({e})") from None


def check_artifact_location(location: str) -> None:
    """--artifact-location before Ray starts: a URI; an s3:// bucket is checked as MLflow will write to it (its
    endpoint is MLFLOW_S3_ENDPOINT_URL when set, else boto3's AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL)."""
    if not is_uri(location):
        raise CliError(
            f"--artifact-location {location!r}: expected a URI, e.g. s3://bucket/mlflow (or file:///shared/mlflow on "
            "storage every node mounts); every Ray worker logs its artifacts there"
        )
    check_uri(location, "--artifact-location")
    if urlparse(location).scheme == "s3":
        check_bucket(location, "--artifact-location", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)


# shared storage on a multi-node cluster -----------------------------------------------------------------------------


def marker_visible(path: str, token: str) -> bool:
    """Run on each node: whether the marker file the driver wrote at `path` is there, holding `token` (a stale marker
    of an earlier check, or a node's own folder of the same name, does not count)."""
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def nodes_missing_marker(nodes: dict[str, str], path: str, token: str, *, timeout: float = 60.0) -> list[str]:
    """The nodes ({node id: address}) that do not see the marker at `path`, asked by a task pinned to each (no CPU,
    so a busy cluster runs it at once); a node that does not answer within `timeout` counts as not seeing it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(marker_visible)
    refs = {}
    for node_id in nodes:
        pinned = NodeAffinitySchedulingStrategy(node_id, soft=False)
        refs[check.options(num_cpus=0, scheduling_strategy=pinned).remote(path, token)] = node_id
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    missing = [refs[ref] for ref in pending]
    for ref in ready:
        try:
            if not ray.get(ref):
                missing.append(refs[ref])
        except ray.exceptions.RayError:
            missing.append(refs[ref])
    return sorted(missing)


def check_shared_storage(storage: str, *, timeout: float = 60.0) -> None:
    """After ray.init: on a cluster of several nodes, a local --storage path must be one every node sees (NFS, or
    several Ray nodes on one machine). The driver writes a marker file there and a task on each alive node looks for
    it; `CliError` naming the nodes that cannot. URIs (s3://, gs://) are shared by construction; one node: nothing
    to check."""
    if is_uri(storage):
        return
    import ray

    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    marker = Path(storage) / f"{MARKER_PREFIX}{token}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as e:
        raise CliError(f"--storage {storage}: cannot write there ({e})") from None
    try:
        missing = nodes_missing_marker(nodes, str(marker), token, timeout=timeout)
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise CliError(shared_storage_error(storage, {n: nodes[n] for n in missing}, len(nodes)))
    log.info("--storage %s is shared: all %d nodes see it", storage, len(nodes))


def shared_storage_error(storage: str, missing: dict[str, str], total: int) -> str:
    names = ", ".join(f"{address} (node {node_id[:12]})" for node_id, address in missing.items())
    return (
        f"--storage {storage} is a local path, and {len(missing)} of the cluster's {total} nodes cannot see a file "
        f"written there by this driver: {names}. Trials on those nodes would write their checkpoints where no "
        "other node (and no --resume) finds them. Use s3://bucket/prefix, gs://bucket/prefix, or a path shared by "
        "every node (e.g. an NFS mount at the same place on each)."
    )
