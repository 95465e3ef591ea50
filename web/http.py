"""From a Flask request to a response: route, parse, validate, run in the session scope, encode.

Checks run in the contract's order: path (404), method (405), content type (415),
body size (413), JSON syntax and the Idempotency-Key header (400), field rules (422),
then the database. ``<id:name>`` in a rule takes an id (ASCII digits, 1 to 2^63-1), and
anything else there is a 404 (``Router``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import flask
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from db.engine import Database
from db.session import transaction
from service import idempotency
from web import bodies, errors, jsontext
from web.errors import Reply
from web.logs import current_request, request_context
from web.schemas import path_id

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class Call:
    """A request as a view sees it: the path parameters, the validated body and query."""

    params: Mapping[str, Any] = field(default_factory=dict)
    body: Any = None
    query: Any = None

    @property
    def id(self) -> int:
        """The path's ``<id:id>``."""
        return int(self.params["id"])


View = Callable[[Session, Call], Reply]


@dataclass(frozen=True)
class Endpoint:
    """One method on one path: the view, and how to validate its body or query."""

    view: View
    body: Callable[[Any], Any] | None = None
    query: Callable[[Mapping[str, str]], Any] | None = None


@dataclass(frozen=True)
class Document:
    """A fixed JSON document, served without touching the database."""

    content: Callable[[], Any]


@dataclass(frozen=True)
class Route:
    """A path (``/users/<id:id>``) and what each method does there."""

    path: str
    methods: Mapping[str, Endpoint | Document]


def route(path: str, **methods: Endpoint | Document) -> Route:
    """``route("/users/<id:id>", GET=Endpoint(read), PATCH=Endpoint(update, body=...))``."""
    return Route(path, methods)


class Router:
    """The routes one entry point serves.

    With ``mount="/users"``, routes under ``/users`` are also served without that
    prefix, so a function deployed on its own answers at its root.

    A path matches a rule whatever slashes it starts or ends with. ``<id:name>`` takes an id
    (ASCII digits, 1 to 2^63-1): anything else there matches no rule, so a 404 whatever the
    method. ``<name>`` takes one path segment as text. A path that matches a rule, but not with
    its method, is a 405 naming the methods it has (``HEAD`` wherever ``GET`` is).
    """

    def __init__(self, routes: Iterable[Route], *, mount: str | None = None) -> None:
        self.routes = {entry.path: entry for entry in routes}
        self._exact: dict[str, Route] = {}
        self._patterns: list[tuple[_Pattern, Route]] = []
        for entry in self.routes.values():
            paths = [entry.path]
            if mount and (entry.path == mount or entry.path.startswith(mount + "/")):
                paths.append(entry.path.removeprefix(mount) or "/")
            for path in paths:
                if _PARAMETER.search(path):
                    self._patterns.append((_Pattern(path), entry))
                else:
                    self._exact.setdefault("/" + path.strip("/"), entry)

    def match(self, path: str, method: str) -> tuple[Endpoint | Document, Mapping[str, Any]]:
        """The endpoint and path parameters for a request; raises ``HttpError`` 404 or 405."""
        found, params = self._find("/" + path.strip("/"))
        endpoint = found.methods.get("GET" if method == "HEAD" else method)
        if endpoint is None:
            allowed = sorted(found.methods)
            raise errors.method_not_allowed([*allowed, "HEAD"] if "GET" in allowed else allowed)
        return endpoint, params

    def _find(self, path: str) -> tuple[Route, Mapping[str, Any]]:
        exact = self._exact.get(path)
        if exact is not None:
            return exact, {}
        for pattern, entry in self._patterns:
            params = pattern.match(path)
            if params is not None:
                return entry, params
        raise errors.not_found()


# A parameter of a rule: ``<id:name>`` (an id) or ``<name>`` (one path segment, as text).
_PARAMETER = re.compile(r"<(?:(\w+):)?(\w+)>")
_SEGMENT = {"id": "([0-9]{1,30})", None: "([^/]+)"}


