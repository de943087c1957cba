"""The operator's side of the gateway's HTTP routes: a small stdlib client and the text reports.

Used by ``cortex models``, ``load``, ``unload``, ``pin``, ``unpin`` and ``status``. The client
speaks JSON to ``/v1/models``, ``/health`` and ``/admin/*``; any non-2xx answer becomes an
:class:`OperatorError` carrying the gateway's ``{"error": {"message", "type", "code"}}`` body, and a
gateway that cannot be reached becomes :class:`GatewayUnreachable`. With an API key every request
carries ``Authorization: Bearer <key>`` (never forwarded on a redirect). The formatters are pure:
JSON in, text out, tolerant of missing fields.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

DEFAULT_ENDPOINT = "http://localhost:31313"
DEFAULT_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 1800.0
"""A cold load may take up to 30 minutes; the load request waits for it."""

_LOADING = ("loading", "reloading")


class OperatorError(Exception):
    """The gateway answered with a non-2xx status (or a 2xx body that is not JSON)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.error_type = error_type


class GatewayUnreachable(Exception):
    """No HTTP answer: connection refused, DNS failure, timeout, a bad endpoint URL."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class OperatorClient:
    """JSON over HTTP to one gateway, ``timeout_s`` per request unless a call says otherwise,
    authenticated with ``api_key`` when one is given."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT,
                 timeout_s: float = DEFAULT_TIMEOUT_S, *, api_key: str | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self._api_key = api_key.strip() if api_key else None

    def get(self, path: str, *, timeout_s: float | None = None) -> Any:
        """``GET path``; the decoded JSON body."""
        return self._request("GET", path, None, timeout_s)

    def post(self, path: str, body: object, *, timeout_s: float | None = None) -> Any:
        """``POST path`` with a JSON ``body``; the decoded JSON answer."""
        return self._request("POST", path, body, timeout_s)

    # -- the gateway's routes

    def health(self) -> Any:
        return self.get("/health")

    def models(self) -> Any:
        return self.get("/v1/models")

    def fleet(self) -> Any:
        return self.get("/admin/fleet")

    def load(self, model: str, node: str | None = None) -> Any:
        """Blocks until the model is loaded (up to :data:`LOAD_TIMEOUT_S`)."""
        return self.post("/admin/models/load", {"model": model, "node": node},
                         timeout_s=max(self.timeout_s, LOAD_TIMEOUT_S))

    def unload(self, model: str, node: str | None = None) -> Any:
        """``node=None`` unloads it from every node holding it."""
        return self.post("/admin/models/unload", {"model": model, "node": node})

    def pin(self, model: str, node: str | None = None, *, pinned: bool = True) -> Any:
        return self.post("/admin/models/pin", {"model": model, "node": node, "pinned": pinned})

    # -- plumbing

    def _request(self, method: str, path: str, body: object, timeout_s: float | None) -> Any:
        url = self.endpoint + path
        timeout = self.timeout_s if timeout_s is None else timeout_s
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise GatewayUnreachable(f"invalid endpoint {self.endpoint!r}: not an http(s) URL")
        try:  # the scheme is checked above
            request = urllib.request.Request(url, data=data, headers=headers,  # noqa: S310
                                             method=method)
        except ValueError as exc:  # a malformed host
            raise GatewayUnreachable(f"invalid endpoint {self.endpoint!r}: {exc}") from exc
        if self._api_key:
            request.add_unredirected_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                status = int(response.status)
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                error_body = exc.read()
            except (OSError, http.client.HTTPException):
                error_body = b""
            finally:
                exc.close()
            error = _error_from(exc.code, str(exc.reason), error_body)
            if error.status == 401 and not self._api_key:
                error.message += " (give the key with --api-key or CORTEX_API_KEY)"
            raise error from None
        except urllib.error.URLError as exc:
            raise GatewayUnreachable(
                f"cannot reach {self.endpoint}: {_reason(exc.reason, timeout)}"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise GatewayUnreachable(f"cannot reach {self.endpoint}: {_reason(exc, timeout)}") \
                from exc
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise OperatorError(status, f"{method} {path}: the gateway's answer is not JSON "
                                        f"({exc})") from None


def _reason(reason: object, timeout_s: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    text = str(reason)
    return text or type(reason).__name__


def _error_from(status: int, reason: str, body: bytes) -> OperatorError:
    """An :class:`OperatorError` from the gateway's error body, else from the bare status."""
    parsed: Any = None
    try:
        parsed = json.loads(body) if body.strip() else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and error.get("message"):
            code = error.get("code")
            kind = error.get("type")
            return OperatorError(status, str(error["message"]),
                                 code=None if code is None else str(code),
                                 error_type=None if kind is None else str(kind))
        if isinstance(error, str) and error:
            return OperatorError(status, error)
        detail = parsed.get("detail")
        if isinstance(detail, str) and detail:
            return OperatorError(status, f"HTTP {status}: {detail}")
    text = body.decode("utf-8", "replace").strip()
    message = f"HTTP {status} {reason}".rstrip()
    if text and parsed is None:
        message += f": {text[:200]}"
    return OperatorError(status, message)


# ------------------------------------------------------------------ reports


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _table(rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, trailing blanks dropped."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def model_state(entry: dict[str, Any]) -> str:
    """``loaded``, ``loading`` (with ``NN%`` when the progress is known), ``recovering``,
    ``poisoned`` or ``unloaded``: the most useful of the model's locations."""
    statuses = {str(loc.get("status", "")) for loc in _dicts(entry.get("locations"))}
    if entry.get("loaded") is True or "loaded" in statuses:
        return "loaded"
    if statuses & set(_LOADING):
        progress = entry.get("load_progress")
        if isinstance(progress, int | float) and not isinstance(progress, bool):
            return f"loading {round(min(max(float(progress), 0.0), 1.0) * 100)}%"
        return "loading"
    for status in ("recovering", "poisoned"):
        if status in statuses:
            return status
    return "unloaded"


def _joined(items: Iterable[str]) -> str:
    return ", ".join(items) or "-"


def format_models(models: object) -> str:
    """``cortex models``: a row per model (sorted by id): its state, where it is, where it fits."""
    entries = sorted(_dicts(_dict(models).get("data")), key=lambda e: str(e.get("id", "")))
    if not entries:
        return "No models."
    rows = [["MODEL", "STATE", "WHERE", "FEASIBLE ON"]]
    for entry in entries:
        where = _joined(f"{loc.get('node', '?')}({loc.get('status', '?')})"
                        for loc in _dicts(entry.get("locations")))
        feasible = entry.get("feasible_on")
        feasible_on = _joined(str(n) for n in feasible) if isinstance(feasible, list) else "-"
        rows.append([str(entry.get("id", "")), model_state(entry), where, feasible_on])
    return "\n".join(_table(rows))


def _mib(value: object) -> str:
    return f"{value} MiB" if isinstance(value, int) and not isinstance(value, bool) else "-"


def _device_label(device: dict[str, Any]) -> str:
    kind = str(device.get("kind", "?"))
    index = device.get("index")
    return kind if kind == "cpu" or index is None else f"{kind}:{index}"


def _device_row(device: dict[str, Any]) -> list[str]:
    total = device.get("memory_total_mb")
    free = device.get("memory_free_mb")
    used: object = None
    if isinstance(total, int) and isinstance(free, int):
        used = max(total - free, 0)
    return [
        "    " + _device_label(device), str(device.get("name", "")),
        f"used {_mib(used)}", f"budget {_mib(device.get('budget_mb'))}",
        f"total {_mib(total)}", f"models {_mib(device.get('models_mb'))}",
    ]


def _model_row(model: dict[str, Any]) -> list[str]:
    jobs = model.get("jobs_running")
    return [
        "    " + str(model.get("id", "")), str(model.get("status", "?")),
        _mib(model.get("memory_mb")), "pinned" if model.get("pinned") is True else "",
        f"jobs {jobs if isinstance(jobs, int) else '-'}",
    ]


def _node_line(node: dict[str, Any]) -> str:
    states = ["healthy" if node.get("healthy") is True else "stale"]
    if node.get("draining") is True:
        states.append("draining")
    seen = node.get("last_seen_s")
    if isinstance(seen, int | float) and not isinstance(seen, bool):
        states.append(f"seen {float(seen):.1f} s ago")
    return f"  {node.get('name', '?')}: " + ", ".join(states)


def format_fleet(fleet: object) -> str:
    """The ``Nodes:`` section of ``cortex status``, from ``GET /admin/fleet``.

    Per node (sorted by name): healthy or stale, draining, time since its last heartbeat; then
    each device's used / budget / total MiB and the MiB its models take; then each model (sorted
    by id) with its status, memory, pin and running jobs.
    """
    nodes = sorted(_dicts(_dict(fleet).get("nodes")), key=lambda n: str(n.get("name", "")))
    lines = ["Nodes:"]
    if not nodes:
        lines.append("  (none)")
    for node in nodes:
        lines.append(_node_line(node))
        devices = _dicts(node.get("devices"))
        if devices:
            lines += _table([_device_row(d) for d in devices])
        else:
            lines.append("    (no devices reported)")
        models = sorted(_dicts(node.get("models")), key=lambda m: str(m.get("id", "")))
        if models:
            lines += _table([_model_row(m) for m in models])
        else:
            lines.append("    (no models)")
    return "\n".join(lines)


def format_load(result: object, model: str) -> str:
    answer = _dict(result)
    node = answer.get("node")
    where = f" on {node}" if node else ""
    return f"Loaded {answer.get('model') or model}{where}"


def _names(value: object) -> list[str]:
    return [str(n) for n in value] if isinstance(value, list) else []


def format_unload(result: object, model: str) -> str:
    answer = _dict(result)
    nodes = _names(answer.get("nodes"))
    name = answer.get("model") or model
    if not nodes:
        return f"{name} was not loaded anywhere"
    return f"Unloaded {name} from {', '.join(nodes)}"


def format_pin(result: object, model: str, *, pinned: bool) -> str:
    answer = _dict(result)
    nodes = _names(answer.get("nodes"))
    name = answer.get("model") or model
    state = answer.get("pinned", pinned)
    verb = "Pinned" if state is True else "Unpinned"
    if not nodes:
        return f"{verb} {name} (no node holds it)"
    return f"{verb} {name} on {', '.join(nodes)}"
