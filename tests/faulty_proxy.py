"""A test double: an HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto) that injects faults.

Faults, per request: ``"500"`` / ``"503"`` (an S3 error document with that status), ``"reset"``
(the connection closed with RST before any answer), ``"timeout"`` (no answer for ``stall_s``, then
closed), ``"lost"`` (the request reaches the server, its answer is dropped and the connection
reset: the client cannot tell whether it was done). The schedule is a function of the request's number and line, set with :meth:`every`,
:meth:`outage` / :meth:`heal`, or :meth:`after` (healthy for N requests, then an outage).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("500", "503", "reset", "timeout")  # "lost" only when asked for
_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected by the test proxy</Message>'
    "<RequestId>fault</RequestId></Error>"
)


class FaultyProxy:
    def __init__(self, upstream: str, *, stall_s: float = 3.0) -> None:
        self.upstream = urlsplit(upstream)
        self.stall_s = stall_s
        self.schedule: Callable[[int, str], str | None] = lambda n, line: None
        self.requests = 0
        self.body = b""
        self.injected: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- schedules ------------------------------------------------------------------------------

    def every(self, n: int, faults: tuple[str, ...] = FAULTS) -> None:
        """Every ``n``-th request fails, cycling through ``faults``."""
        self.schedule = lambda i, line: faults[(i // n) % len(faults)] if i % n == n - 1 else None

    def outage(self, fault: str = "503") -> None:
        """Every request fails until :meth:`heal`."""
        self.schedule = lambda i, line: fault

    def after(self, healthy: int, fault: str = "503") -> None:
        """The first ``healthy`` requests from now pass; every later one fails."""
        start = self.requests
        self.schedule = lambda i, line: fault if i - start >= healthy else None

    def heal(self) -> None:
        self.schedule = lambda i, line: None

    # -- the proxy ------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        with self.lock:
            n = self.requests
            self.requests += 1
            self.body = body  # the request's body, for a schedule that looks at it
            fault = self.schedule(n, h.requestline)
            if fault:
                self.injected[fault] = self.injected.get(fault, 0) + 1
        if fault in ("500", "503"):
            payload = _ERROR.format(code="InternalError" if fault == "500" else "ServiceUnavailable").encode()
            h.send_response(int(fault))
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        if fault in ("reset", "timeout"):
            if fault == "timeout":
                time.sleep(self.stall_s)
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("transfer-encoding", "connection", "content-length")}
        headers["Content-Length"] = str(len(body))
        try:
            upstream.request(h.command, h.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        if fault == "lost":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        h.send_response(answer.status, answer.reason)
        for k, v in answer.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                h.send_header(k, v)
        # a HEAD answer's length is the object's, not of the (empty) body
        h.send_header("Content-Length", answer.getheader("Content-Length", "0") if h.command == "HEAD" else str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""