class _Pattern:
    """A rule's path with parameters, as a regular expression."""

    def __init__(self, path: str) -> None:
        pattern, done = "", 0
        self.parameters: list[tuple[str | None, str]] = []  # (kind, name)
        for parameter in _PARAMETER.finditer(path):
            kind, name = parameter.groups()
            if kind not in _SEGMENT:
                raise ValueError(f"{path}: a parameter is <id:{name}> or <{name}>, not <{kind}:…>")
            pattern += re.escape(path[done : parameter.start()]) + _SEGMENT[kind]
            self.parameters.append((kind, name))
            done = parameter.end()
        self.regex = re.compile("/" + (pattern + re.escape(path[done:])).strip("/"))

    def match(self, path: str) -> dict[str, Any] | None:
        """The parameters of ``path`` (ids as ``int``), or None when it does not match."""
        matched = self.regex.fullmatch(path)
        if matched is None:
            return None
        params: dict[str, Any] = {}
        for (kind, name), text in zip(self.parameters, matched.groups(), strict=True):
            value = path_id(text) if kind == "id" else text
            if value is None:
                return None
            params[name] = value
        return params


def serve(request: flask.Request, database: Database, router: Router) -> flask.Response:
    """Answer one request; every outcome, including unexpected errors, is a JSON response."""
    return respond(request, database, lambda: _handle(request, database, router))


def request_scope(
    database: Database, *, methods: Iterable[str] | None = None
) -> Callable[[Callable[[Session, flask.Request], Any]], Callable[[flask.Request], flask.Response]]:
    """Give a plain functions-framework function the whole per-request scope.

    The decorated function receives a fresh session and the Flask request, and returns a
    ``Reply`` or any JSON value (a 200). It runs in ``transaction()``: one commit after it
    returns, a rollback when it raises, retries of transient failures, the session always
    closed; for GET and HEAD the transaction is read-only. Exceptions become the contract's
    error bodies, each request is logged with its request id, and a ``POST`` with an
    ``Idempotency-Key`` acts once. ``methods`` limits the methods it answers; any other is a
    405::

        @functions_framework.http
        @request_scope(database, methods=["GET"])
        def richest(session: Session, request: flask.Request) -> dict[str, Any]: ...
    """
    allowed = sorted({method.upper() for method in methods}) if methods is not None else None

    def decorate(
        function: Callable[[Session, flask.Request], Any],
    ) -> Callable[[flask.Request], flask.Response]:
        def handle(request: flask.Request) -> Reply:
            method = "GET" if request.method == "HEAD" else request.method
            if allowed is not None and method not in allowed:
                raise errors.method_not_allowed([*allowed, "HEAD"] if "GET" in allowed else allowed)

            def view(session: Session, call: Call) -> Reply:
                result = function(session, request)
                return result if isinstance(result, Reply) else Reply(200, result)

            keyed = _keyed(request, lambda: request.get_data(as_text=True))
            return _run(database, view, Call(), keyed, request.method)

        @functools.wraps(function)
        def entry_point(request: flask.Request) -> flask.Response:
            return respond(request, database, lambda: handle(request))

        return entry_point

    return decorate


