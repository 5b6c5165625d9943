"""One way to reach the store: a URI -> a ``pyarrow.fs`` filesystem, plus small helpers on top.

A store URI is ``s3://bucket/prefix``, ``file:///abs/path`` or a plain local path. S3 follows the standard
AWS settings and nothing else: the endpoint from ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``, unless
``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true), the region from ``AWS_REGION``/``AWS_DEFAULT_REGION``
(else the bucket's own region on AWS, ``us-east-1`` on a custom endpoint), credentials from the usual
chain (environment, ``AWS_PROFILE`` and config files, instance metadata). No module passes endpoint flags.

Every failure surfaces as :class:`StoreError`, naming the URI and saying what kind of failure it was, told by
the exception's type and error code (pyarrow's AWS error type, botocore's error code, the HTTP status, errno),
never by its wording. Transient failures (unreachable, throttled, 5xx) are retried with exponential backoff by
the AWS SDK inside each request (:data:`S3_MAX_ATTEMPTS`), then again here for as long as the current retry
budget allows (:func:`retry_budget`, default :data:`DEFAULT_RETRY_S`); then they are reported. Jobs treat a
``not_found`` object as a fact about that input, and every other kind as the store failing: the job fails.

Compare-and-swap (:func:`read_versioned`, then :func:`write_if`) replaces an object only if it is still the one
that was read: S3's conditional PUT (``If-Match``), a lock file on a local folder. The registry's best pointer is
its one user; it decides what to write, this module only how.

The filesystem objects pickle, so the ``(fs, path)`` pair from :func:`resolve` can be handed to Ray Data
(``filesystem=fs``) and Ray Train (``storage_filesystem=fs``) and works on every worker that has the same
AWS settings (``tsdn_platform.ray_session`` forwards them).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

__all__ = [
    "DEFAULT_RETRY_S",
    "S3_MAX_ATTEMPTS",
    "STALE_LOCK_S",
    "TRANSIENT",
    "StoreError",
    "Versioned",
    "WriteConflict",
    "as_store_error",
    "boto3_client",
    "conditional_writes_supported",
    "copy",
    "delete",
    "discard",
    "exists",
    "is_s3",
    "join",
    "list_dirs",
    "list_files",
    "move",
    "read_bytes",
    "read_json",
    "read_json_or_none",
    "read_versioned",
    "relative",
    "replace_bytes",
    "replace_json",
    "require",
    "resolve",
    "retry_budget",
    "retrying",
    "s3_bucket_key",
    "s3_endpoint",
    "write_bytes",
    "write_if",
    "write_json",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

S3_MAX_ATTEMPTS = 5
"""Attempts the AWS SDK makes per S3 request (standard retry mode: exponential backoff with jitter)."""

# Error kinds. ``kind`` is part of the public API: callers branch on it.
NOT_FOUND = "not_found"
MISSING_BUCKET = "missing_bucket"
ACCESS_DENIED = "access_denied"
UNREACHABLE = "unreachable"
THROTTLED = "throttled"
UNAVAILABLE = "unavailable"
INVALID = "invalid"
WRONG_TYPE = "wrong_type"
ERROR = "error"

TRANSIENT = frozenset({UNREACHABLE, THROTTLED, UNAVAILABLE})
"""Kinds that a later attempt can cure: :func:`retrying` waits them out, up to the retry budget."""

DEFAULT_RETRY_S = 60.0
"""Seconds :func:`retrying` keeps retrying a transient failure, unless :func:`retry_budget` says otherwise."""

# S3 error codes -> kind. botocore reports the service's code (``NoSuchKey``); pyarrow reports the AWS C++ SDK's
# error type (``AWS Error NO_SUCH_KEY during ...``, or ``UNKNOWN (HTTP status 503)`` for codes it has no name for).
_CODES: dict[str, str] = {
    **dict.fromkeys(("NoSuchKey", "NO_SUCH_KEY", "NotFound", "RESOURCE_NOT_FOUND", "NoSuchUpload"), NOT_FOUND),
    **dict.fromkeys(("NoSuchBucket", "NO_SUCH_BUCKET"), MISSING_BUCKET),
    **dict.fromkeys(
        (
            *("AccessDenied", "ACCESS_DENIED", "AllAccessDisabled", "AccountProblem"),
            *("InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID", "InvalidClientTokenId", "INVALID_CLIENT_TOKEN_ID"),
            *("SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH", "INVALID_SIGNATURE", "INCOMPLETE_SIGNATURE"),
            *("InvalidToken", "ExpiredToken", "TokenRefreshRequired", "REQUEST_EXPIRED"),
            *("MISSING_AUTHENTICATION_TOKEN", "UNRECOGNIZED_CLIENT", "RequestTimeTooSkewed", "REQUEST_TIME_TOO_SKEWED"),
        ),
        ACCESS_DENIED,
    ),
    **dict.fromkeys(
        (
            *("SlowDown", "SLOW_DOWN", "Throttling", "THROTTLING", "ThrottlingException", "TooManyRequests"),
            *("RequestLimitExceeded", "ServiceUnavailable", "SERVICE_UNAVAILABLE"),
        ),
        THROTTLED,
    ),
    **dict.fromkeys(("NETWORK_CONNECTION", "RequestTimeout", "REQUEST_TIMEOUT"), UNREACHABLE),
    **dict.fromkeys(("InternalError", "INTERNAL_FAILURE"), UNAVAILABLE),
}
# The codes Arrow's S3 filesystem puts into its OSError messages (its only structured error data).
_ARROW_CODE = re.compile(r"AWS Error ([A-Z_]+)(?: \(HTTP status (\d+)\))?")
_UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}
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
    ``missing_bucket``, ``access_denied``, ``unreachable``, ``throttled``, ``unavailable`` (5xx), ``invalid`` (a
    malformed URI), ``wrong_type`` (a file where a folder is needed, or the other way round) or ``error``
    (unclassified). ``transient`` is true for the kinds a later attempt can cure.

    Pickles (it is raised inside Ray workers and re-raised on the driver).
    """

    def __init__(self, uri: str, reason: str, kind: str = ERROR) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason
        self.kind = kind

    def __reduce__(self) -> tuple[type[StoreError], tuple[str, str, str]]:
        return (type(self), (self.uri, self.reason, self.kind))

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT


