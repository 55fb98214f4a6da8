"""Object-store URLs: which paths are URLs, the fsspec filesystem for one, and redaction.

Credentials come only from each store's standard chain (environment, config files, instance
roles; for S3-compatible stores the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
which botocore reads itself): a URL carrying them (``user:secret@``, ``?secret=``) is refused
without echoing them, and :func:`redact` cleans every URL or error text before it is printed
or stored. The store clients (s3fs, gcsfs) are optional extras, imported only for a URL.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from profit_prep.errors import InputError

# scheme -> (module fsspec needs for it, the profit-prep extra that installs it)
_CLIENTS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "hf": ("huggingface_hub", ""),  # comes with datasets
    "memory": ("fsspec", ""),  # in-process store: unit tests
}
SCHEMES = tuple(_CLIENTS)

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# Query parameter names that carry a secret in some store's URL convention.
_SECRET_PARAM = re.compile(
    r"(key|secret|token|password|passwd|pwd|signature|sig|credential|auth|session)", re.I)
# Environment variables whose values are secrets: never printed or stored, whatever the text.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
               "AWS_ACCESS_KEY_ID", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
               "GOOGLE_APPLICATION_CREDENTIALS_JSON", "GCS_OAUTH_TOKEN")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+://)[^/@\s]*@")
_QUERY_SECRET = re.compile(
    r"([?&][^=&\s]*(?:key|secret|token|password|signature|sig|credential)[^=&\s]*=)[^&\s]*",
    re.I)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_MASK = "***"


def is_url(path: Any) -> bool:
    """True for ``scheme://...`` (fsspec URLs); False for local paths, ``file://`` included."""
    if not isinstance(path, str):
        return False
    match = _URL.match(path)
    return match is not None and match.group(1).lower() != "file"


def scheme(url: str) -> str:
    match = _URL.match(url)
    return match.group(1).lower() if match else ""


def redact(text: str) -> str:
    """``text`` with credentials masked: URL user info, secret-looking query values, AWS key
    ids and the values of the store credential variables set in this environment."""
    text = _USERINFO.sub(rf"\1{_MASK}@", str(text))
    text = _QUERY_SECRET.sub(rf"\1{_MASK}", text)
    text = _AWS_KEY_ID.sub(_MASK, text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        # Real keys are 20-40+ characters; a short placeholder ("test") would mask words.
        if value and len(value) >= 8:
            text = text.replace(value, _MASK)
    return text


def check_url(url: str, what: str = "path") -> None:
    """Refuse an unsupported scheme, a chained URL, or one that carries credentials."""
    kind = scheme(url)
    if kind not in _CLIENTS:
        raise InputError(f"{what} {redact(url)}: unsupported URL scheme {kind!r} "
                         f"(supported: {', '.join(s + '://' for s in SCHEMES if s != 'memory')})")
    if "::" in url:
        raise InputError(f"{what} {redact(url)}: chained fsspec URLs are not supported; "
                         "give one store URL")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise InputError(f"{what} {kind}://...: the URL embeds credentials; remove them and use "
                         "the store's own credential chain (environment, config files, roles)")
    if any(_SECRET_PARAM.search(name) for name, _ in parse_qsl(parts.query,
                                                               keep_blank_values=True)):
        raise InputError(f"{what} {kind}://...: the URL carries a credential parameter; remove "
                         "it and use the store's own credential chain")
    if parts.query or parts.fragment:
        raise InputError(f"{what} {redact(url)}: query strings and fragments are not supported")


def filesystem(url: str, what: str = "path") -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path inside it (``bucket/key`` for S3/GCS).

    No storage options are passed: credentials and endpoints come from the store's standard
    chain. Listings are not cached, so a resume sees what another process wrote meanwhile.
    """
    check_url(url, what)
    kind = scheme(url)
    module, extra = _CLIENTS[kind]
    if importlib.util.find_spec(module) is None:
        how = f"pip install 'profit-prep[{extra}]'" if extra else f"pip install {module}"
        raise InputError(f"{what} {kind}://: needs {module}; install it with {how}")
    import fsspec

    options: dict[str, Any] = {}
    if kind in ("s3", "s3a", "gs", "gcs"):
        options["use_listings_cache"] = False
        # A fresh client per process, never one cached with another run's options.
        options["skip_instance_cache"] = True
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except Exception as exc:  # the client's own errors: one line, no secrets
        raise InputError(f"{what} {redact(url)}: {describe(exc)}") from None
    return fs, path.rstrip("/")


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended by ``/`` (URLs never use the OS separator)."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def describe(exc: BaseException) -> str:
    """One redacted line for a store client's exception."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        text = ("no credentials found (set them the store's usual way: environment, "
                "config file, instance role)")
    elif isinstance(exc, PermissionError):
        text = f"permission denied ({text})"
    elif isinstance(exc, FileNotFoundError):  # gcsfs's says only the API path (b/BUCKET/o)
        text = f"not found: no such bucket or object ({text})"
    return redact(text)[:300]
