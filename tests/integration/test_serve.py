"""tsdn_platform.serve: the HTTP API of a real local Serve application on 127.0.0.1, and its pure helpers.

One module-scoped application serves four tiny registered products (timm ``test_efficientnet``, 64 px)
from the SeaweedFS store, with a multiplexing cache of two models per replica.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _ports import free_ports
from PIL import Image

from tsdn.calibration import quantile_false_positive_rate
from tsdn.config_io import ConfigError
from tsdn.image import decode_image
from tsdn.response import decode_float_map
from tsdn_platform.cli import build_parser
from tsdn_platform.serve import (
    ApiError,
    ServeConfig,
    auth_required,
    build_app,
    config_from_args,
    load_token_scopes,
    load_tokens,
    split_model_id,
)
from tsdn_platform.serve_auth import check_token, token_digest

CACHED_PRODUCTS = ("bottle", "cable", "screw")  # three products, a cache of two
PATCHCORE_PRODUCT = "screw"  # served by the second model family, through the same predictor path
PROMOTED = "grid"  # gets a second version promoted while the server runs
TOKENS_ENV = "TSDN_TEST_SERVE_TOKENS"
TOKEN = "env-token-" + uuid.uuid4().hex
FILE_TOKEN = "file-token-" + uuid.uuid4().hex
SCOPED_TOKEN = "scoped-token-" + uuid.uuid4().hex  # may detect on bottle and screw only (auth_tokens_file)
SCOPE = ("bottle", "screw")
MAX_BODY = 48_000
MAX_PIXELS = 160 * 160
HTTP_TIMEOUT_S = 120.0


# --- pure helpers (no Ray) ------------------------------------------------------------------------


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="store"):
        ServeConfig()
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServeConfig(store="s", max_batch_size=0)
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        ServeConfig(store="s", max_batch_size=16, max_ongoing_requests=8)
    with pytest.raises(ConfigError, match="pointer_ttl_s"):
        ServeConfig(store="s", pointer_ttl_s=float("nan"))
    with pytest.raises(ConfigError, match="autoscaling_config"):
        ServeConfig(store="s", autoscaling_config={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ConfigError, match="max_concurrent_decodes"):
        ServeConfig(store="s", max_concurrent_decodes=0)


def test_serving_refuses_smaller_images_than_batch_scoring_by_default():
    from tsdn_platform.score import ScoreConfig

    assert ServeConfig(store="s").max_image_pixels < ScoreConfig(store="s", input="i", output="o").max_image_pixels


def test_cli_flags_and_overrides_resolve_the_config():
    args = build_parser().parse_args(
        ["serve", "--store", "s3://b/p", "--port", "8123", "--set", "max_batch_size=1", "--set", "pointer_ttl_s=0.5"]
    )
    cfg = config_from_args(args)
    resolved = (cfg.store, cfg.host, cfg.port, cfg.max_batch_size, cfg.pointer_ttl_s)
    assert resolved == ("s3://b/p", "127.0.0.1", 8123, 1, 0.5)


def test_tokens_from_env_and_file(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("# rotated monthly\nfile-a\n\n  file-b  \n")
    monkeypatch.setenv("TSDN_X_TOKENS", " env-a , ,env-b")
    cfg = ServeConfig(store="s", auth_tokens_env="TSDN_X_TOKENS", auth_tokens_file=str(path))
    tokens = load_tokens(cfg)
    assert tokens == ["env-a", "env-b", "file-a", "file-b"]
    assert auth_required(cfg, tokens)
    open_cfg = ServeConfig(store="s", auth_tokens_env="TSDN_UNSET_TOKENS")
    assert not auth_required(open_cfg, load_tokens(open_cfg))


def test_auth_defaults_refuse_unsafe_setups(monkeypatch):
    monkeypatch.delenv("TSDN_UNSET_TOKENS", raising=False)
    with pytest.raises(ConfigError, match="no token is configured"):
        build_app(ServeConfig(store="s", auth_tokens_env="TSDN_UNSET_TOKENS", auth_required=True))
    with pytest.raises(ConfigError, match="non-loopback"):
        build_app(ServeConfig(store="s", host="0.0.0.0", auth_tokens_env="TSDN_UNSET_TOKENS"))


def test_check_token_statuses():
    digests = [(token_digest("alpha"), None), (token_digest("beta"), frozenset({"gearbox"}))]
    assert check_token("Bearer beta", digests, "gearbox") == {"gearbox"}
    assert check_token("bearer  alpha", digests, "housing") is None
    cases = ((None, 401), ("Basic YWxwaGE=", 401), ("Bearer ", 401), ("Bearer gamma", 401), ("Bearer beta", 403))
    for header, status in cases:
        with pytest.raises(ApiError) as exc:
            check_token(header, digests, "housing")
        assert exc.value.status == status


def test_token_scopes_from_env_and_file(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("# comment\nfile-a gearbox housing\nfile-b\nenv-a housing\n")
    monkeypatch.setenv("TSDN_X_TOKENS", "env-a gearbox, env-b,env-c pump")
    cfg = ServeConfig(store="s", auth_tokens_env="TSDN_X_TOKENS", auth_tokens_file=str(path))
    assert load_token_scopes(cfg) == {
        "env-a": {"gearbox", "housing"},  # listed twice: both entries' products
        "env-b": None,
        "env-c": {"pump"},
        "file-a": {"gearbox", "housing"},
        "file-b": None,
    }
    assert load_tokens(cfg) == ["env-a", "env-b", "env-c", "file-a", "file-b"]
    monkeypatch.setenv("TSDN_X_TOKENS", "env-a ../etc")
    with pytest.raises(ConfigError, match="product id"):
        load_token_scopes(ServeConfig(store="s", auth_tokens_env="TSDN_X_TOKENS"))


def test_model_ids_round_trip():
    assert split_model_id("bottle@20261129T051200Z-1a2b3c4d") == ("bottle", "20261129T051200Z-1a2b3c4d")
    with pytest.raises(ValueError, match="model id"):
        split_model_id("bottle")


def test_batching_is_reconfigured_through_user_config():
    from tsdn_platform.serve import TSDNModel

    model = TSDNModel.func_or_class("unused-store", 2)
    model.reconfigure({"max_batch_size": 1, "batch_wait_timeout_s": 0})
    assert model.batch_settings() == {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    model.reconfigure({"batch_wait_timeout_s": 0.2})
    assert model.batch_settings() == {"max_batch_size": 1, "batch_wait_timeout_s": 0.2}
    for bad in ({"max_batch_size": 0}, {"batch_wait_timeout_s": -1}, {"models": 3}):
        with pytest.raises(ValueError, match="user_config"):
            model.reconfigure(bad)


def test_app_builder_takes_serve_config_fields(monkeypatch):
    from ray.serve import Application

    from tsdn_platform.serve import app_builder

    monkeypatch.setenv("TSDN_X_TOKENS", "t")
    app = app_builder({"store": "s3://bucket/prefix", "max_batch_size": 4, "auth_tokens_env": "TSDN_X_TOKENS"})
    assert isinstance(app, Application)
    with pytest.raises(ConfigError, match="unknown config key"):
        app_builder({"store": "s3://bucket/prefix", "batch": 4})


def test_the_infra_serve_config_builds(monkeypatch):
    import yaml
    from ray.serve import Application

    from tsdn_platform.serve import app_builder

    path = Path(__file__).resolve().parents[2] / "infra" / "serve.yaml"
    (spec,) = [app for app in yaml.safe_load(path.read_text())["applications"] if app["name"] == "tsdn"]
    assert spec["import_path"] == "tsdn_platform.serve:app_builder"
    monkeypatch.setenv(spec["args"].get("auth_tokens_env", "TSDN_SERVE_TOKENS"), "t")
    assert isinstance(app_builder(spec["args"]), Application)


# --- the live application -------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    store: str
    images: dict[str, bytes]  # name -> encoded image
    expected: dict[tuple[str, str], tuple[str, float, float]]  # (product, image) -> (version, score, threshold)
    maps: dict[tuple[str, str], np.ndarray]  # (product, image) -> the predictor's (H, W) map

    def post(self, product: str, body: bytes, content_type: str = "image/png", token: str | None = TOKEN, **params):
        import httpx

        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = f"{self.url}/v1/products/{product}/detect"
        return httpx.post(url, content=body, headers=headers, params=params, timeout=HTTP_TIMEOUT_S)


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _test_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "rgb64.png": _encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "PNG"),
        "rgb80x96.png": _encode(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8), "PNG"),
        "gray72.png": _encode(rng.integers(0, 256, (72, 72), dtype=np.uint8), "PNG"),
        "rgb64.jpg": _encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG"),
    }


def _register_tiny_model(registry, product: str, seed: int) -> str:
    from tsdn_platform.testing import calibrate, register, tiny_model

    model = tiny_model("patchcore" if product == PATCHCORE_PRODUCT else "tsdn", seed)
    metrics = {"test": {"image_auroc": 0.5 + seed / 100}, "run_id": f"{product}-{seed}"}
    return register(registry, product, model, calibrate(model, seed), metrics)


def _expected(registry, product: str, images: dict[str, bytes]) -> dict[tuple[str, str], tuple[str, float, float]]:
    return {key: value[:3] for key, value in _predicted(registry, product, images).items()}


def _predicted(registry, product: str, images: dict[str, bytes]) -> dict[tuple[str, str], tuple]:
    """(product, image) -> (version, score, threshold, map) of the in-process predictor."""
    predictor, ref = registry.load_predictor(product)
    decoded = [decode_image(data, name) for name, data in images.items()]
    detections = predictor.predict(decoded)
    return {
        (product, name): (ref.version, d.anomaly_score, d.threshold, d.anomaly_map)
        for name, d in zip(images, detections)
    }


@pytest.fixture(scope="module")
def server(s3, ray_local, tmp_path_factory) -> Iterator[Server]:
    from ray import serve

    from tsdn_platform.registry import Registry
    from tsdn_platform.serve import start_server

    store = s3.uri("serve")
    registry = Registry(store)
    images = _test_images()
    expected: dict[tuple[str, str], tuple[str, float, float]] = {}
    maps: dict[tuple[str, str], np.ndarray] = {}
    for seed, product in enumerate((*CACHED_PRODUCTS, PROMOTED)):
        _register_tiny_model(registry, product, seed)
        for key, (*head, anomaly_map) in _predicted(registry, product, images).items():
            expected[key], maps[key] = tuple(head), anomaly_map
    token_file = tmp_path_factory.mktemp("serve") / "tokens"
    token_file.write_text(f"{FILE_TOKEN}\n# scoped to two product lines\n{SCOPED_TOKEN} {' '.join(SCOPE)}\n")
    cfg = ServeConfig(
        store=store,
        port=free_ports(1)[0],
        app_name="tsdn-test",
        max_body_bytes=MAX_BODY,
        max_image_pixels=MAX_PIXELS,
        models_per_replica=2,
        max_batch_size=8,
        batch_wait_timeout_s=0.05,
        num_cpus_per_replica=1.0,
        pointer_ttl_s=0.5,
        auth_tokens_env=TOKENS_ENV,
        auth_tokens_file=str(token_file),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKENS_ENV, f"{TOKEN},second-token")
        url = start_server(cfg)
    try:
        yield Server(url=url, store=store, images=images, expected=expected, maps=maps)
    finally:
        serve.shutdown()


def _assert_answer(answer: dict, product: str, expected: tuple[str, float, float]) -> None:
    version, score, threshold = expected
    assert answer["product"] == product
    assert answer["model_version"] == version
    assert answer["anomaly_score"] == pytest.approx(score, rel=1e-4, abs=1e-6)
    assert answer["threshold"] == pytest.approx(threshold)
    assert answer["is_anomalous"] == (answer["anomaly_score"] >= answer["threshold"])
    assert answer["inference_ms"] > 0


@pytest.mark.integration
@pytest.mark.slow
def test_healthz_needs_no_token(server):
    import httpx

    response = httpx.get(f"{server.url}/healthz", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.integration
@pytest.mark.slow
def test_scores_over_http_equal_the_predictor(server):
    for product in CACHED_PRODUCTS:
        for name, data in server.images.items():
            content_type = "image/jpeg" if name.endswith(".jpg") else "image/png"
            response = server.post(product, data, content_type)
            assert response.status_code == 200, response.text
            _assert_answer(response.json(), product, server.expected[product, name])


@pytest.mark.integration
@pytest.mark.slow
def test_three_products_with_a_cache_of_two_all_answer_correctly(server):
    # Round robin over three products with an LRU of two: every request evicts and reloads a model.
    for product in CACHED_PRODUCTS * 3:
        response = server.post(product, server.images["rgb64.png"])
        assert response.status_code == 200, response.text
        _assert_answer(response.json(), product, server.expected[product, "rgb64.png"])


@pytest.mark.integration
@pytest.mark.slow
def test_concurrent_requests_for_different_products_are_never_mixed(server):
    names = [n for n in server.images if n.endswith(".png")]
    jobs = [(CACHED_PRODUCTS[i % 2], names[i % len(names)]) for i in range(24)]  # two products: both stay cached

    def call(job):
        product, name = job
        return server.post(product, server.images[name])

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(call, jobs))
    for (product, name), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        _assert_answer(response.json(), product, server.expected[product, name])


@pytest.mark.integration
@pytest.mark.slow
def test_threshold_override_and_the_maps_on_request(server):
    product, name = CACHED_PRODUCTS[0], "rgb80x96.png"
    _, score, _ = server.expected[product, name]
    low = server.post(product, server.images[name], threshold=score / 2, include="heatmap,mask,anomaly_map").json()
    high = server.post(product, server.images[name], threshold=score * 2).json()
    assert (low["is_anomalous"], low["threshold"]) == (True, pytest.approx(score / 2))
    assert (high["is_anomalous"], high["threshold"]) == (False, pytest.approx(score * 2))
    assert 0.5 <= low["normalized_score"] <= 1 and 0 <= high["normalized_score"] < 0.5
    assert low["confidence"] == pytest.approx(low["normalized_score"])
    assert high["confidence"] == pytest.approx(1 - high["normalized_score"])
    assert not {"heatmap", "mask", "anomaly_map"} & set(high)  # maps only when asked
    heatmap = low["heatmap"]
    assert (heatmap["format"], heatmap["height"], heatmap["width"]) == ("png", 80, 96)
    image = Image.open(io.BytesIO(base64.b64decode(heatmap["data"])))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (96, 80))
    # The raw map is the predictor's (float16) at the image's size; the mask and the area are that map >= threshold.
    raw = decode_float_map(low["anomaly_map"])
    predictor_map = server.maps[product, name]
    assert raw.shape == predictor_map.shape == (80, 96)
    np.testing.assert_allclose(raw, predictor_map, rtol=2e-3, atol=1e-4)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(low["mask"]["data"]))))
    assert mask.shape == (80, 96) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, predictor_map >= score / 2)
    assert low["anomalous_area_pct"] == pytest.approx(100 * (mask == 255).mean(), abs=1e-3)
    for bad in (-1, 0, "nan", "inf"):  # a threshold that would flag everything, or none, is refused
        refused = server.post(product, server.images[name], threshold=bad)
        assert refused.status_code == 422 and "threshold" in refused.text


@pytest.mark.integration
@pytest.mark.slow
def test_multipart_upload_scores_like_a_raw_body(server):
    import httpx

    product, name = CACHED_PRODUCTS[1], "rgb64.png"
    response = httpx.post(
        f"{server.url}/v1/products/{product}/detect",
        files={"image": (name, server.images[name], "image/png")},
        headers={"Authorization": f"Bearer {FILE_TOKEN}"},  # the token from auth_tokens_file
        timeout=HTTP_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    _assert_answer(response.json(), product, server.expected[product, name])


@pytest.mark.integration
@pytest.mark.slow
def test_bmp_and_tiff_bodies_score_like_the_same_pixels_in_png(server):
    """The OpenAPI document (and the README) offered BMP and TIFF bodies, which the route refused with 415; inspection
    cameras write both, and the decoder reads them."""
    product, name = CACHED_PRODUCTS[0], "rgb64.png"
    pixels = np.asarray(Image.open(io.BytesIO(server.images[name])))
    for fmt, content_type in (("BMP", "image/bmp"), ("TIFF", "image/tiff")):
        response = server.post(product, _encode(pixels, fmt), content_type)
        assert response.status_code == 200, (fmt, response.text)
        _assert_answer(response.json(), product, server.expected[product, name])


def _bomb() -> bytes:
    """A 4000 x 4000 grayscale PNG of a few KB: its header alone exceeds MAX_PIXELS."""
    return _encode(np.zeros((4000, 4000), dtype=np.uint8), "PNG")


def _chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


ERROR_CASES = {
    "unknown product": (404, "nope", "rgb64.png", {}, {}, "unknown product"),
    "path traversal": (404, "..%2F..%2Fregistry", "rgb64.png", {}, {}, ""),
    "invalid product id": (404, "bad$name", "rgb64.png", {}, {}, "product id"),
    "dot product id": (404, ".hidden", "rgb64.png", {}, {}, "product id"),
    "text body": (415, "bottle", "rgb64.png", {"Content-Type": "text/plain"}, {}, "unsupported content type"),
    "no content type": (415, "bottle", "rgb64.png", {"Content-Type": ""}, {}, "unsupported content type"),
    "undecodable image": (422, "bottle", "garbage", {}, {}, "not a PNG"),
    "decompression bomb": (422, "bottle", "bomb", {}, {}, "refused before decoding"),
    "threshold not a number": (422, "bottle", "rgb64.png", {}, {"threshold": "abc"}, "threshold"),
    "threshold nan": (422, "bottle", "rgb64.png", {}, {"threshold": "nan"}, "finite"),
    "unknown include": (422, "bottle", "rgb64.png", {}, {"include": "reconstruction"}, "include"),
    "no token": (401, "bottle", "rgb64.png", {"Authorization": ""}, {}, "bearer"),
    "wrong token": (401, "bottle", "rgb64.png", {"Authorization": "Bearer wrong"}, {}, "invalid token"),
    "body over limit": (413, "bottle", "large", {}, {}, "exceeds the limit"),
    "chunked body over limit": (413, "bottle", "large-chunked", {}, {}, "exceeds the limit"),
}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_errors_are_json_with_a_reason(server, case):
    import httpx

    status, product, body_name, extra_headers, params, reason = ERROR_CASES[case]
    large = np.random.default_rng(1).integers(0, 256, (MAX_BODY + 1,), dtype=np.uint8).tobytes()
    bodies = {"garbage": b"definitely not an image", "bomb": _bomb(), "large": large}
    body = _chunks(large) if body_name == "large-chunked" else bodies.get(body_name) or server.images[body_name]
    headers = {"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}", **extra_headers}
    headers = {key: value for key, value in headers.items() if value}
    response = httpx.post(
        f"{server.url}/v1/products/{product}/detect",
        content=body,
        headers=headers,
        params=params,
        timeout=HTTP_TIMEOUT_S,
    )
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["status"] == status
    assert reason.lower() in answer["reason"].lower()


def _multipart(parts: list[tuple[str, str | None, str | None, bytes]]) -> tuple[bytes, str]:
    """(field, filename, content type, data) parts -> (body, Content-Type header)."""
    boundary = "tsdn-test-boundary"
    chunks = []
    for field, filename, part_type, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        head += f"Content-Type: {part_type}\r\n" if part_type else ""
        chunks.append(head.encode() + b"\r\n" + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


MULTIPART_CASES = {
    "two files": (400, [("a", "a.png", "image/png", "rgb64.png"), ("b", "b.png", "image/png", "rgb64.png")], "files"),
    "no file": (422, [("note", None, None, "text")], "exactly one file part"),
    "text part": (415, [("image", "notes.txt", "text/plain", "rgb64.png")], "unsupported content type"),
    "undecodable part": (422, [("image", "x.png", "image/png", "garbage")], "not a PNG"),
    "malformed": (400, [], "malformed multipart"),
}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("case", MULTIPART_CASES, ids=list(MULTIPART_CASES))
def test_multipart_errors(server, case):
    status, parts, reason = MULTIPART_CASES[case]
    payloads = {"text": b"a note", "garbage": b"definitely not an image", **server.images}
    if parts:
        body, content_type = _multipart([(f, n, t, payloads[key]) for f, n, t, key in parts])
    else:
        body, content_type = b"no boundary in sight", "multipart/form-data; boundary=tsdn-test-boundary"
    response = server.post("bottle", body, content_type)
    assert response.status_code == status, response.text
    assert reason.lower() in response.json()["reason"].lower()


@pytest.mark.integration
@pytest.mark.slow
def test_products_lists_short_summaries_and_details_by_product(server):
    import httpx

    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{server.url}/v1/products", timeout=HTTP_TIMEOUT_S).status_code == 401
    response = httpx.get(f"{server.url}/v1/products", headers=auth, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200, response.text
    listed = {entry["product"]: entry for entry in response.json()["products"]}
    assert set(CACHED_PRODUCTS) <= set(listed)
    for seed, product in enumerate(CACHED_PRODUCTS):
        version, _, threshold = server.expected[product, "rgb64.png"]
        entry = listed[product]
        assert entry["model_version"] == version
        assert entry["metrics"] == {"test": {"image_auroc": pytest.approx(0.5 + seed / 100)}}
        assert entry["family"] == ("patchcore" if product == PATCHCORE_PRODUCT else "tsdn")
        assert (entry["image_size"], entry["threshold"]) == (64, pytest.approx(threshold))
        assert entry["score_source"] == (None if product == PATCHCORE_PRODUCT else "reconstruction")
    # Short, and never a store path or a local path.
    assert len(response.content) < 600 * len(listed)
    assert "s3://" not in response.text and "/tmp" not in response.text
    details = httpx.get(f"{server.url}/v1/products/{CACHED_PRODUCTS[0]}", headers=auth, timeout=HTTP_TIMEOUT_S)
    assert details.status_code == 200, details.text
    body = details.json()
    assert body["model_version"] == listed[CACHED_PRODUCTS[0]]["model_version"]
    assert body["calibration"]["threshold"] == pytest.approx(listed[CACHED_PRODUCTS[0]]["threshold"])
    # what the quantile threshold promises on unseen good images, from the number of normal images it came from
    expected, bound = quantile_false_positive_rate(body["calibration"]["n_normal"], body["calibration"]["quantile"])
    assert body["expected_false_positive_rate"] == pytest.approx(expected)
    assert listed[CACHED_PRODUCTS[0]]["false_positive_rate_95"] == pytest.approx(bound)
    assert body["config"]["image_size"] == 64 and "weights" not in body["config"]
    assert body["record"]["run_id"] == f"{CACHED_PRODUCTS[0]}-0"
    missing = httpx.get(f"{server.url}/v1/products/nope", headers=auth, timeout=HTTP_TIMEOUT_S)
    assert missing.status_code == 404 and "s3://" not in missing.text


@pytest.mark.integration
@pytest.mark.slow
def test_openapi_is_typed_and_behind_the_token(server):
    import httpx

    assert httpx.get(f"{server.url}/openapi.json", timeout=HTTP_TIMEOUT_S).status_code == 401
    for route in ("/docs", "/redoc"):  # Swagger UI and ReDoc need a CDN: off
        assert httpx.get(f"{server.url}{route}", timeout=HTTP_TIMEOUT_S).status_code == 404
    spec = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60).json()
    detect = spec["paths"]["/v1/products/{product}/detect"]["post"]
    declared = {"image/png", "image/jpeg", "image/bmp", "image/tiff", "multipart/form-data"}
    assert set(detect["requestBody"]["content"]) == declared
    for media_type in declared - {"multipart/form-data"}:  # what the document offers, the route takes
        assert server.post(CACHED_PRODUCTS[0], b"not an image", media_type).status_code == 422, media_type
    assert detect["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/DetectResponse")
    fields = spec["components"]["schemas"]["DetectResponse"]["properties"]
    assert {"is_anomalous", "anomaly_score", "normalized_score", "confidence", "anomalous_area_pct", "mask"} <= set(
        fields
    )
    assert "/v1/products/{product}" in spec["paths"]


@pytest.mark.integration
@pytest.mark.slow
def test_promotion_switches_the_served_version_without_a_restart(server):
    from tsdn_platform.registry import Registry

    name = "rgb64.png"
    before = server.post(PROMOTED, server.images[name]).json()
    _assert_answer(before, PROMOTED, server.expected[PROMOTED, name])

    registry = Registry(server.store)
    new_version = _register_tiny_model(registry, PROMOTED, seed=40)
    expected = _expected(registry, PROMOTED, {name: server.images[name]})[PROMOTED, name]
    assert expected[0] == new_version != before["model_version"]
    # The ingress re-reads best.json every pointer_ttl_s (0.5 s); poll a bounded number of times.
    answer = before
    for _ in range(120):
        answer = server.post(PROMOTED, server.images[name]).json()
        if answer["model_version"] == new_version:
            break
        assert answer["model_version"] == before["model_version"]
        time.sleep(0.25)
    _assert_answer(answer, PROMOTED, expected)


@pytest.mark.integration
@pytest.mark.slow
def test_tsdn_serve_command_serves_until_interrupted(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tsdn_platform.registry import Registry

    store = str(tmp_path / "store")
    version = _register_tiny_model(Registry(store), "bottle", seed=7)
    port = free_ports(1)[0]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["TSDN_SERVE_TOKENS"] = TOKEN
    command = [sys.executable, "-m", "tsdn_platform.cli", "serve", "--store", store, "--port", str(port)]
    with open(tmp_path / "serve.log", "wb") as log:
        # Started as a background job of a non-interactive shell would be: SIGINT ignored. Ctrl-C must still work.
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):  # bounded: Ray + Serve start-up on a loaded machine
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        headers = {"Content-Type": "image/png", "Authorization": f"Bearer {TOKEN}"}
        image = _test_images()["rgb64.png"]
        response = httpx.post(f"{url}/v1/products/bottle/detect", content=image, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == version
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    output = (tmp_path / "serve.log").read_text()
    assert proc.returncode == 0, output
    assert f"at {url}/v1/products" in output
    assert 'curl -s -H "Authorization: Bearer $TOKEN"' in output


@pytest.mark.integration
@pytest.mark.slow
def test_a_token_scoped_to_product_lines_gets_403_on_the_others(server):
    import httpx

    allowed, other = SCOPE[0], "cable"
    ok = server.post(allowed, server.images["rgb64.png"], token=SCOPED_TOKEN)
    assert ok.status_code == 200, ok.text
    _assert_answer(ok.json(), allowed, server.expected[(allowed, "rgb64.png")])
    for product in (other, "housing"):  # served or not: the scope answers first, so it reveals nothing
        refused = server.post(product, server.images["rgb64.png"], token=SCOPED_TOKEN)
        assert refused.status_code == 403, refused.text
        assert refused.json() == {"status": 403, "reason": f"this token is not allowed to use product {product!r}"}
    assert server.post(other, server.images["rgb64.png"]).status_code == 200  # an unscoped token may
    auth = {"Authorization": f"Bearer {SCOPED_TOKEN}"}
    listed = httpx.get(f"{server.url}/v1/products", headers=auth, timeout=HTTP_TIMEOUT_S)
    assert listed.status_code == 200
    assert sorted(p["product"] for p in listed.json()["products"]) == sorted(SCOPE)  # only what it may use
    details = httpx.get(f"{server.url}/v1/products/{other}", headers=auth, timeout=HTTP_TIMEOUT_S)
    assert details.status_code == 403
    assert httpx.get(f"{server.url}/v1/products/{allowed}", headers=auth, timeout=HTTP_TIMEOUT_S).status_code == 200


def test_a_replica_lost_mid_request_is_a_503_the_client_may_retry():
    """What a client gets when the model replica's node goes away under its request (infra/README.md, "Losing a
    node"): the JSON error shape with a 503 and Retry-After, not FastAPI's plain 500."""
    import asyncio
    import json

    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from tsdn_platform.serve import _api_error, _replica_lost

    for lost in (ActorDiedError(), ActorUnavailableError("node gone", None)):
        err = _replica_lost("bottle:v1", lost)
        assert (err.status, err.reason) == (503, "model bottle:v1: the replica serving this request was lost; retry")
        response = asyncio.run(_api_error(None, err))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert json.loads(response.body) == {"status": 503, "reason": err.reason}
