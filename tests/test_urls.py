"""profit_prep.store.urls: URL detection, credential refusal, redaction, the store filesystem."""

from __future__ import annotations

import pytest

from profit_prep.errors import InputError
from profit_prep.store import urls
from tests.s3_server import FAKE_SECRET


@pytest.mark.parametrize(("path", "expected"), [
    ("s3://b/k", True), ("gs://b/k", True), ("hf://datasets/u/r", True), ("memory://x", True),
    ("S3://b/k", True), ("/tmp/x", False), ("rel/x", False), ("file:///tmp/x", False),
    ("C:\\x", False), ("c:/x", False), ("", False),
])
def test_is_url(path: str, expected: bool) -> None:
    assert urls.is_url(path) is expected


@pytest.mark.parametrize("url", [
    f"s3://AKIAABCDEFGHIJKLMNOP:{FAKE_SECRET}@bucket/run",
    f"s3://{FAKE_SECRET}@bucket/run",
    f"gs://bucket/run?access_token={FAKE_SECRET}",
    f"s3://bucket/run?aws_secret_access_key={FAKE_SECRET}",
    f"s3://bucket/run?X-Amz-Signature={FAKE_SECRET}",
])
def test_a_url_with_credentials_is_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(InputError) as caught:
        urls.filesystem(url, "--out")
    message = str(caught.value)
    assert FAKE_SECRET not in message and "AKIAABCDEFGHIJKLMNOP" not in message
    assert "credential" in message and "\n" not in message


@pytest.mark.parametrize("url", ["ftp://host/x", "simplecache::s3://b/k", "s3://b/k?versionId=3"])
def test_unsupported_urls_are_refused_in_one_line(url: str) -> None:
    with pytest.raises(InputError) as caught:
        urls.filesystem(url, "--data")
    assert str(caught.value).startswith("--data ") and "\n" not in str(caught.value)


def test_redact_masks_userinfo_secret_params_key_ids_and_secret_env(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    text = (f"s3://me:{FAKE_SECRET}@b/k gs://b/k?token=abc&x=1 AKIAABCDEFGHIJKLMNOP "
            f"botocore said {FAKE_SECRET}")
    out = urls.redact(text)
    assert FAKE_SECRET not in out and "abc" not in out and "AKIAABCDEFGHIJKLMNOP" not in out
    assert "s3://***@b/k" in out and "&x=1" in out


def test_a_missing_client_names_the_extra(monkeypatch) -> None:
    real = urls.importlib.util.find_spec
    monkeypatch.setattr(urls.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install 'profit-prep\[gcs\]'"):
        urls.filesystem("gs://bucket/run", "--out")


def test_join_uses_slashes() -> None:
    assert urls.join("s3://b/run/", "data", "/part-00000.parquet") == \
        "s3://b/run/data/part-00000.parquet"


def test_s3_filesystem_uses_the_standard_endpoint_variable(s3_bucket: str) -> None:
    """AWS_ENDPOINT_URL alone (no option passed) routes s3fs to the test server."""
    fs, path = urls.filesystem(f"{s3_bucket}/run", "--out")
    assert path == s3_bucket[len("s3://"):] + "/run"
    fs.pipe_file(f"{path}/hello.txt", b"hi")
    assert fs.cat_file(f"{path}/hello.txt") == b"hi"
    # the conditional create the lock relies on: a second create of the same key fails
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{path}/hello.txt", b"again", mode="create")
    assert fs.cat_file(f"{path}/hello.txt") == b"hi"


def test_no_credentials_is_one_clean_line(s3_env, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fs, path = urls.filesystem("s3://nobucket/run", "--out")
    with pytest.raises(Exception) as caught:
        fs.ls(path)
    line = urls.describe(caught.value)
    assert "no credentials found" in line and "\n" not in line