def _kind_of_status(status: int) -> str:
    if status == 404:
        return NOT_FOUND
    if status in (401, 403):
        return ACCESS_DENIED
    if status in (429, 503):
        return THROTTLED
    if status == 408:
        return UNREACHABLE
    return UNAVAILABLE if status >= 500 else ERROR


def _kind_of_code(code: str, status: int | None) -> str:
    if code in _CODES:
        return _CODES[code]
    return _kind_of_status(status) if status else ERROR


def _classify_botocore(exc: BaseException) -> str | None:
    """The kind of a botocore exception, or None when ``exc`` is not one (botocore is imported only if it was)."""
    errors = sys.modules.get("botocore.exceptions")
    if errors is None:
        return None
    if isinstance(exc, errors.ClientError):
        response = getattr(exc, "response", {}) or {}
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return _kind_of_code(str(response.get("Error", {}).get("Code", "")), status)
    if isinstance(exc, (errors.ConnectionError, errors.HTTPClientError)):
        return UNREACHABLE
    if isinstance(exc, (errors.NoCredentialsError, errors.PartialCredentialsError)):
        return ACCESS_DENIED
    return None


def _classify(exc: BaseException) -> str:
    """Kind of a failure, by the exception's type and error code, never by its wording."""
    if isinstance(exc, StoreError):
        return exc.kind
    kind = _classify_botocore(exc)
    if kind is not None:
        return kind
    if isinstance(exc, FileNotFoundError):
        return NOT_FOUND
    if isinstance(exc, PermissionError):
        return ACCESS_DENIED
    if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError)):
        return WRONG_TYPE
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return UNREACHABLE
    if isinstance(exc, OSError):
        if exc.errno in _UNREACHABLE_ERRNOS:
            return UNREACHABLE
        match = _ARROW_CODE.search(str(exc))
        if match:
            return _kind_of_code(match.group(1), int(match.group(2)) if match.group(2) else None)
    return ERROR


