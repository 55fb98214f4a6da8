"""A real GCS JSON-API server for tests: gcp-storage-emulator in-process on 127.0.0.1 (in-memory
storage), a fresh bucket each.

Fixtures (imported by tests/conftest.py):

- ``gcs_server``: session-wide server; its ``env`` points gcsfs at it (``STORAGE_EMULATOR_HOST``,
  which gcsfs.core._location reads on every request) with anonymous access.
- ``gcs_env``: that environment set for one test (subprocesses inherit it via os.environ).
- ``gcs_bucket``: ``gs://<fresh bucket>`` with ``gcs_env`` set.

Tests using them skip when gcp-storage-emulator or gcsfs is absent. The helper methods
(``objects``, ``put``, ``delete``) talk to the server over plain HTTP, not through gcsfs.

Two things the environment sets besides the endpoint, and why:

- ``FSSPEC_GS_TOKEN=anon`` (and the same in fsspec's live config for this process): gcsfs sends
  no credentials and reads nothing of the user's own Google set-up (application default
  credentials, ``~/.gcs_tokens``, the metadata server); ``GOOGLE_APPLICATION_CREDENTIALS`` is
  unset and ``CLOUDSDK_CONFIG`` points at an empty folder besides.
- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: by default gcsfs (2025.x+) is its
  ExtendedGcsFileSystem, which asks the gRPC Storage Control API (GetStorageLayout) for each
  bucket's type before each read or write; the emulator serves only the JSON API over HTTP, so
  every call would wait out a 60 s retry and then fall back to the plain JSON-API
  GCSFileSystem. The variable selects that class directly: the same code path gcsfs uses for
  a standard (flat-namespace) bucket.

What the emulator does not check: preconditions (``ifGenerationMatch``); see
tests/test_gcs_store.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

import pytest


@dataclass
class GCSServer:
    endpoint: str
    env: dict[str, str] = field(default_factory=dict)

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/octet-stream") -> bytes:
        request = urllib.request.Request(f"{self.endpoint}{path}", data=body, method=method,
                                         headers={"Content-Type": content_type})
        # The loopback server directly, never through a proxy from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            return response.read()

    def new_bucket(self) -> str:
        name = f"pp-{uuid.uuid4().hex[:12]}"
        self._request("POST", "/storage/v1/b?project=profit-prep-test",
                      json.dumps({"name": name}).encode(), "application/json")
        return name

    def names(self, bucket: str) -> list[str]:
        """Every object name in ``bucket`` (the emulator lists all in one page)."""
        listed = json.loads(self._request("GET", f"/storage/v1/b/{quote(bucket)}/o"))
        assert "nextPageToken" not in listed
        return sorted(item["name"] for item in listed.get("items") or [])

    def get(self, bucket: str, name: str) -> bytes:
        return self._request(
            "GET", f"/download/storage/v1/b/{quote(bucket)}/o/{quote(name, safe='')}?alt=media")

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in ``bucket``: name -> bytes."""
        return {name: self.get(bucket, name) for name in self.names(bucket)}

    def put(self, bucket: str, name: str, body: bytes) -> None:
        query = urlencode({"uploadType": "media", "name": name})
        self._request("POST", f"/upload/storage/v1/b/{quote(bucket)}/o?{query}", body)

    def delete(self, bucket: str, name: str) -> None:
        self._request("DELETE", f"/storage/v1/b/{quote(bucket)}/o/{quote(name, safe='')}")


def _missing() -> str | None:
    for module in ("gcp_storage_emulator", "gcsfs"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    missing = _missing()
    if missing:
        pytest.skip(f"{missing} is not installed (pip install -e '.[gcs,test]')")
    from gcp_storage_emulator.server import create_server

    host, port = "127.0.0.1", _free_port()
    server = create_server(host, port, in_memory=True)
    server.start()
    empty = tmp_path_factory.mktemp("gcloud-config")
    env = {
        "STORAGE_EMULATOR_HOST": f"http://{host}:{port}",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # No credentials at all, and nothing from the user's own Google set-up.
        "FSSPEC_GS_TOKEN": "anon",
        "CLOUDSDK_CONFIG": str(empty),
        "NO_GCE_CHECK": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    try:
        yield GCSServer(f"http://{host}:{port}", env)
    finally:
        server.stop()


@pytest.fixture()
def gcs_env(gcs_server: GCSServer, monkeypatch: pytest.MonkeyPatch) -> GCSServer:
    import fsspec.config

    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCSFS_DEFAULT_PROJECT",
                 "GOOGLE_CLOUD_UNIVERSE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in gcs_server.env.items():
        monkeypatch.setenv(name, value)
    # fsspec read FSSPEC_* when it was imported: this process gets the same setting directly.
    monkeypatch.setitem(fsspec.config.conf, "gs", {**fsspec.config.conf.get("gs", {}),
                                                   "token": "anon"})
    import gcsfs  # first imported here, with the variable set (it is read at import)

    if gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        pytest.skip("gcsfs was imported with its Storage Control (gRPC) bucket lookups on, which "
                    "the emulator does not serve; run these tests in their own process")
    return gcs_server


@pytest.fixture()
def gcs_bucket(gcs_env: GCSServer) -> str:
    return f"gs://{gcs_env.new_bucket()}"


def environ_with(server: GCSServer) -> dict[str, str]:
    """os.environ plus the server's variables: for a subprocess running the CLI."""
    return {**os.environ, **server.env}