def respond(
    request: flask.Request, database: Database, handle: Callable[[], Reply]
) -> flask.Response:
    """Answer with the reply ``handle`` returns, or the error body of what it raises; one log
    line with the request id, which every line written meanwhile carries too."""
    started = time.perf_counter()
    context = request_context(
        _request_id(request),
        project=database.settings.trace_project,
        cloud_trace=header(request, "X-Cloud-Trace-Context"),
        traceparent=header(request, "traceparent"),
    )
    token = current_request.set(context)
    bodies.bound(request, database.settings.body_timeout)
    try:
        try:
            reply = handle()
        except Exception as error:  # noqa: BLE001  # every failure becomes the contract's error body
            reply = errors.error_reply(error)
        latency = time.perf_counter() - started
        log.log(
            logging.WARNING if reply.status >= 500 else logging.INFO,
            "%s %s %d %.1f ms",
            request.method,
            request.path,
            reply.status,
            latency * 1000,
            extra={
                "method": request.method,
                "path": request.path,
                "status": reply.status,
                "latency_ms": round(latency * 1000, 2),
                # Cloud Logging shows this as the request line of the entry.
                "httpRequest": {
                    "requestMethod": request.method,
                    "requestUrl": request.path,
                    "status": reply.status,
                    "latency": f"{latency:.6f}s",
                    "userAgent": header(request, "User-Agent") or "",
                },
            },
        )
        response = encode(reply, context.request_id)
        bodies.release(request, response)
        return response
    finally:
        current_request.reset(token)


def encode(reply: Reply, request_id: str) -> flask.Response:
    """The Flask response for a reply: JSON body (none for 204) and the request id."""
    if reply.status == 204 or reply.body is None:
        response = flask.Response(status=reply.status)
        response.headers.remove("Content-Type")
    else:
        body = jsontext.compact(reply.body)
        response = flask.Response(body, status=reply.status, content_type="application/json")
    response.headers.update(reply.headers)
    response.headers["X-Request-Id"] = request_id
    return response


def _handle(request: flask.Request, database: Database, router: Router) -> Reply:
    endpoint, params = router.match(request.path, request.method)
    if isinstance(endpoint, Document):
        return Reply(200, endpoint.content())
    body = _json_body(request) if endpoint.body else None
    keyed = _keyed(request, lambda: body)
    call = Call(
        params=params,
        body=endpoint.body(body) if endpoint.body else None,
        query=endpoint.query(request.args) if endpoint.query else None,
    )
    return _run(database, endpoint.view, call, keyed, request.method)


def _keyed(request: flask.Request, body: Callable[[], Any]) -> tuple[str, str] | None:
    """The Idempotency-Key of a POST (or the delivery id Cloud Tasks or Cloud Scheduler sends
    in its place) and the fingerprint of what it asks, or None."""
    if request.method != "POST":
        return None
    key = header(request, "Idempotency-Key")
    if key is None:
        key = delivery_key(functools.partial(header, request))
        if key is None:
            return None
    elif not _IDEMPOTENCY_KEY.fullmatch(key):
        raise errors.bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return key, idempotency.fingerprint(request.method, request.path, body())


# The headers that name one delivery of a Cloud Tasks task or a Cloud Scheduler run: every
# retry of it carries the same values.
_DELIVERY_HEADERS = (
    ("cloudtasks", "X-CloudTasks-QueueName", "X-CloudTasks-TaskName"),
    ("cloudscheduler", "X-CloudScheduler-JobName", "X-CloudScheduler-ScheduleTime"),
)


def delivery_key(header: Callable[[str], str | None]) -> str | None:
    """The idempotency key a Cloud Tasks task or a Cloud Scheduler run stands for, or None;
    ``header`` gives a request header's value by name, or None.

    ``cloudtasks:QUEUE/TASK`` or ``cloudscheduler:JOB@SCHEDULE_TIME``, as any caller could
    send it in ``Idempotency-Key``; one too long or not visible ASCII is replaced by its
    SHA-256 (``cloudtasks:sha256:HEX``).
    """
    for service, first, second in _DELIVERY_HEADERS:
        names = header(first), header(second)
        if not names[0] or not names[1]:
            continue
        joined = f"{names[0]}{'/' if service == 'cloudtasks' else '@'}{names[1]}"
        key = f"{service}:{joined}"
        if not _IDEMPOTENCY_KEY.fullmatch(key):
            key = f"{service}:sha256:{hashlib.sha256(joined.encode()).hexdigest()}"
        return key
    return None


