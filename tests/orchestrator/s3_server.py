"""moto's standalone S3 server on 127.0.0.1, and the environment that points the AWS clients (boto3, pyarrow, so Ray and
MLflow too) at it, for the --storage s3:// tests. The `moto_s3` fixture in conftest.py starts one per session."""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import dataclass

import pytest

BUCKET = "bench"
REGION = "us-east-1"
# Distinctive fake credentials: moto accepts any (until `require_auth`), so these really sign every request to it;
# the secrets test looks for each value in everything a sweep writes and prints.
FAKE = {
    "AWS_ACCESS_KEY_ID": "AKIABENCHFAKE7Q2W4E6R",
    "AWS_SECRET_ACCESS_KEY": "bench-fake-aws-secret-7f3a9c1e5b",
    "AWS_SESSION_TOKEN": "bench-fake-aws-session-token-41d2b8e0",
    "MLFLOW_TRACKING_USERNAME": "bench-fake-mlflow-user-5c7e",
    "MLFLOW_TRACKING_PASSWORD": "bench-fake-mlflow-password-9b1f",
    "MLFLOW_TRACKING_TOKEN": "bench-fake-mlflow-token-2e6d3a",
}
SECRETS = {k: v for k, v in FAKE.items() if k != "AWS_ACCESS_KEY_ID"}  # a key id is an identifier, not a secret
# What else could steer the AWS clients away from the server and the fake credentials: unset, or pointed nowhere.
UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


@dataclass
class S3Server:
    """A running `moto.server.ThreadedMotoServer` (a real HTTP S3 endpoint, in a thread of this process)."""

    server: object
    url: str

    @classmethod
    def start(cls) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        return cls(server, f"http://{host}:{port}")

    def stop(self) -> None:
        self.server.stop()

    def client(self, **credentials):
        """A boto3 S3 client of this server (the fake credentials unless others are given)."""
        import boto3

        keys = credentials or {
            "aws_access_key_id": FAKE["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": FAKE["AWS_SECRET_ACCESS_KEY"],
        }
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, **keys)

    def iam(self):
        import boto3

        return boto3.client(
            "iam",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=FAKE["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE["AWS_SECRET_ACCESS_KEY"],
        )

    def require_auth(self, on: bool) -> None:
        """Make moto check every request's key and signature against its IAM users (off: accept anything)."""
        request = urllib.request.Request(
            f"{self.url}/moto-api/reset-auth",
            data=b"0" if on else b"inf",
            headers={"Content-Type": "text/plain"},  # not a form: moto reads the raw body
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            json.loads(response.read())

    def ensure_bucket(self, name: str = BUCKET) -> None:
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=name)

    def objects(self, bucket: str = BUCKET, prefix: str = "") -> dict[str, int]:
        """Every object's key under `prefix`, with its size."""
        found = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return found

    def read(self, key: str, bucket: str = BUCKET) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def point_at(mp: pytest.MonkeyPatch, server: S3Server, tmp_dir) -> None:
    """The standard AWS variables for `server` with the fake credentials (and MLflow's), nothing else: no profile,
    no ~/.aws files, no instance metadata, and AWS_ENDPOINT_URL alone selecting the endpoint."""
    for name in UNSET:
        mp.delenv(name, raising=False)
    for name, value in FAKE.items():
        mp.setenv(name, value)
    mp.setenv("AWS_ENDPOINT_URL", server.url)
    mp.setenv("AWS_DEFAULT_REGION", REGION)
    mp.setenv("AWS_REGION", REGION)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("AWS_CONFIG_FILE", str(tmp_dir / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_dir / "no-aws-credentials"))