_EXPLANATIONS = {
    NOT_FOUND: "not found",
    MISSING_BUCKET: "the bucket does not exist",
    ACCESS_DENIED: "access denied (check the AWS credentials and the bucket policy)",
    UNREACHABLE: "the store is unreachable",
    THROTTLED: "the store is throttling requests or temporarily unavailable",
    UNAVAILABLE: "the store answered with a server error",
    WRONG_TYPE: "a file where a folder is needed, or a folder where a file is",
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


_RETRY_S: contextvars.ContextVar[float] = contextvars.ContextVar("tsdn_store_retry_s", default=DEFAULT_RETRY_S)


@contextlib.contextmanager
def retry_budget(seconds: float) -> Iterator[None]:
    """Within the block (this thread or task only), :func:`retrying` waits out transient failures for ``seconds``.

    Jobs set it from their config (``store_retry_s``) on the driver and inside every Ray task they run.
    ``0`` leaves only the AWS SDK's own attempts inside each request.
    """
    if seconds < 0:
        msg = f"retry budget {seconds} s: must be >= 0"
        raise ValueError(msg)
    token = _RETRY_S.set(float(seconds))
    try:
        yield
    finally:
        _RETRY_S.reset(token)


def retrying(
    uri: str,
    operation: Callable[[], T],
    retry_s: float | None = None,
    base_delay_s: float = 0.5,
    max_delay_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``operation``; while it fails with a :data:`TRANSIENT` kind, retry it with exponential backoff and jitter
    for up to ``retry_s`` seconds after the first failure (default: the current :func:`retry_budget`).

    Any failure is re-raised as a :class:`StoreError` naming ``uri``. Other kinds (not found, access denied, a
    missing bucket, unclassified errors) are raised at once: waiting does not cure them. ``operation`` must be
    safe to repeat (a read, a whole-object write, a delete).
    """
    budget = _RETRY_S.get() if retry_s is None else retry_s
    deadline: float | None = None
    attempt = 0
    while True:
        try:
            return operation()
        except Exception as exc:
            error = as_store_error(uri, exc)
            if error.kind not in TRANSIENT:
                raise error from exc
            now = clock()
            deadline = now + budget if deadline is None else deadline
            if now >= deadline:
                if budget > 0:
                    error = StoreError(uri, f"{error.reason} (still failing after {budget:g} s of retries)", error.kind)
                raise error from exc
            delay = min(max_delay_s, base_delay_s * 2**attempt) * (0.5 + random.random() / 2)
            sleep(min(delay, deadline - now))
            attempt += 1


# --- URIs ---------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def relative(uri: str, root: str) -> str:
    """The part of ``uri`` below ``root``: ``relative("s3://b/p/a/x.png", "s3://b/p/") -> "a/x.png"``.

    ``root`` itself gives ``""``. A ``uri`` that is not under ``root`` (by whole path segments) is a caller's
    mistake and raises ``ValueError`` naming both.
    """
    base = root.rstrip("/")
    if uri == base:
        return ""
    if not uri.startswith(base + "/"):
        msg = f"{uri!r} is not under {root!r}"
        raise ValueError(msg)
    return uri[len(base) + 1 :].lstrip("/")


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/p/", "a", "b.json") -> "s3://b/p/a/b.json"``; works the same for local paths.

    A part holding a ``.`` or ``..`` path segment is refused (``StoreError``, kind ``invalid``): a key built from
    a discovered name must never point outside the prefix it was joined to.
    """
    segments = [part.strip("/") for part in parts if part.strip("/")]
    for segment in segments:
        if any(piece in (".", "..") for piece in segment.split("/")):
            raise StoreError(uri, f"path part {segment!r} would leave its prefix ('.' or '..' segment)", INVALID)
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
    """One object's bytes. A missing object is ``not_found``; a missing S3 bucket is ``missing_bucket``."""
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    try:
        return retrying(uri, read)
    except StoreError as exc:
        if exc.kind == NOT_FOUND and is_s3(uri):
            _check_bucket(uri, fs, path)
        raise


def _check_bucket(uri: str, fs: pafs.FileSystem, path: str) -> None:
    """Raise ``missing_bucket`` when the bucket of ``path`` does not exist (some S3 servers answer NoSuchKey)."""
    bucket = path.split("/", 1)[0]
    if retrying(uri, lambda: fs.get_file_info(bucket)).type == pafs.FileType.NotFound:
        raise StoreError(uri, f"{_EXPLANATIONS[MISSING_BUCKET]}: {bucket!r}", MISSING_BUCKET)


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


def read_json_or_none(uri: str) -> Any:
    """:func:`read_json`, or None when nothing is stored at ``uri`` (one request, not an exists() and a read).

    Every other failure (a missing bucket, an unreachable store, invalid JSON) raises as from :func:`read_json`.
    """
    try:
        return read_json(uri)
    except StoreError as exc:
        if exc.kind == NOT_FOUND:
            return None
        raise


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, _dump_json(obj))


def replace_json(uri: str, obj: Any) -> None:
    replace_bytes(uri, _dump_json(obj))


def exists(uri: str) -> bool:
    """True for an object/file, and for a local folder or a non-empty S3 prefix."""
    fs, path = resolve(uri)
    info = retrying(uri, lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


_FOLDER_HINT = "a store or a job's output is a folder or an S3 prefix"


def require(uri: str) -> None:
    """Raise :class:`StoreError` naming ``uri`` unless it is a folder that exists: ``missing_bucket`` for an S3
    bucket that does not exist, ``not_found`` for a local folder or an S3 prefix that holds nothing, ``wrong_type``
    for a file. For a job's ``--store``, checked before any work starts."""
    fs, path = resolve(uri)
    found = retrying(uri, lambda: fs.get_file_info(path)).type
    if found == pafs.FileType.File:
        raise StoreError(uri, f"a file, not a folder ({_FOLDER_HINT})", WRONG_TYPE)
    if found != pafs.FileType.NotFound:
        return
    if is_s3(uri):
        _check_bucket(uri, fs, path)
    raise StoreError(uri, "not found: nothing is stored there (check the URI)", NOT_FOUND)


def require_folder_or_absent(uri: str, hint: str = _FOLDER_HINT) -> None:
    """Raise :class:`StoreError` (``wrong_type``, its reason ending in ``hint``) naming ``uri`` when it, or a local
    folder above it, is a file: where a job will create a folder (its output, an ingest's store) or reads one,
    checked before any work starts. (On S3 an object does not stand in the way of the keys below its name.)"""
    fs, target = resolve(uri)
    path = target
    while True:
        found = retrying(uri, lambda p=path: fs.get_file_info(p)).type
        if found == pafs.FileType.File:
            where = "a file" if path == target else f"under a file ({path})"
            raise StoreError(uri, f"{where}, not a folder ({hint})", WRONG_TYPE)
        parent = posixpath.dirname(path.rstrip("/"))
        if found != pafs.FileType.NotFound or is_s3(uri) or parent in ("", path):
            return
        path = parent


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly under ``uri``, sorted; ``[]`` for a missing prefix.

    On S3 a "folder" is a common key prefix, so only folders holding at least one object are seen.
    """
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    infos = retrying(uri, lambda: fs.get_file_info(selector))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def list_files(uri: str, recursive: bool = True, suffixes: Iterable[str] | None = None) -> list[str]:
    """Files under ``uri`` as full URIs in the caller's style (``join(uri, relative)``), sorted.

    A missing prefix gives ``[]``; a missing bucket (``missing_bucket``) or an unreachable store raises
    :class:`StoreError`.
    """
    fs, path = resolve(uri)
    wanted = tuple(suffixes) if suffixes is not None else None
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    infos = retrying(uri, lambda: fs.get_file_info(selector))
    if not infos and is_s3(uri):
        # A missing prefix is an empty listing, but a missing bucket is a mistake worth reporting.
        _check_bucket(uri, fs, path)
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(path) :].lstrip("/")
        if wanted is not None and not relative.endswith(wanted):
            continue
        out.append(join(uri, relative))
    return sorted(out)


def discard(uri: str) -> None:
    """Best-effort recursive delete of what a failed job staged: one attempt (no retry budget), and a warning
    instead of an error, so a cleanup during an outage neither waits out another budget nor hides the failure
    it follows. Readers never look at staged files; the next run of the job removes what is left."""
    try:
        with retry_budget(0):
            delete(uri, recursive=True)
    except StoreError as exc:
        logger.warning("left %s behind (%s); readers never look there", uri, exc.reason)


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


# --- compare-and-swap ---------------------------------------------------------------------------------

# A local lock file older than this is taken to be left by a crashed writer and broken.
STALE_LOCK_S = 60.0
_CAS_LOCK = threading.Lock()
_CAS_SUPPORT: dict[tuple[str | None, str], bool] = {}  # (endpoint, bucket) -> the server enforces conditions


class WriteConflict(Exception):
    """A conditional write (:func:`write_if`) lost: the object changed since it was read. Picklable."""

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(f"{uri}: {detail}")
        self.uri = uri
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.uri, self.detail))


@dataclass(frozen=True)
class Versioned:
    """An object as read for a conditional write: its bytes (None: absent) and the tag :func:`write_if` compares
    (the ETag on S3, the SHA-256 of the bytes elsewhere; None when absent)."""

    data: bytes | None
    tag: str | None


def read_versioned(uri: str) -> Versioned:
    """The object at ``uri`` and its tag for :func:`write_if`; ``Versioned(None, None)`` when it does not exist."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = s3_bucket_key(uri)

        def get() -> Versioned:
            try:
                response = boto3_client().get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return Versioned(None, None)
                raise
            return Versioned(response["Body"].read(), response["ETag"])

        return retrying(uri, get)
    try:
        data = read_bytes(uri)
    except StoreError as exc:
        if exc.kind == NOT_FOUND:
            return Versioned(None, None)
        raise
    return Versioned(data, _content_tag(data))


def write_if(uri: str, data: bytes, expected: Versioned, content_type: str = "application/octet-stream") -> None:
    """Replace the object at ``uri`` with ``data`` only if it is still the one :func:`read_versioned` returned
    (absent, if it was absent); else raise :class:`WriteConflict`. The write itself is atomic.

    * S3: ``put_object`` with ``IfMatch=<ETag>`` (``IfNoneMatch="*"`` when creating) through boto3. The first
      conditional write to a bucket probes whether the server enforces these headers
      (:func:`conditional_writes_supported`). A server that ignores them or answers 501 gets a plain atomic PUT,
      with a warning: of two racing writers the last one wins.
    * Local folder: a lock file created with ``O_CREAT | O_EXCL`` beside the object serialises writers; the
      object is re-read under the lock and replaced with ``os.replace``. A lock older than :data:`STALE_LOCK_S`
      is broken; waiting longer than that for a held one is a conflict.
    * Any other filesystem: plain atomic replace, with the same warning as an S3 server without conditions.
    """
    if is_s3(uri):
        _write_if_s3(uri, data, expected.tag, content_type)
        return
    fs, path = resolve(uri)  # after the S3 branch: boto3 writes there, no pyarrow filesystem is needed
    if isinstance(fs, pafs.LocalFileSystem):
        _write_if_local(uri, path, data, expected.tag)
    else:
        logger.warning("%s: no compare-and-swap on this filesystem; racing writers: last writer wins", uri)
        replace_bytes(uri, data)


def _content_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_if_s3(uri: str, data: bytes, etag: str | None, content_type: str) -> None:
    from botocore.exceptions import ClientError

    bucket, key = s3_bucket_key(uri)
    client = boto3_client()
    if not conditional_writes_supported(bucket, key, client):
        logger.warning("%s: the S3 server ignores conditional writes (If-Match); racing writers: last writer wins", uri)
        replace_bytes(uri, data)
        return
    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}

    def put() -> str | None:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, **condition)
        except ClientError as exc:
            return _conflict(exc)
        return None

    # A PUT retried after an outage may find its own earlier attempt applied: that reads as a conflict, and the
    # caller re-reads the object and decides again.
    conflict = retrying(uri, put)
    if conflict is not None:
        raise WriteConflict(uri, f"changed concurrently ({conflict})")


