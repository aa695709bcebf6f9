"""A fault-injecting HTTP proxy in front of the tests' S3 server: it answers chosen requests with
503 SlowDown or 403 AccessDenied, or resets their connection, and forwards the rest."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (method, path, number of the request since start) -> "slowdown", "denied", "reset" or None to forward
Rule = Callable[[str, str, int], str | None]

ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "denied": (403, "AccessDenied", "Access Denied"),
}


class FaultyS3:
    """``with FaultyS3(upstream, rule) as proxy:`` point S3 clients at ``proxy.url``."""

    def __init__(self, upstream: str, rule: Rule):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rule = rule
        self.faults: Counter = Counter()  # fault -> how many were injected
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultyS3:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests.append((method, path))
            fault = self.rule(method, path, len(self.requests))
            if fault:
                self.faults[fault] += 1
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._decide(self.command, self.path)
                if fault == "reset":  # RST instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault:
                    status, code, message = ERRORS[fault]
                    self._answer(
                        status,
                        {"Content-Type": "application/xml"},
                        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode(),
                    )
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                kept = {
                    k: v
                    for k, v in reply.getheaders()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length")
                }
                upstream.close()
                self._answer(
                    reply.status, kept, data, head=self.command == "HEAD", length=reply.getheader("Content-Length")
                )

            def _answer(
                self, status: int, headers: dict, data: bytes, *, head: bool = False, length: str | None = None
            ) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", length if head and length else str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler
