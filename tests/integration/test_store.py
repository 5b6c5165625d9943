"""tsdn_platform.store on a local folder and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import pickle
import socket

import pyarrow.fs as pafs
import pytest

from tsdn_platform import store
from tsdn_platform.store import StoreError


def _roundtrip(base: str) -> None:
    store.write_bytes(store.join(base, "a", "x.bin"), b"\x00\x01payload")
    store.write_json(store.join(base, "a", "b", "y.json"), {"k": [1, 2], "z": "é"})
    store.write_bytes(store.join(base, "c.txt"), b"text")

    assert store.read_bytes(store.join(base, "a", "x.bin")) == b"\x00\x01payload"
    assert store.read_json(store.join(base, "a/b/y.json")) == {"k": [1, 2], "z": "é"}
    assert store.exists(store.join(base, "a", "x.bin"))
    assert store.exists(store.join(base, "a"))
    assert not store.exists(store.join(base, "nope.bin"))

    everything = store.list_files(base)
    assert everything == sorted(everything)
    assert everything == [store.join(base, p) for p in ("a/b/y.json", "a/x.bin", "c.txt")]
    assert store.list_files(base, suffixes=(".json",)) == [store.join(base, "a/b/y.json")]
    assert store.list_files(base, recursive=False) == [store.join(base, "c.txt")]
    assert store.list_files(store.join(base, "missing-prefix")) == []

    store.replace_json(store.join(base, "ptr.json"), {"v": 1})
    store.replace_json(store.join(base, "ptr.json"), {"v": 2})
    assert store.read_json(store.join(base, "ptr.json")) == {"v": 2}

    store.copy(store.join(base, "c.txt"), store.join(base, "d", "c2.txt"))
    store.move(store.join(base, "d", "c2.txt"), store.join(base, "e", "c3.txt"))
    assert store.read_bytes(store.join(base, "e", "c3.txt")) == b"text"
    assert not store.exists(store.join(base, "d", "c2.txt"))

    with pytest.raises(StoreError) as info:
        store.read_bytes(store.join(base, "nope.bin"))
    assert info.value.kind == "not_found"
    assert store.join(base, "nope.bin") in str(info.value)

    with pytest.raises(StoreError, match="recursive=True"):
        store.delete(store.join(base, "a"))
    store.delete(store.join(base, "a"), recursive=True)
    store.delete(store.join(base, "c.txt"))
    store.delete(store.join(base, "never-existed.txt"))
    assert store.list_files(base) == [store.join(base, "e/c3.txt"), store.join(base, "ptr.json")]


@pytest.mark.parametrize("style", ["plain", "file"])
def test_local_roundtrip(tmp_path, style):
    base = str(tmp_path / "store") if style == "plain" else f"file://{tmp_path}/store"
    _roundtrip(base)


def test_local_replace_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "registry" / "best.json"
    for version in range(5):
        store.replace_json(str(target), {"version": version})
    assert [p.name for p in target.parent.iterdir()] == ["best.json"]
    assert store.read_json(str(target)) == {"version": 4}


def test_resolve_maps_uris_to_filesystems(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = store.resolve("relative/dir")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "relative" / "dir")
    assert store.resolve(f"file://{tmp_path}/x")[1] == str(tmp_path / "x")

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fs, path = store.resolve("s3://bucket/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/some/prefix"
    assert fs.region == "eu-west-1"
    assert pickle.loads(pickle.dumps(fs)).region == "eu-west-1"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("gs://bucket/x", "unsupported scheme"),
        ("s3://bucket/x?endpoint_override=localhost", "AWS_"),
        ("s3:///no-bucket", "no bucket"),
        ("file://otherhost/x", "local path"),
    ],
)
def test_bad_uris_are_rejected_by_name(uri, reason):
    with pytest.raises(StoreError, match=reason) as info:
        store.resolve(uri)
    assert info.value.kind == "invalid"
    assert str(info.value).startswith(uri)


def test_join():
    assert store.join("s3://b/p/", "a", "/b/", "c.json") == "s3://b/p/a/b/c.json"
    assert store.join("/tmp/x", "y") == "/tmp/x/y"
    assert store.join("file:///tmp/x/", "") == "file:///tmp/x"
    assert store.join("/", "etc") == "/etc"


def test_store_error_pickles_with_its_kind():
    err = StoreError("s3://b/k", "access denied: nope", "access_denied")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StoreError
    assert (back.uri, back.reason, back.kind, str(back)) == (err.uri, err.reason, err.kind, str(err))


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.", "throttled"),
        ("AWS Error ACCESS_DENIED during HeadObject operation", "access_denied"),
        ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7", "unreachable"),
        ("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation", "not_found"),
        ("something else entirely", "error"),
    ],
)
def test_errors_are_classified(message, kind):
    err = store.as_store_error("s3://b/k", OSError(message))
    assert err.kind == kind
    assert str(err).startswith("s3://b/k: ")
    assert message in str(err)


def test_throttling_is_retried_with_growing_backoff():
    calls = []
    delays: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation")
        return "ok"

    assert store.retrying("s3://b/k", flaky, attempts=4, base_delay_s=0.1, sleep=delays.append) == "ok"
    assert len(calls) == 3
    assert len(delays) == 2
    assert 0.1 <= delays[0] <= 0.2 and 0.2 <= delays[1] <= 0.4


def test_retries_give_up_with_a_store_error_and_do_not_retry_permanent_errors():
    calls = []

    def throttled() -> None:
        calls.append(1)
        raise OSError("AWS Error SLOW_DOWN")

    with pytest.raises(StoreError) as info:
        store.retrying("s3://b/k", throttled, attempts=3, sleep=lambda _: None)
    assert info.value.kind == "throttled" and len(calls) == 3

    calls.clear()

    def denied() -> None:
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED")

    with pytest.raises(StoreError) as info:
        store.retrying("s3://b/k", denied, attempts=3, sleep=lambda _: None)
    assert info.value.kind == "access_denied" and len(calls) == 1


# --- real S3 ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_roundtrip(s3):
    _roundtrip(s3.uri("store"))


@pytest.mark.integration
def test_s3_objects_are_byte_exact_for_other_clients(s3):
    """pyarrow's upload must not leave aws-chunked framing in the object (boto3 reads the same bytes)."""
    uri = s3.uri("exact")
    payload = bytes(range(256)) * 4096  # 1 MiB
    store.write_bytes(store.join(uri, "blob"), payload)
    bucket, key = store.s3_bucket_key(store.join(uri, "blob"))
    body = store.boto3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == payload


