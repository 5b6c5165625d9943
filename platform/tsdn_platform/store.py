"""One way to reach the store: a URI -> a ``pyarrow.fs`` filesystem, plus small helpers on top.

A store URI is ``s3://bucket/prefix``, ``file:///abs/path`` or a plain local path. S3 follows the standard
AWS settings and nothing else: the endpoint from ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``, unless
``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true), the region from ``AWS_REGION``/``AWS_DEFAULT_REGION``
(else the bucket's own region on AWS, ``us-east-1`` on a custom endpoint), credentials from the usual
chain (environment, ``AWS_PROFILE`` and config files, instance metadata). No module passes endpoint flags.

Every failure surfaces as :class:`StoreError`, naming the URI and saying what kind of failure it was.
Transient S3 failures (throttling, 5xx, dropped connections) are retried with exponential backoff by the
AWS SDK inside the filesystem (:data:`S3_MAX_ATTEMPTS`); throttling that outlasts those attempts is retried
again here, with a longer backoff, before it is reported.

The filesystem objects pickle, so the ``(fs, path)`` pair from :func:`resolve` can be handed to Ray Data
(``filesystem=fs``) and Ray Train (``storage_filesystem=fs``) and works on every worker that has the same
AWS settings (``tsdn_platform.ray_session`` forwards them).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

__all__ = [
    "S3_MAX_ATTEMPTS",
    "StoreError",
    "as_store_error",
    "boto3_client",
    "copy",
    "delete",
    "exists",
    "is_s3",
    "join",
    "list_files",
    "move",
    "read_bytes",
    "read_json",
    "replace_bytes",
    "replace_json",
    "resolve",
    "retrying",
    "s3_bucket_key",
    "s3_endpoint",
    "write_bytes",
    "write_json",
]

T = TypeVar("T")

S3_MAX_ATTEMPTS = 5
"""Attempts the AWS SDK makes per S3 request (standard retry mode: exponential backoff with jitter)."""

# Error kinds. ``kind`` is part of the public API: callers branch on it.
NOT_FOUND = "not_found"
ACCESS_DENIED = "access_denied"
UNREACHABLE = "unreachable"
THROTTLED = "throttled"
INVALID = "invalid"
ERROR = "error"

# Substrings of AWS SDK (pyarrow) and botocore error messages -> kind. Checked in this order.
_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (NOT_FOUND, ("NO_SUCH_BUCKET", "NoSuchBucket", "NO_SUCH_KEY", "NoSuchKey", "does not exist", "Not Found")),
    (
        ACCESS_DENIED,
        (
            "ACCESS_DENIED",
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "INVALID_ACCESS_KEY_ID",
            "SIGNATURE_DOES_NOT_MATCH",
            "HTTP response code: 403",
            "Forbidden",
            "Unable to locate credentials",
        ),
    ),
    (
        THROTTLED,
        (
            "SLOW_DOWN",
            "SlowDown",
            "THROTTLING",
            "Throttling",
            "TooManyRequests",
            "SERVICE_UNAVAILABLE",
            "ServiceUnavailable",
            "REQUEST_LIMIT_EXCEEDED",
            "HTTP response code: 503",
        ),
    ),
    (
        UNREACHABLE,
        (
            "NETWORK_CONNECTION",
            "curlCode",
            "Could not connect",
            "Couldn't connect",
            "Could not resolve host",
            "Connection refused",
            "EndpointConnectionError",
            "Could not connect to the endpoint",
            "ConnectTimeout",
            "Connection was closed",
        ),
    ),
)

_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_SETTINGS_VARS = (
    *_ENDPOINT_VARS,
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


class StoreError(Exception):
    """A store operation failed. ``uri`` is what was being accessed, ``kind`` one of ``not_found``,
    ``access_denied``, ``unreachable``, ``throttled``, ``invalid`` (a malformed URI) or ``error``.

    Pickles (it is raised inside Ray workers and re-raised on the driver).
    """

    def __init__(self, uri: str, reason: str, kind: str = ERROR) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason
        self.kind = kind

    def __reduce__(self) -> tuple[type[StoreError], tuple[str, str, str]]:
        return (type(self), (self.uri, self.reason, self.kind))


def _classify(exc: BaseException) -> str:
    if isinstance(exc, StoreError):
        return exc.kind
    if isinstance(exc, FileNotFoundError):
        return NOT_FOUND
    if isinstance(exc, PermissionError):
        return ACCESS_DENIED
    text = f"{type(exc).__name__}: {exc}"
    for kind, markers in _MARKERS:
        if any(marker in text for marker in markers):
            return kind
    return ERROR


_EXPLANATIONS = {
    NOT_FOUND: "not found",
    ACCESS_DENIED: "access denied (check the AWS credentials and the bucket policy)",
    UNREACHABLE: "the store is unreachable",
    THROTTLED: "the store kept throttling or was unavailable after retries",
    ERROR: "store operation failed",
}


def as_store_error(uri: str, exc: BaseException) -> StoreError:
    """Translate any exception raised while accessing ``uri`` (pyarrow, botocore, OS) into a :class:`StoreError`."""
    if isinstance(exc, StoreError):
        return exc
    kind = _classify(exc)
    detail = str(exc) or type(exc).__name__
    if kind == UNREACHABLE and is_s3(uri):
        detail = f"{detail} [endpoint: {s3_endpoint() or 'AWS default'}]"
    return StoreError(uri, f"{_EXPLANATIONS[kind]}: {detail}", kind)


def retrying(
    uri: str,
    operation: Callable[[], T],
    attempts: int = 4,
    base_delay_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``operation``; retry it while it fails with throttling, with exponential backoff and jitter.

    Any failure is re-raised as a :class:`StoreError` naming ``uri``; other kinds are not retried (the SDK
    already retried dropped connections and 5xx answers inside the request).
    """
    for attempt in range(attempts):
        try:
            return operation()
        except Exception as exc:
            error = as_store_error(uri, exc)
            if error.kind != THROTTLED or attempt == attempts - 1:
                raise error from exc
            sleep(base_delay_s * (2**attempt) * (1.0 + random.random()))
    msg = f"attempts must be >= 1, got {attempts}"
    raise ValueError(msg)