def _write_if_local(uri: str, path: str, data: bytes, tag: str | None) -> None:
    lock = path + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    deadline = time.monotonic() + STALE_LOCK_S
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                age = time.time() - os.stat(lock).st_mtime
            except FileNotFoundError:
                continue
            if age > STALE_LOCK_S:
                logger.warning("%s: breaking a lock %.0f s old (a writer crashed)", lock, age)
                _unlink_quietly(lock)
                continue
            if time.monotonic() > deadline:
                raise WriteConflict(uri, f"lock {lock} held for too long") from None
            time.sleep(0.01)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        try:
            with open(path, "rb") as handle:
                found = _content_tag(handle.read())
        except FileNotFoundError:
            found = None
        if found != tag:
            raise WriteConflict(uri, "changed since it was read")
        replace_bytes(uri, data)
    finally:
        _unlink_quietly(lock)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _conflict(exc: Exception) -> str | None:
    """The error code of a conditional PUT that lost (412: the ETag no longer matches; 409: AWS's answer to a
    concurrent conditional write); any other failure is raised again for :func:`retrying` to classify."""
    response = getattr(exc, "response", {}) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return str(code or status)
    raise exc


def conditional_writes_supported(bucket: str, key: str, client: Any = None) -> bool:
    """Probe once per (endpoint, bucket): does a second ``IfNoneMatch="*"`` PUT of an object fail with 412?

    The probe object lives two levels above ``key`` (for ``registry/<product>/best.json``, in ``registry/``)
    and is deleted after the probe.
    """
    from botocore.exceptions import ClientError

    client = client or boto3_client()
    cache_key = (s3_endpoint(), bucket)
    with _CAS_LOCK:
        if cache_key in _CAS_SUPPORT:
            return _CAS_SUPPORT[cache_key]
    probe = f"{key.rsplit('/', 2)[0]}/.conditional-write-probe-{uuid.uuid4().hex}"
    probe_uri = f"s3://{bucket}/{probe}"

    def put() -> str | None:
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"probe", IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501:
                return "501"
            return _conflict(exc)
        return None

    try:
        # Two PUTs; a conflict on either (the first too, when a retry found its own earlier attempt) = enforced.
        answers = [retrying(probe_uri, put) for _ in range(2)]
    finally:
        discard(probe_uri)  # one attempt: after a failure it must not wait out another budget
    supported = "501" not in answers and any(answer is not None for answer in answers)
    with _CAS_LOCK:
        _CAS_SUPPORT[cache_key] = supported
    return supported