def _run(
    database: Database, view: View, call: Call, keyed: tuple[str, str] | None, method: str
) -> Reply:
    # GET and HEAD are safe methods: their transaction is read-only, and a write in one fails.
    read_only = method in ("GET", "HEAD")
    if keyed is None:
        return transaction(database, lambda session: view(session, call), read_only=read_only)
    key, digest = keyed
    return transaction(database, lambda session: _idempotent(session, key, digest, view, call))


def _idempotent(session: Session, key: str, digest: str, view: View, call: Call) -> Reply:
    """Run ``view`` once per key: store its success with its effect, or replay what was stored."""
    stored = idempotency.claim(session, key, digest)
    if stored is not None:
        return Reply(stored.status, stored.body, {**stored.headers, "Idempotent-Replayed": "true"})
    reply = view(session, call)
    if not 200 <= reply.status < 300:
        raise RuntimeError(f"a view answered {reply.status} instead of raising")
    idempotency.store(
        session, key, idempotency.StoredResponse(reply.status, reply.body, reply.headers)
    )
    return reply


def _json_body(request: flask.Request) -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise errors.unsupported_media_type(
            "the body must be sent as Content-Type: application/json"
        )
    charset = request.mimetype_params.get("charset", "utf-8")
    if charset.lower() not in ("utf-8", "utf8"):
        raise errors.unsupported_media_type(
            f"the body must be JSON in UTF-8, not charset={charset}: send charset=utf-8 or none"
        )
    # web/bodies.py refuses a body over MAX_BODY_BYTES (413) as it is read.
    try:
        body = json_value(request.stream.read())
    except ValueError as error:
        raise errors.bad_request(f"the body {error}") from None
    if not isinstance(body, dict):
        raise errors.bad_request("the body must be a JSON object")
    return body


def json_value(raw: bytes) -> Any:
    """``raw`` as strict JSON in UTF-8 (no ``NaN`` or ``Infinity``); otherwise ``ValueError``,
    whose message completes "the body ..." (``is not UTF-8``, ``is not valid JSON``).

    An escaped surrogate without its pair (``"\\ud800"``) is refused too: it stands for no
    character, UTF-8 cannot carry it, and neither the database nor an answer could hold it.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ValueError("is not valid JSON") from None
    if _SURROGATE_ESCAPE.search(raw):  # a pair decodes to one character; a lone one stays
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except RecursionError:  # as deep as the parser went, and no deeper
            raise ValueError("is not valid JSON") from None
        except UnicodeEncodeError:
            raise ValueError(
                "escapes half of a surrogate pair, which stands for no character"
            ) from None
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def framework_error(error: HTTPException) -> flask.Response:
    """The JSON answer to a request the framework refuses itself (``/favicon.ico``, an event
    it cannot read), or a failed event delivery's own answer; an unread body is dropped."""
    if error.response is not None:
        response: flask.Response = error.response  # type: ignore[assignment]
    else:
        status = error.code or 500
        code = "not_found" if status == 404 else "bad_request" if status < 500 else "internal"
        reply = errors.Reply(
            status, {"error": {"code": code, "message": error.description or code}}
        )
        response = encode(reply, new_request_id())
    if flask.has_request_context():
        bodies.release(flask.request, response)
    return response


def new_request_id() -> str:
    """A fresh request id: 128 random bits as 32 hex digits, the form of ``uuid4().hex`` at a
    fifth of its cost (0.6 against 2.8 us)."""
    return os.urandom(16).hex()


def _request_id(request: flask.Request) -> str:
    given = header(request, "X-Request-Id")
    return given if given and _REQUEST_ID.fullmatch(given) else new_request_id()


def header(request: flask.Request, name: str) -> str | None:
    """A request header (not ``Content-Type`` or ``Content-Length``), or None: what
    ``request.headers.get`` returns, read from the WSGI environ directly (Werkzeug's lookup
    raises and catches a ``KeyError`` for each header a request lacks)."""
    value: str | None = request.environ.get("HTTP_" + name.upper().replace("-", "_"))
    return value