# --- URIs ---------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/p/", "a", "b.json") -> "s3://b/p/a/b.json"``; works the same for local paths."""
    segments = [part.strip("/") for part in parts if part.strip("/")]
    base = uri.rstrip("/") or uri
    if not segments:
        return base
    return base + ("" if base.endswith("/") else "/") + "/".join(segments)


def s3_bucket_key(uri: str) -> tuple[str, str]:
    """``"s3://bucket/a/b" -> ("bucket", "a/b")``."""
    if not is_s3(uri):
        raise StoreError(uri, "not an s3:// URI", INVALID)
    parts = urlsplit(uri)
    if parts.query or parts.fragment:
        reason = "query strings are not supported; configure S3 with the standard AWS_* environment variables"
        raise StoreError(uri, reason, INVALID)
    if not parts.netloc:
        raise StoreError(uri, "no bucket in the URI", INVALID)
    return parts.netloc, unquote(parts.path).strip("/")


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard AWS settings, or None for AWS itself."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    for var in _ENDPOINT_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


def _region(bucket: str, endpoint: str | None) -> str:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    if endpoint:
        return "us-east-1"
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError as exc:
        raise as_store_error(f"s3://{bucket}", exc) from exc


_FS_CACHE: dict[tuple[Any, ...], pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = s3_endpoint()
    settings = tuple(os.environ.get(var) for var in _SETTINGS_VARS)
    key = (settings, None if endpoint else bucket)
    with _FS_LOCK:
        cached = _FS_CACHE.get(key)
    if cached is not None:
        return cached
    kwargs: dict[str, Any] = {
        "region": _region(bucket, endpoint),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        "connect_timeout": 5.0,
    }
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["scheme"] = parts.scheme
        kwargs["endpoint_override"] = parts.netloc
    fs = pafs.S3FileSystem(**kwargs)
    with _FS_LOCK:
        _FS_CACHE[key] = fs
    return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Store URI -> ``(filesystem, path inside it)``: ``("bucket/key", S3FileSystem)`` or an absolute local path."""
    if is_s3(uri):
        bucket, key = s3_bucket_key(uri)
        return _s3_filesystem(bucket), f"{bucket}/{key}".rstrip("/")
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StoreError(uri, "file:// URIs must name a local path (file:///abs/path)", INVALID)
        return pafs.LocalFileSystem(), os.path.abspath(unquote(parts.path))
    if "://" in uri:
        raise StoreError(uri, "unsupported scheme; use s3://bucket/prefix, file:///path or a plain path", INVALID)
    if not uri:
        raise StoreError(uri, "empty store URI", INVALID)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


# --- objects ------------------------------------------------------------------------------------


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return retrying(uri, read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object (local parent folders are created)."""
    fs, path = resolve(uri)

    def write() -> None:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open_output_stream(path) as stream:
            stream.write(data)

    retrying(uri, write)


def replace_bytes(uri: str, data: bytes) -> None:
    """Replace a small object atomically: readers see the old or the new content, never a partial one.

    Local: a temporary file in the same folder, fsynced, then ``os.replace``. S3: one PUT (S3 PUTs are atomic).
    """
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        write_bytes(uri, data)
        return
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise as_store_error(uri, exc) from exc


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StoreError(uri, f"not valid JSON ({exc})", ERROR) from exc


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, _dump_json(obj))


