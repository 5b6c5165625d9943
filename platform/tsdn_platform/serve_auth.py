"""Bearer-token auth of the detection API: tokens scoped to product lines, compared as SHA-256 digests.

Tokens come from the environment variable ``auth_tokens_env`` (comma-separated) and/or the file
``auth_tokens_file`` (one entry per line, ``#`` comments). An entry ``TOKEN gearbox housing`` scopes a token to
those product lines; a bare ``TOKEN`` may use every one. They are read once where the application is built; only
their digests (:func:`auth_digests`) reach the replicas, where :func:`check_token` compares a request's token to
each in constant time. :class:`ApiError` is the HTTP error every part of the API raises.
"""

import hashlib
import hmac
import ipaddress
import logging
import os
from pathlib import Path

from tsdn.config_io import ConfigError
from tsdn_platform.names import validate_name
from tsdn_platform.serve_config import ServeConfig

__all__ = [
    "ApiError",
    "Scope",
    "auth_digests",
    "auth_required",
    "check_token",
    "is_loopback",
    "load_token_scopes",
    "load_tokens",
    "token_digest",
]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error with a reason, answered as ``{"status": ..., "reason": ...}``. Picklable."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason

    def __reduce__(self) -> tuple[type["ApiError"], tuple[int, str]]:
        return (type(self), (self.status, self.reason))


Scope = frozenset[str] | None
"""The product lines a token may use; None: every one."""


def load_tokens(cfg: ServeConfig) -> list[str]:
    """The bearer tokens from ``cfg.auth_tokens_env`` (comma-separated) and ``cfg.auth_tokens_file``."""
    return list(load_token_scopes(cfg))


def load_token_scopes(cfg: ServeConfig) -> dict[str, Scope]:
    """Every configured token and the product lines it may use (None: every one).

    An entry is ``TOKEN`` (every product) or ``TOKEN PRODUCT [PRODUCT ...]`` (only those): comma-separated
    entries in the environment variable ``cfg.auth_tokens_env``, one entry per line in ``cfg.auth_tokens_file``
    (``#`` starts a comment line). A token listed more than once may use what any of its entries allows.
    """
    entries = os.environ.get(cfg.auth_tokens_env, "").split(",")
    if cfg.auth_tokens_file:
        path = Path(cfg.auth_tokens_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            msg = f"auth_tokens_file {path}: cannot read ({exc})"
            raise ConfigError(msg) from exc
        entries += [line for line in lines if not line.lstrip().startswith("#")]
    scopes: dict[str, Scope] = {}
    for entry in entries:
        if not entry.strip():
            continue
        token, *products = entry.split()
        try:
            scope = frozenset(validate_name(product) for product in products) or None
        except ValueError as exc:
            msg = f"auth token entry for products {' '.join(products)!r}: {exc}"
            raise ConfigError(msg) from exc
        previous = scopes.get(token, frozenset())
        scopes[token] = None if previous is None or scope is None else previous | scope
    return scopes


def token_digest(token: str) -> bytes:
    """The SHA-256 digest of a token: what the replicas hold and compare."""
    return hashlib.sha256(token.encode()).digest()


def auth_required(cfg: ServeConfig, tokens: list[str]) -> bool:
    """``cfg.auth_required``, or when unset (None): whether any token is configured."""
    return bool(tokens) if cfg.auth_required is None else cfg.auth_required


def auth_digests(cfg: ServeConfig) -> list[tuple[bytes, Scope]] | None:
    """SHA-256 digests of the accepted tokens with their scopes, or None when auth is off."""
    scopes = load_token_scopes(cfg)
    tokens = list(scopes)
    if not auth_required(cfg, tokens):
        if cfg.auth_required is None and not is_loopback(cfg.host):
            msg = (
                f"host {cfg.host}: refusing to serve without auth on a non-loopback address; configure tokens "
                f"(env {cfg.auth_tokens_env} or auth_tokens_file) or set auth_required: false explicitly"
            )
            raise ConfigError(msg)
        logger.warning("serving WITHOUT authentication (no token configured)")
        return None
    if not tokens:
        msg = f"auth_required is true but no token is configured (env {cfg.auth_tokens_env}, auth_tokens_file)"
        raise ConfigError(msg)
    return [(token_digest(token), scope) for token, scope in scopes.items()]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only: ``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(authorization: str | None, digests: list[tuple[bytes, Scope]], product: str | None = None) -> Scope:
    """The scope of the request's token: 401 without a bearer token or with one the server does not know (RFC 6750's
    ``invalid_token``; it was 403), 403 with one not scoped to ``product``. Every digest is compared, in constant
    time."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    offered = token_digest(token.strip())
    matched, scope = False, None
    for digest, allowed in digests:
        if hmac.compare_digest(offered, digest):
            matched, scope = True, allowed
    if not matched:
        raise ApiError(401, "invalid token")
    if product is not None and scope is not None and product not in scope:
        raise ApiError(403, f"this token is not allowed to use product {product!r}")
    return scope
