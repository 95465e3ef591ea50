"""Request bodies received within bounds of size and time, and never read after the answer.

Three things a hostile or broken client could otherwise do to an instance, which has 8
threads and 512 MiB:

- send a large body: it is refused once ``MAX_BODY_BYTES`` are read, whether its length was
  declared or it comes in chunks, and nothing past that is read into memory;
- send a body slowly, or stall in the middle of it: the whole body must arrive within
  ``BODY_TIMEOUT`` seconds, after which the connection's read side is shut (one thread
  watches every deadline), the read ends, and the request gets a 408;
- leave its body unread: functions-framework reads the whole remaining body into memory after
  every answer (``read_request``, to keep the connection usable). Here an unread body is
  dropped instead, and the connection closed.

Whenever the connection will be closed after the answer (a 413, a 408, a body left unread),
the answer says ``Connection: close``, so that a client keeping connections alive sends its
next request on a new one instead of losing it on this one. gunicorn drops the hop-by-hop
headers an application sets and would announce ``keep-alive``; ``honour_connection_close``
makes it keep its word.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import io
import itertools
import logging
import socket
import threading
import time
from typing import IO, Any, cast

import flask

from web import errors

MAX_BODY_BYTES = 1024 * 1024
_BOUNDED = "app.body"  # the request's BoundedBody, in its WSGI environ
_CHUNK = 64 * 1024
_GRANULE = 0.1  # seconds: how finely body deadlines are kept


class BoundedBody(io.RawIOBase):
    """A request's body stream: at most ``limit`` bytes, all of them before ``deadline``."""

    def __init__(
        self, inner: Any, limit: int, watch: _Watch | None, *, declared_too_large: bool = False
    ) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.watch = watch
        self.declared_too_large = declared_too_large
        self.received = 0
        self.finished = False  # read to its end
        self.dropped = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.dropped or self.finished:
            return b""
        if self.declared_too_large:
            raise errors.payload_too_large(self.limit)
        wanted = self.limit + 1 - self.received
        if size is not None and size >= 0:
            wanted = min(wanted, size)
        chunks = []
        while wanted > 0:
            try:
                chunk = self.inner.read(min(wanted, _CHUNK))
            except (OSError, ValueError) as error:  # a time-out, a reset, a broken chunk
                raise self._late_or_broken() from error
            if self.watch is not None and self.watch.expired:
                raise errors.request_timeout()
            if not chunk:
                self._finish()
                break
            chunks.append(chunk)
            wanted -= len(chunk)
            self.received += len(chunk)
        if self.received > self.limit:
            raise errors.payload_too_large(self.limit)
        if size is None or size < 0:
            self._finish()
        return b"".join(chunks)

    def _finish(self) -> None:
        self.finished = True
        if self.watch is not None:
            self.watch.cancel()  # all of it arrived in time

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _late_or_broken(self) -> errors.HttpError:
        if self.watch is not None and self.watch.expired:
            return errors.request_timeout()
        return errors.bad_request("the body could not be read")


def bound(request: flask.Request, timeout: float) -> None:
    """Put ``request``'s body behind the size limit and the deadline, before anything reads it."""
    if not _has_body(request):
        return
    watch = None
    sock = request.environ.get("gunicorn.socket")
    if isinstance(sock, socket.socket):
        watch = _deadlines.watch(sock, timeout)
    declared = request.content_length
    body = BoundedBody(
        request.stream,
        MAX_BODY_BYTES,
        watch,
        declared_too_large=declared is not None and declared > MAX_BODY_BYTES,
    )
    request.environ[_BOUNDED] = body
    request.stream = cast(IO[bytes], body)  # werkzeug's cached_property takes a value


def release(request: flask.Request, response: flask.Response) -> None:
    """After the answer: a body not read to its end is dropped, and the connection closed."""
    body = request.environ.get(_BOUNDED)
    if isinstance(body, BoundedBody):
        if body.watch is not None:
            body.watch.cancel()
        if body.finished:
            return
        body.dropped = True
    elif not _has_body(request):
        return
    else:
        request.stream = io.BytesIO()
    response.headers["Connection"] = "close"


def _has_body(request: flask.Request) -> bool:
    # From the environ: Werkzeug's ``content_length`` raises and catches a KeyError for each of
    # the two headers a request without a body lacks, on every request.
    environ = request.environ
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return True
    length: str = environ.get("CONTENT_LENGTH", "").strip()
    return length.isascii() and length.isdigit() and int(length) > 0


class _Watch:
    """One socket's deadline; ``expired`` once its read side was shut."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.cancelled = False
        self.expired = False

    def cancel(self) -> None:
        self.cancelled = True


class _Deadlines:
    """One thread for every body being received: it shuts the read side of a socket whose
    body is late, which ends a read blocked on it however the client trickles."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, seconds: float) -> _Watch:
        watch = _Watch(sock, time.monotonic() + seconds)
        with self._ready:
            heapq.heappush(self._heap, (watch.deadline, next(self._order), watch))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="body-deadlines")
                self._thread.daemon = True
                self._thread.start()
            if self._heap[0][2] is watch:  # the earliest: the thread waits for a later one
                self._ready.notify()
        return watch

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._heap:
                    self._ready.wait()
                now = time.monotonic()
                due = []
                while self._heap and (self._heap[0][2].cancelled or self._heap[0][0] <= now):
                    due.append(heapq.heappop(self._heap)[2])
                if not due:
                    # Woken at most every _GRANULE: a deadline is kept to within that.
                    self._ready.wait(max(self._heap[0][0] - now, _GRANULE))
                    continue
            for watch in due:
                if not watch.cancelled:
                    watch.expired = True
                    with contextlib.suppress(OSError):  # already closed
                        watch.sock.shutdown(socket.SHUT_RD)


_deadlines = _Deadlines()


def honour_connection_close() -> None:
    """Make gunicorn answer ``Connection: close`` and close the connection when the
    application's response says ``Connection: close``, instead of dropping the header.

    gunicorn's response decides the ``Connection`` header itself (``should_close``) and
    discards the application's; ``force_close`` is its own way of closing after the answer,
    which it then announces. Where gunicorn is not installed, or has other internals than
    those the suite runs against, nothing changes and one WARNING says so.
    """
    try:
        from gunicorn.http.wsgi import Response  # noqa: PLC0415  # absent under other servers
    except ImportError:
        return
    process_headers = getattr(Response, "process_headers", None)
    if process_headers is None or not hasattr(Response, "force_close"):
        logging.getLogger(__name__).warning(
            "this gunicorn has no Response.process_headers or force_close: an answer that"
            " closes its connection will not say so"
        )
        return
    if getattr(process_headers, "honours_connection_close", False):
        return

    @functools.wraps(process_headers)
    def honouring_close(self: Any, headers: list[tuple[str, str]]) -> None:
        process_headers(self, headers)
        for name, value in headers:
            if name.lower() == "connection" and value.strip().lower() == "close":
                self.force_close()

    honouring_close.honours_connection_close = True  # type: ignore[attr-defined]
    Response.process_headers = honouring_close


honour_connection_close()
