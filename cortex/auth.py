"""API keys: who may call the gateway, which models each key may use, and how many requests it
may have in flight.

`AuthMiddleware` (wired for the whole app in `cortex.app`) authenticates every route except the
open ones (`OPEN_PATHS`: ``/``, ``/health``, ``/ready``, ``/metrics``): the key comes from
``Authorization: Bearer <key>`` (OpenAI SDK, Anthropic SDK ≥ 2) or ``x-api-key`` (curl, Claude Code
with ``ANTHROPIC_API_KEY``), and is compared in constant time against every configured key. The
matching `ApiKey` is attached to the request (``scope["auth"]``) and holds one of its
``max_concurrent`` slots until the response has been sent in full: a stream keeps it until it
ends or the client goes away, and an error frees it like any other answer. Routes that name a
model call `require_model` (or filter with `permits`) once, where they resolve it.

With no keys configured every request is accepted; `exposure_problem` is the rule that keeps such
a gateway on loopback unless the operator allows it in so many words. Keys are never logged: logs
carry the key's name (``key #n`` unless configured).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from cortex.errors import ApiError, Reason

log = logging.getLogger(__name__)

MIN_KEY_LENGTH: Final = 16
MAX_KEY_LENGTH: Final = 512
"""Longer presented keys are refused without hashing them (headers are untrusted)."""
#: Any request (a `litestar.Request` is one); only its scope is read. Not `cortex.http.AnyRequest`:
#: `cortex.settings` imports this module, and `cortex.http` imports the settings.
AnyRequest = ASGIConnection[Any, Any, Any, Any]
OPEN_PATHS: Final = frozenset({"/", "/health", "/ready", "/metrics"})
"""Paths served without a key (health checks, load balancers, Prometheus)."""


@dataclass(frozen=True, kw_only=True)
class ApiKey:
    """One accepted key and what it may do. ``repr`` never shows the key itself."""

    key: str = field(repr=False)
    name: str
    """How logs name the key (``key #n`` unless the configuration names it)."""
    models: tuple[str, ...] | None = None
    """Model ids or globs (``Qwen/*``) the key may use, matched against the id a request resolves
    to (aliases resolved); None: every model."""
    max_concurrent: int | None = None
    """Requests this key may have in flight at once; None: no limit."""

    def __post_init__(self) -> None:
        problem = key_problem(self.key)
        if problem is not None:
            raise ValueError(problem)
        if not self.name.strip():
            raise ValueError("an API key's name must not be empty")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")

    def permits(self, model: str) -> bool:
        """Whether this key may use ``model`` (a concrete id, aliases already resolved)."""
        return self.models is None or any(fnmatch.fnmatchcase(model, pattern)
                                          for pattern in self.models)


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an API key (the message never contains the key), or None."""
    if not key.strip():
        return "the API key is empty"
    if any(not ("!" <= c <= "~") for c in key):
        return "the API key contains whitespace or characters other than printable ASCII"
    if len(key) < MIN_KEY_LENGTH:
        return f"the API key is shorter than {MIN_KEY_LENGTH} characters"
    if len(key) > MAX_KEY_LENGTH:
        return f"the API key is longer than {MAX_KEY_LENGTH} characters"
    return None


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class KeyRing:
    """The configured keys, matched in constant time, and each key's requests in flight."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys: Final = tuple(keys)
        # digests have one length, so comparing them says nothing about a key's length either
        self._digests: Final = tuple(_digest(k.key.encode()) for k in self.keys)
        self._in_flight: Final = [0] * len(self.keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def match(self, presented: bytes) -> int | None:
        """The index of the key equal to ``presented``, or None. Every configured key is
        compared (no early exit), each with `hmac.compare_digest`."""
        if not presented or len(presented) > MAX_KEY_LENGTH:
            return None
        digest = _digest(presented)
        found: int | None = None
        for index, expected in enumerate(self._digests):
            if hmac.compare_digest(digest, expected):
                found = index
        return found

    def in_flight(self, index: int) -> int:
        return self._in_flight[index]

    def enter(self, index: int) -> None:
        """Take one of the key's slots.

        Raises:
            ApiError: 429 when the key already has ``max_concurrent`` requests in flight.
        """
        key = self.keys[index]
        if key.max_concurrent is not None and self._in_flight[index] >= key.max_concurrent:
            log.info("%s: refused, %d requests already in flight (its limit)", key.name,
                     self._in_flight[index])
            raise ApiError(Reason.KEY_LIMIT,
                           f"this API key may have at most {key.max_concurrent} requests in "
                           "flight; wait for one to finish")
        self._in_flight[index] += 1

    def leave(self, index: int) -> None:
        self._in_flight[index] -= 1


def presented_keys(scope: Scope) -> list[bytes]:
    """The credentials a request carries: the ``Authorization: Bearer`` token and the
    ``x-api-key`` value, in that order (either may be absent)."""
    bearer: list[bytes] = []
    api_key: list[bytes] = []
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            api_key.append(value.strip())
    return bearer[:1] + api_key[:1]


class AuthMiddleware(ASGIMiddleware):
    """Authenticates every request outside `OPEN_PATHS` against ``ring`` (see the module
    docstring); a pass-through when ``ring`` is empty (`cortex.app` then leaves it out)."""

    scopes: tuple[ScopeType, ...] = (ScopeType.HTTP,)

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if not self.ring or scope["path"] in OPEN_PATHS:
            await next_app(scope, receive, send)
            return
        index = self._authenticate(scope)
        scope["auth"] = self.ring.keys[index]
        self.ring.enter(index)
        try:
            await next_app(scope, receive, send)
        finally:
            self.ring.leave(index)

    def _authenticate(self, scope: Scope) -> int:
        """The index of the request's key.

        Raises:
            ApiError: 401 for a missing or unknown key (the body never repeats it).
        """
        presented = presented_keys(scope)
        for candidate in presented:
            index = self.ring.match(candidate)
            if index is not None:
                return index
        client = scope.get("client")
        where = f"{client[0]}" if client else "an unknown client"
        if not presented:
            log.info("401 for %s %s from %s: no API key", scope.get("method", "?"),
                     scope["path"], where)
            raise ApiError(Reason.UNAUTHORIZED,
                           "this gateway needs an API key: send 'Authorization: Bearer <key>' "
                           "or 'x-api-key: <key>'")
        log.info("401 for %s %s from %s: unknown API key", scope.get("method", "?"),
                 scope["path"], where)
        raise ApiError(Reason.UNAUTHORIZED, "invalid API key")


def caller(request: AnyRequest) -> ApiKey | None:
    """The key a request was authenticated with; None when the gateway has no keys."""
    key = request.scope.get("auth")
    return key if isinstance(key, ApiKey) else None


def permits(request: AnyRequest, model: str) -> bool:
    """Whether the request's key may use ``model`` (a concrete id: aliases resolved)."""
    key = caller(request)
    return key is None or key.permits(model)


def require_model(request: AnyRequest, model: str) -> None:
    """Refuse a request whose key may not use ``model`` (a concrete id: aliases resolved).
    Called before anything else looks the model up, so a refusal says nothing about whether the
    model exists.

    Raises:
        ApiError: 403 ``model_not_allowed``.
    """
    key = caller(request)
    if key is not None and not key.permits(model):
        log.info("%s: refused model %s (not in its models)", key.name, model)
        raise ApiError(Reason.MODEL_NOT_ALLOWED,
                       "this API key may not use the requested model", param="model")


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the gateway on this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_problem(host: str, *, keys: int, allow_unauthenticated: bool) -> str | None:
    """Why the gateway must not start: listening beyond loopback with no API keys, unless the
    operator allowed exactly that. None when it may start."""
    if keys or allow_unauthenticated or is_loopback(host):
        return None
    return (f"refusing to listen on {host} without API keys: anyone who can reach it could run "
            "models and load, unload or pin them through /admin. Configure keys ([auth] api_keys "
            "in cortex.toml, or --api-key-file / CORTEX_API_KEY_FILE with one key per line), "
            "listen on 127.0.0.1, or, if something in front of the gateway authenticates, pass "
            "--allow-unauthenticated (CORTEX_ALLOW_UNAUTHENTICATED=1, or [auth] "
            "allow_unauthenticated = true)")
