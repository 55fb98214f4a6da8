"""A real S3-protocol server for tests: moto's threaded server on 127.0.0.1, a fresh bucket each.

Fixtures (imported by tests/conftest.py):

- ``s3_server``: session-wide server; its ``env`` holds fake credentials and
  ``AWS_ENDPOINT_URL`` pointing at it (the standard variable botocore reads itself).
- ``s3_env``: that environment set for one test (subprocesses inherit it via os.environ).
- ``s3_bucket``: ``s3://<fresh bucket>`` with ``s3_env`` set.

Tests using them skip when moto or s3fs is absent. ``FAKE_SECRET`` is the secret key: tests
check that it never appears in an object written or a line printed.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

FAKE_KEY_ID = "profitprepfakekeyid"
FAKE_SECRET = "pp-fake-secret-0f5c2d71a9e44b3c"


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET)

    def new_bucket(self) -> str:
        name = f"pp-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in ``bucket``: key -> bytes."""
        client = self.client()
        out: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out


def _missing() -> str | None:
    for module in ("moto", "s3fs", "boto3", "flask"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    missing = _missing()
    if missing:
        pytest.skip(f"{missing} is not installed (pip install -e '.[s3,test]')")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    empty = tmp_path_factory.mktemp("aws-config") / "none"
    empty.write_text("")
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        # Nothing from the user's own AWS set-up, and no metadata-service probes.
        "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    try:
        yield S3Server(endpoint, env)
    finally:
        server.stop()


@pytest.fixture()
def s3_env(s3_server: S3Server, monkeypatch) -> S3Server:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture()
def s3_bucket(s3_env: S3Server) -> str:
    return f"s3://{s3_env.new_bucket()}"


def environ_with(server: S3Server) -> dict[str, str]:
    """os.environ plus the server's variables: for a subprocess running the CLI."""
    return {**os.environ, **server.env}
