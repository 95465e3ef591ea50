"""A small threaded HTTP server answering JSON by route, recording every request it receives."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass
class Received:
    """One request as the stand-in saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Answer:
    """What a route answers: a status and a JSON body (or raw bytes)."""

    status: int = 200
    body: Any = field(default_factory=dict)
    content_type: str = "application/json"


Route = Callable[[Received, re.Match[str]], Answer]


def not_found(message: str) -> Answer:
    """Google's error shape for a missing resource."""
    return Answer(404, {"error": {"code": 404, "message": message, "status": "NOT_FOUND"}})


class JsonServer:
    """Serve ``routes`` on 127.0.0.1 in a background thread; unknown requests get a 404."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Route]] = []
        self.received: list[Received] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                url = urlsplit(self.path)
                request = Received(
                    self.command,
                    url.path,
                    parse_qs(url.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length) if length else b"",
                )
                answer = outer.dispatch(request)
                payload = (
                    answer.body
                    if isinstance(answer.body, bytes)
                    else json.dumps(answer.body).encode()
                )
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            # BaseHTTPRequestHandler looks these names up.
            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the requests are recorded in ``received`` instead

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)
        return f"http://{host}:{port}"

    def route(self, method: str, pattern: str, handler: Route) -> None:
        """Answer ``method`` on paths fully matching the regular expression ``pattern``."""
        self.routes.append((method, re.compile(pattern), handler))

    def dispatch(self, request: Received) -> Answer:
        with self._lock:
            self.received.append(request)
            for method, pattern, handler in self.routes:
                match = pattern.fullmatch(request.path)
                if method == request.method and match:
                    return handler(request, match)
        return not_found(f"no stand-in for {request.method} {request.path}")

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
