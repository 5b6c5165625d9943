"""The model registry: every trained version of every product line, and a pointer to the best one.

Layout under ``<store>/registry/<product>/``::

    versions/<version>/model.safetensors   weights (never pickle: servers load these)
    versions/<version>/model.json          TSDN config + calibration (tsdn.checkpoint)
    versions/<version>/metrics.json        validation/test metrics, dataset manifest hash, run id,
                                           created_at, code version, sha256 of the other files
    versions/<version>/export/<format>/    exported models (onnx: model.onnx; openvino: model.xml +
                                           model.bin) + export.json (written last; tsdn.runtime reads it)
    best.json                              the pointer: {"version", "generation", "metric", "value", ...}

A version is complete once its ``metrics.json`` exists: it is written last, so a reader (and the
pointer) never sees a half-written version, and :meth:`Registry.list_versions` skips unfinished ones.

Every store access, the pointer's conditional reads and writes included, goes through
:func:`tsdn_platform.store.retrying`: a transient store failure is waited out for the caller's retry budget
(``store_retry_s`` of the job, ``--store-retry-s`` of ``tsdn models``), then raised; the pointer is either the
old one or the new one, never a mix.

The pointer is swapped with compare-and-swap, so two promoters racing never lose an update silently:
each reads the pointer, decides, and writes generation + 1 only if the pointer is still the one it read
(:func:`tsdn_platform.store.write_if`: S3's ``If-Match``/``If-None-Match`` conditional PUT, a lock file on a
local folder; a store without conditional writes gets plain atomic replaces and a warning); a lost race re-reads
and decides again, up to :data:`CAS_ATTEMPTS` times.

Products are independent: each has its own folder and pointer, so two product lines training at once never
touch each other's entries. :meth:`Registry.load_predictor` is the one loader scoring and serving use.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import sys
import typing
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tsdn.runtime import EXPORT_FORMATS, EXPORT_JSON
from tsdn_platform import __version__, layout, store
from tsdn_platform.names import NAME_PATTERN, validate_name

__all__ = [
    "DEFAULT_PROMOTE_METRIC",
    "METRICS_FILE",
    "MODEL_FILES",
    "ModelRef",
    "PointerConflictError",
    "Registry",
    "RegistryError",
    "UnknownProductError",
    "UnknownVersionError",
    "main",
    "new_version_id",
    "validate_name",
]

# The leak-free hold-out validation (synthetic defects on held-out normals): never the test split by default.
DEFAULT_PROMOTE_METRIC = "val.val_image_auroc"

logger = logging.getLogger(__name__)

# tsdn.checkpoint's MODEL_WEIGHTS and MODEL_JSON, spelt out: importing that module here would pull in torch
# for every registry user (the CLI's `tsdn models`, score drivers). tests/unit/test_project.py keeps them equal.
MODEL_JSON = "model.json"
MODEL_FILES = ("model.safetensors", MODEL_JSON)
# Exports of a version: <version>/export/<format>/{format files, export.json} (formats: tsdn.runtime, numpy-only).
EXPORT_DIR = "export"
METRICS_FILE = "metrics.json"
POINTER_FILE = "best.json"
CAS_ATTEMPTS = 50

PromotePolicy = Literal["better", "always", "never"]


class RegistryError(Exception):
    """A registry operation failed; the message names the store, product and version involved."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


class UnknownProductError(RegistryError, LookupError):
    """No model is registered (or promoted) for the product."""

    def __init__(self, store_uri: str, product: str, detail: str = "no model registered") -> None:
        super().__init__(store_uri, product, detail)
        self.store_uri = store_uri
        self.product = product

    def __str__(self) -> str:
        store_uri, product, detail = self.args
        return f"{store_uri}: product {product!r}: {detail}"


class UnknownVersionError(RegistryError, LookupError):
    """The product has no complete version of that name."""

    def __init__(self, store_uri: str, product: str, version: str) -> None:
        super().__init__(store_uri, product, version)
        self.store_uri = store_uri
        self.product = product
        self.version = version

    def __str__(self) -> str:
        store_uri, product, version = self.args
        return f"{store_uri}: product {product!r} has no complete version {version!r}"


class PointerConflictError(RegistryError):
    """The best pointer changed between reading it and writing it (another promoter won)."""

    def __init__(self, pointer_uri: str, detail: str) -> None:
        super().__init__(pointer_uri, detail)
        self.pointer_uri = pointer_uri

    def __str__(self) -> str:
        pointer_uri, detail = self.args
        return f"{pointer_uri}: {detail}"


@dataclass(frozen=True)
class ModelRef:
    """Which model a predictor was loaded from: product, version and that version's ``metrics.json``."""

    product: str
    version: str
    metrics: dict[str, Any] = field(default_factory=dict)
    uri: str = ""


def new_version_id(run_id: str, now: dt.datetime | None = None) -> str:
    """Sortable, unique version id: ``20261129T051200Z-<first 8 characters of the run's hash>``."""
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return f"{stamp}-{digest}"


def metric_value(metrics: Mapping[str, Any], dotted: str) -> float | None:
    """``metric_value({"test": {"image_auroc": 0.9}}, "test.image_auroc") -> 0.9``; None if absent/non-numeric."""
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    return float(node)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Registry:
    """Versions and best pointers of every product line under ``<store>/registry``."""

    def __init__(self, store_uri: str) -> None:
        self.store_uri = store_uri
        self.root = layout.registry_uri(store_uri)

    # --- paths -----------------------------------------------------------------------------------

    def product_uri(self, product: str) -> str:
        return store.join(self.root, validate_name(product))

    def version_uri(self, product: str, version: str) -> str:
        return store.join(self.product_uri(product), "versions", validate_name(version, "version"))

    def pointer_uri(self, product: str) -> str:
        return store.join(self.product_uri(product), POINTER_FILE)

    # --- reading ---------------------------------------------------------------------------------

    def list_products(self) -> list[str]:
        """Products with at least one complete version, sorted."""
        return [name for name in store.list_dirs(self.root) if NAME_PATTERN.match(name) and self.list_versions(name)]

    def list_versions(self, product: str) -> list[str]:
        """Complete versions of ``product`` (those with a ``metrics.json``), oldest first."""
        versions_uri = store.join(self.product_uri(product), "versions")
        prefix = versions_uri.rstrip("/") + "/"
        found = []
        for uri in store.list_files(versions_uri, recursive=True, suffixes=(f"/{METRICS_FILE}",)):
            relative = uri[len(prefix) :].split("/")
            if len(relative) == 2 and NAME_PATTERN.match(relative[0]):
                found.append(relative[0])
        return sorted(found)

    def best(self, product: str) -> dict[str, Any] | None:
        """The best pointer of ``product`` (``version``, ``generation``, ``metric``, ``value``, ...), or None."""
        pointer, _ = self._read_pointer(product)
        return pointer

    def metrics(self, product: str, version: str) -> dict[str, Any]:
        """``metrics.json`` of a complete version."""
        uri = store.join(self.version_uri(product, version), METRICS_FILE)
        try:
            return store.read_json(uri)
        except store.StoreError as exc:
            if exc.kind == "not_found":
                raise UnknownVersionError(self.store_uri, product, version) from exc
            raise

    def resolve_version(self, product: str, version: str | None = None) -> str:
        """``version`` if given, else the version the best pointer names."""
        if version is not None:
            return validate_name(version, "version")
        pointer = self.best(product)
        if pointer is None:
            detail = "no best version" if self.list_versions(product) else "no model registered"
            raise UnknownProductError(self.store_uri, product, detail)
        return pointer["version"]

    def load_files(
        self, product: str, version: str | None = None, names: tuple[str, ...] = MODEL_FILES
    ) -> tuple[dict[str, bytes], ModelRef]:
        """The model files ``names`` of a version (default: the best), checked against the sha256 in its metrics."""
        version = self.resolve_version(product, version)
        metrics = self.metrics(product, version)
        base = self.version_uri(product, version)
        files = {name: store.read_bytes(store.join(base, name)) for name in names}
        for name, data in files.items():
            expected = metrics.get("files", {}).get(name, {}).get("sha256")
            if expected is not None and expected != _sha256(data):
                msg = f"{store.join(base, name)}: sha256 does not match {METRICS_FILE} (corrupt or replaced file)"
                raise RegistryError(msg)
        return files, ModelRef(product=product, version=version, metrics=metrics, uri=base)

    def model_json(self, product: str, version: str | None = None) -> tuple[dict[str, Any], ModelRef]:
        """``model.json`` of a version (default: the best), checked like :meth:`load_files`, without the weights.

        What a driver needs to plan a job (input size, config, calibration) before workers load the model.
        """
        files, ref = self.load_files(product, version, names=(MODEL_JSON,))
        try:
            return json.loads(files[MODEL_JSON]), ref
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            msg = f"{store.join(ref.uri, MODEL_JSON)}: not JSON ({exc})"
            raise RegistryError(msg) from exc

    def load_predictor(
        self, product: str, version: str | None = None, device: Any = None, runtime: str = "torch"
    ) -> tuple[Any, ModelRef]:
        """A ready :class:`tsdn.predict.Predictor` (weights + calibration) and the :class:`ModelRef` it came from.

        ``version`` None loads the best version. ``runtime``: ``torch`` builds the module from the weights;
        ``onnxruntime`` / ``openvino`` load the version's export (:meth:`ensure_export`: made and registered on
        first use if absent), and then neither torch nor timm is imported. The one loader batch scoring and
        serving use.
        """
        from tsdn.predict import Predictor

        if runtime != "torch":
            from tsdn.runtime import runtime_format

            files, ref = self.ensure_export(product, version, runtime_format(runtime))
            return Predictor.from_export(files, runtime), ref
        from tsdn.checkpoint import load_checkpoint

        files, ref = self.load_files(product, version)
        model, calibration, _ = load_checkpoint(files)
        return Predictor(model, calibration, device=device), ref

    # --- exported models -------------------------------------------------------------------------

    def export_uri(self, product: str, version: str, fmt: str) -> str:
        """``<version>/export/<format>/``: where a version's export of ``fmt`` (``onnx``, ``openvino``) lives."""
        if fmt not in EXPORT_FORMATS:
            msg = f"export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}"
            raise ValueError(msg)
        return store.join(self.version_uri(product, version), EXPORT_DIR, fmt)

    def load_export(self, product: str, version: str | None, fmt: str) -> tuple[dict[str, bytes] | None, ModelRef]:
        """The registered export of a version (None when there is none, or it was made from other weights)."""
        version = self.resolve_version(product, version)
        metrics = self.metrics(product, version)
        ref = ModelRef(product=product, version=version, metrics=metrics, uri=self.version_uri(product, version))
        base = self.export_uri(product, version, fmt)
        try:
            meta_bytes = store.read_bytes(store.join(base, EXPORT_JSON))
        except store.StoreError as exc:
            if exc.kind == store.NOT_FOUND:
                return None, ref
            raise
        weights = metrics.get("files", {}).get(MODEL_FILES[0], {}).get("sha256")
        try:
            made_from = json.loads(meta_bytes).get("source", {}).get("weights_sha256")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            made_from = None
        if weights is not None and made_from != weights:
            logger.warning("%s: made from other weights (or unreadable); exporting again", base)
            return None, ref
        files = {EXPORT_JSON: meta_bytes}
        files.update({name: store.read_bytes(store.join(base, name)) for name in EXPORT_FORMATS[fmt]})
        return files, ref

    def register_export(self, product: str, version: str, files: Mapping[str, bytes]) -> str:
        """Store an export (from :func:`tsdn.export.export_checkpoint`) beside the version; returns its folder.

        ``export.json`` is written last, so a reader never takes a half-written export for a complete one.
        """
        fmt = json.loads(files[EXPORT_JSON])["format"]
        base = self.export_uri(product, version, fmt)
        for name in EXPORT_FORMATS[fmt]:
            store.write_bytes(store.join(base, name), files[name])
        store.write_bytes(store.join(base, EXPORT_JSON), files[EXPORT_JSON])
        logger.info("registered the %s export of %s version %s at %s", fmt, product, version, base)
        return base

    def ensure_export(self, product: str, version: str | None, fmt: str) -> tuple[dict[str, bytes], ModelRef]:
        """The version's export of ``fmt``; exported from its checkpoint and registered first if absent.

        Exporting imports torch (and onnx); a cluster does it once per version and format. Two processes racing
        write the same bytes (the export is deterministic), and the loader's sha256 check refuses a mix.
        """
        files, ref = self.load_export(product, version, fmt)
        if files is not None:
            return files, ref
        from tsdn.export import export_checkpoint  # torch + onnx: only where an export is made

        checkpoint, ref = self.load_files(product, ref.version)
        files = export_checkpoint(checkpoint, fmt, {"product": product, "version": ref.version})
        self.register_export(product, ref.version, files)
        return files, ref

    # --- writing ---------------------------------------------------------------------------------

    def register(
        self,
        product: str,
        files: Mapping[str, bytes],
        metrics: Mapping[str, Any],
        promote: PromotePolicy = "better",
        metric: str = DEFAULT_PROMOTE_METRIC,
        version: str | None = None,
    ) -> str:
        """Write a complete version, then update the best pointer per ``promote``; returns the version id.

        ``files`` must hold :data:`MODEL_FILES` (from ``tsdn.checkpoint.checkpoint_files``). ``metrics`` is
        stored as ``metrics.json`` with ``product``, ``version``, ``created_at``, ``code_version`` and the
        files' sha256 added; it is written last. ``promote``: ``"better"`` makes it best only if its
        ``metric`` (a dotted key into ``metrics``) beats the current best's, ``"always"`` makes it best,
        ``"never"`` leaves the pointer alone.
        """
        validate_name(product)
        missing = [name for name in MODEL_FILES if name not in files]
        if missing:
            msg = f"{self.product_uri(product)}: register needs {', '.join(MODEL_FILES)}; missing {', '.join(missing)}"
            raise ValueError(msg)
        _check_policy(promote)
        version = validate_name(version or new_version_id(str(metrics.get("run_id", uuid.uuid4().hex))), "version")
        base = self.version_uri(product, version)
        if store.exists(store.join(base, METRICS_FILE)):
            msg = f"{base}: version already exists"
            raise RegistryError(msg)
        record = dict(metrics)
        record.update(
            product=product,
            version=version,
            created_at=_now(),
            code_version=__version__,
            files={name: {"sha256": _sha256(files[name]), "bytes": len(files[name])} for name in MODEL_FILES},
        )
        for name in MODEL_FILES:
            store.write_bytes(store.join(base, name), files[name])
        store.write_json(store.join(base, METRICS_FILE), record)
        logger.info("registered %s version %s at %s", product, version, base)
        self.apply_policy(product, version, promote, metric)
        return version

    def apply_policy(
        self, product: str, version: str, promote: PromotePolicy = "better", metric: str = DEFAULT_PROMOTE_METRIC
    ) -> bool:
        """Update the best pointer for the complete ``version`` per ``promote`` (see :meth:`register`); returns
        whether the pointer names ``version`` afterwards.

        Idempotent: a version that is already best leaves the pointer as it is, so a job whose pointer update
        failed (the store went down after the version was written) applies the policy again on its next run.
        """
        _check_policy(promote)
        if promote == "never":
            current = self.best(product)
            return bool(current and current["version"] == version)
        value = metric_value(self.metrics(product, version), metric)

        def decide(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is not None and current["version"] == version:
                return None
            if promote == "better" and current is not None:
                best_value = current.get("value") if current.get("metric") == metric else None
                if best_value is None:
                    best_value = metric_value(self.metrics(product, current["version"]), metric)
                if best_value is not None and (value is None or value <= best_value):
                    logger.info(
                        "%s: version %s (%s=%s) does not beat best %s (%s); pointer unchanged",
                        product,
                        version,
                        metric,
                        value,
                        current["version"],
                        best_value,
                    )
                    return None
            reason = "promote=always" if promote == "always" else f"better {metric}"
            return self._next_pointer(product, current, version, metric, value, reason)

        pointer = self._swap_pointer(product, decide)
        return bool(pointer and pointer["version"] == version)

    def promote(
        self,
        product: str,
        version: str,
        reason: str = "manual",
        metric: str = DEFAULT_PROMOTE_METRIC,
        expected_generation: int | None = None,
    ) -> dict[str, Any]:
        """Point best at ``version`` (a complete one); returns the new pointer.

        With ``expected_generation`` this is a strict compare-and-swap: it raises
        :class:`PointerConflictError` if the pointer is no longer at that generation (0 = no pointer yet), and
        writes a new generation even for the version already best. Without it, a concurrent update is re-read and
        the promotion applied on top of it, and promoting the version that is already best changes nothing (it
        used to write a generation whose ``previous`` was the version itself, losing the real one).
        """
        version = validate_name(version, "version")
        value = metric_value(self.metrics(product, version), metric)

        def decide(current: dict[str, Any] | None) -> dict[str, Any] | None:
            generation = current["generation"] if current else 0
            if expected_generation is not None and generation != expected_generation:
                why = "another promoter won" if expected_generation < generation else "no such generation yet"
                msg = f"expected generation {expected_generation}, found {generation} ({why})"
                raise PointerConflictError(self.pointer_uri(product), msg)
            if expected_generation is None and current is not None and current["version"] == version:
                logger.info("%s: %s is already the best version; pointer unchanged", product, version)
                return None
            return self._next_pointer(product, current, version, metric, value, reason)

        return typing.cast(dict[str, Any], self._swap_pointer(product, decide))

    @staticmethod
    def _next_pointer(
        product: str, current: dict[str, Any] | None, version: str, metric: str, value: float | None, reason: str
    ) -> dict[str, Any]:
        return {
            "product": product,
            "version": version,
            "generation": (current["generation"] if current else 0) + 1,
            "metric": metric,
            "value": value,
            "reason": reason,
            "previous": current["version"] if current else None,
            "updated_at": _now(),
        }

    # --- the pointer's compare-and-swap ----------------------------------------------------------

    def _swap_pointer(
        self, product: str, decide: Callable[[dict[str, Any] | None], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """Read the pointer, ``decide`` the new one (None: leave it), write it iff unchanged; retry on conflict."""
        uri = self.pointer_uri(product)
        for _ in range(CAS_ATTEMPTS):
            current, read = self._read_pointer(product)
            new = decide(current)
            if new is None:
                return current
            if not store.exists(store.join(self.version_uri(product, new["version"]), METRICS_FILE)):
                raise UnknownVersionError(self.store_uri, product, new["version"])
            try:
                self._write_pointer(uri, new, read)
            except PointerConflictError:
                logger.info("%s: changed while promoting; re-reading", uri)
                continue
            logger.info("%s: best -> %s (generation %d, %s)", product, new["version"], new["generation"], new["reason"])
            return new
        msg = f"gave up after {CAS_ATTEMPTS} conflicting updates"
        raise PointerConflictError(uri, msg)

    def _read_pointer(self, product: str) -> tuple[dict[str, Any] | None, store.Versioned]:
        """The pointer (None: no pointer yet) and what :meth:`_write_pointer` compares against."""
        uri = self.pointer_uri(product)
        found = store.read_versioned(uri)
        return (None if found.data is None else self._parse_pointer(uri, found.data)), found

    @staticmethod
    def _parse_pointer(uri: str, data: bytes) -> dict[str, Any]:
        try:
            pointer = json.loads(data)
        except ValueError as exc:
            msg = f"{uri}: not valid JSON ({exc})"
            raise RegistryError(msg) from exc
        if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
            msg = f"{uri}: not a best pointer (no 'version')"
            raise RegistryError(msg)
        pointer.setdefault("generation", 0)
        return pointer

    def _write_pointer(self, uri: str, pointer: dict[str, Any], read: store.Versioned) -> None:
        """Write ``pointer`` iff the pointer is still the one ``read``; :class:`PointerConflictError` if not."""
        data = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode()
        try:
            store.write_if(uri, data, read, content_type="application/json")
        except store.WriteConflict as exc:
            raise PointerConflictError(uri, exc.detail) from exc


def _check_policy(promote: str) -> None:
    if promote not in typing.get_args(PromotePolicy):
        msg = f"promote {promote!r}: expected 'better', 'always' or 'never'"
        raise ValueError(msg)


# --- CLI: tsdn models list|show|promote ---------------------------------------------------------------


def _summary(metrics: Mapping[str, Any]) -> str:
    test = metrics.get("test", {}) if isinstance(metrics.get("test"), Mapping) else {}
    keys = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
    cells = [f"family={metrics.get('family', 'tsdn')}"]  # versions from before the second family are TSDN
    cells += [f"{key}={test[key]:.4f}" for key in keys if isinstance(test.get(key), (int, float))]
    return "  ".join(cells)


def main(args: argparse.Namespace) -> int:
    """``tsdn models list|show|promote``; errors propagate to the CLI, which prints one line (exit 2 or 3).

    A store that is unreachable, throttling or failing with 5xx is waited for ``--store-retry-s`` seconds.
    """
    with store.retry_budget(args.store_retry_s):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    store.require(args.store)  # a mistyped store is an error, not an empty registry
    registry = Registry(args.store)
    if args.action == "list":
        products = [args.product] if args.product else registry.list_products()
        if not products:
            print(f"no models registered under {registry.root}", file=sys.stderr)
        for product in products:
            pointer = registry.best(product)
            best_version = pointer["version"] if pointer else None
            versions = registry.list_versions(product)
            if not versions:
                raise UnknownProductError(registry.store_uri, product)
            for version in versions:
                mark = "*" if version == best_version else " "
                print(f"{mark} {product:<24} {version:<28} {_summary(registry.metrics(product, version))}")
        return 0
    if args.action == "show":
        version = registry.resolve_version(args.product, args.version)
        out = {"best": registry.best(args.product), "metrics": registry.metrics(args.product, version)}
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    pointer = registry.promote(
        args.product, args.version, reason=args.reason, expected_generation=args.expected_generation
    )
    print(json.dumps(pointer, indent=2, sort_keys=True))
    return 0
