"""The server's HTTP side: a request handler that checks the key, injects scripted faults and hands
the body to the route's function in :mod:`mydistill.generation.serve.api`.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from mydistill.generation.serve.api import Faults, ServerSettings, chat_completion, list_models, score_completions
from mydistill.generation.serve.engine import BatchingEngine, RequestError

logger = logging.getLogger(__name__)

POST_ROUTES: dict[str, Callable[[ServerSettings, bytes], dict[str, Any]]] = {
    "/v1/chat/completions": chat_completion,
    "/v1/completions": score_completions,
}


class Handler(BaseHTTPRequestHandler):
    """Routes a request to its function; ``settings`` is set on the subclass :func:`make_handler` makes."""

    protocol_version = "HTTP/1.1"
    server_version = "mydistill-serve"
    settings: ServerSettings

    def log_message(self, format: str, *args: Any) -> None:
        if self.settings.log_requests:  # the request line only: headers (and keys) are never logged
            logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        faults = self.settings.faults
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            if self._authorized():
                self._send(200, list_models(self.settings))
        elif self.path == "/admin/stats" and faults is not None:
            self._send(200, faults.stats())
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        body = self._body()
        if self.path == "/admin/faults" and self.settings.faults is not None:
            self._configure_faults(body)
            return
        route = POST_ROUTES.get(self.path)
        if route is None:
            self._error(404, f"no route {self.path}", "not_found")
            return
        if not self._authorized() or self._injected_fault(body):
            return
        try:
            self._send(200, route(self.settings, body))
        except RequestError as e:
            self._error(e.status, str(e), e.kind)

    # -------------------------------------------------------------------------------------

    def _configure_faults(self, body: bytes) -> None:
        assert self.settings.faults is not None
        spec = json.loads(body or b"{}")
        try:
            self.settings.faults.configure([int(s) for s in spec.get("statuses", [])], spec.get("retry_after"), spec.get("scoring"))
        except ValueError as e:
            self._error(400, str(e), "invalid_request_error")
            return
        self._send(200, {"status": "ok"})

    def _injected_fault(self, body: bytes) -> bool:
        """Whether this attempt was answered with the next scripted error status."""
        faults = self.settings.faults
        status = faults.check(body) if faults is not None else None
        if status is None:
            return False
        assert faults is not None
        headers = {"Retry-After": f"{faults.retry_after:g}"} if status == 429 and faults.retry_after is not None else None
        self._error(status, f"injected fault {status}", "server_error" if status >= 500 else "rate_limit", headers)
        return True

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def _authorized(self) -> bool:
        api_key = self.settings.api_key
        if api_key is None:
            return True
        given = self.headers.get("Authorization", "")
        ok = hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())
        if not ok:
            self._error(401, "invalid or missing API key", "authentication_error")
        return ok

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


def make_handler(
    engine: BatchingEngine,
    model_name: str,
    *,
    api_key: str | None = None,
    faults: Faults | None = None,
    request_timeout_s: float = 600.0,
    log_requests: bool = False,
    max_logprobs: int = 20,
    logprobs_mode: str = "raw",
) -> type[BaseHTTPRequestHandler]:
    """A request handler class for one server (``http.server`` makes one instance per request)."""
    settings = ServerSettings(
        engine, model_name, api_key=api_key, faults=faults, request_timeout_s=request_timeout_s,
        log_requests=log_requests, max_logprobs=max_logprobs, logprobs_mode=logprobs_mode,
    )
    return type("Handler", (Handler,), {"settings": settings})