@pytest.mark.integration
def test_s3_endpoint_from_aws_endpoint_url_alone(s3, monkeypatch):
    uri = s3.uri("generic-endpoint")
    store.write_bytes(store.join(uri, "k"), b"v")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert store.read_bytes(store.join(uri, "k")) == b"v"
    assert store.list_files(uri) == [store.join(uri, "k")]


@pytest.mark.integration
def test_s3_missing_bucket_is_a_clear_error(s3):
    uri = "s3://no-such-bucket-tsdn/x.json"
    with pytest.raises(StoreError) as info:
        store.read_json(uri)
    assert info.value.kind == "not_found"
    assert str(info.value).startswith(uri)
    with pytest.raises(StoreError) as info:
        store.list_files("s3://no-such-bucket-tsdn/prefix")
    assert info.value.kind == "not_found"


@pytest.mark.integration
def test_s3_wrong_credentials_are_access_denied(s3, monkeypatch):
    uri = s3.uri("denied")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StoreError) as info:
        store.write_bytes(store.join(uri, "k"), b"v")
    assert info.value.kind == "access_denied"
    assert store.join(uri, "k") in str(info.value)


@pytest.mark.integration
@pytest.mark.slow
def test_s3_endpoint_down_is_a_clear_error(s3, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port}")
    uri = f"s3://{s3.bucket}/down/x.json"
    with pytest.raises(StoreError) as info:
        store.read_json(uri)
    assert info.value.kind == "unreachable"
    assert str(info.value).startswith(uri)
    assert f"127.0.0.1:{closed_port}" in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).kind == "unreachable"