def replace_json(uri: str, obj: Any) -> None:
    replace_bytes(uri, _dump_json(obj))


def exists(uri: str) -> bool:
    """True for an object/file, and for a local folder or a non-empty S3 prefix."""
    fs, path = resolve(uri)
    info = retrying(uri, lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


def list_files(uri: str, recursive: bool = True, suffixes: Iterable[str] | None = None) -> list[str]:
    """Files under ``uri`` as full URIs in the caller's style (``join(uri, relative)``), sorted.

    A missing prefix gives ``[]``; a missing bucket or an unreachable store raises :class:`StoreError`.
    """
    fs, path = resolve(uri)
    wanted = tuple(suffixes) if suffixes is not None else None
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    infos = retrying(uri, lambda: fs.get_file_info(selector))
    if not infos and is_s3(uri):
        # A missing prefix is an empty listing, but a missing bucket is a mistake worth reporting.
        bucket = path.split("/", 1)[0]
        if retrying(uri, lambda: fs.get_file_info(bucket)).type == pafs.FileType.NotFound:
            raise StoreError(uri, f"not found: bucket {bucket!r} does not exist", NOT_FOUND)
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(path) :].lstrip("/")
        if wanted is not None and not relative.endswith(wanted):
            continue
        out.append(join(uri, relative))
    return sorted(out)


def delete(uri: str, recursive: bool = False) -> None:
    """Delete an object (``recursive=False``) or everything under a prefix/folder. Missing targets are fine."""
    fs, path = resolve(uri)

    def remove() -> None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return
        if info.type == pafs.FileType.Directory:
            if not recursive:
                msg = "is a folder/prefix; pass recursive=True to delete it"
                raise StoreError(uri, msg, INVALID)
            fs.delete_dir(path)
        else:
            fs.delete_file(path)

    retrying(uri, remove)


def copy(src: str, dst: str) -> None:
    """Copy one object/file; both URIs may be on different stores."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if src_fs is dst_fs or (isinstance(src_fs, pafs.LocalFileSystem) and isinstance(dst_fs, pafs.LocalFileSystem)):
        if isinstance(dst_fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        retrying(f"{src} -> {dst}", lambda: dst_fs.copy_file(src_path, dst_path))
        return
    write_bytes(dst, read_bytes(src))


def move(src: str, dst: str) -> None:
    """Move one object/file: a rename locally (atomic), copy + delete on S3."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if isinstance(src_fs, pafs.LocalFileSystem) and isinstance(dst_fs, pafs.LocalFileSystem):
        try:
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            os.replace(src_path, dst_path)
        except OSError as exc:
            raise as_store_error(f"{src} -> {dst}", exc) from exc
        return
    copy(src, dst)
    delete(src)


def boto3_client(**config: Any) -> Any:
    """A boto3 S3 client built from the same AWS settings as :func:`resolve` (endpoint, region, credentials).

    For what ``pyarrow.fs`` cannot do, e.g. a conditional ``put_object(IfMatch=...)``. ``config`` goes to
    ``botocore.config.Config`` (the defaults add standard-mode retries with :data:`S3_MAX_ATTEMPTS`).
    """
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint()
    options: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}}
    if endpoint:
        options["s3"] = {"addressing_style": "path"}
    options.update(config)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ("us-east-1" if endpoint else None)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=Config(**options))
