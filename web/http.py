"""From a Flask request to a response: route, parse, validate, run in the session scope, encode.

Checks run in the contract's order: path (404), method (405), content type (415),
body size (413), JSON syntax and the Idempotency-Key header (400), field rules (422),
then the database.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import flask
from sqlalchemy.orm import Session

from db.engine import Database
from db.session import transaction
from service import idempotency
from web import errors
from web.errors import Reply
from web.logs import current_request, request_context
from web.schemas import path_id

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")


@dataclass(frozen=True)
class Call:
    """A request as a view sees it: the path id, the validated body and query."""

    id: int | None = None
    body: Any = None
    query: Any = None


View = Callable[[Session, Call], Reply]


@dataclass(frozen=True)
class Endpoint:
    """One method on one path: the view, and how to validate its body or query."""

    view: View
    body: Callable[[Any], Any] | None = None
    query: Callable[[Mapping[str, str]], Any] | None = None


@dataclass(frozen=True)
class Resource:
    """A collection (``/``) and its members (``/{id}``), each a map of method to endpoint."""

    collection: Mapping[str, Endpoint] = field(default_factory=dict)
    member: Mapping[str, Endpoint] = field(default_factory=dict)


@dataclass(frozen=True)
class Router:
    """Resources by first path segment; ``bare`` is also served without a prefix."""

    resources: Mapping[str, Resource]
    bare: Resource | None = None


def serve(request: flask.Request, database: Database, router: Router) -> flask.Response:
    """Answer one request; every outcome, including unexpected errors, is a JSON response."""
    started = time.perf_counter()
    context = request_context(_request_id(request), request.headers)
    token = current_request.set(context)
    try:
        try:
            reply = _handle(request, database, router)
        except Exception as error:  # noqa: BLE001  # every failure becomes the contract's error body
            reply = errors.error_reply(error)
        latency = time.perf_counter() - started
        log.log(
            logging.WARNING if reply.status >= 500 else logging.INFO,
            "%s %s %d",
            request.method,
            request.path,
            reply.status,
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
                    "userAgent": request.headers.get("User-Agent", ""),
                },
            },
        )
        return encode(reply, context.request_id)
    finally:
        current_request.reset(token)


def encode(reply: Reply, request_id: str) -> flask.Response:
    """The Flask response for a reply: JSON body (none for 204) and the request id."""
    if reply.status == 204 or reply.body is None:
        response = flask.Response(status=reply.status)
        response.headers.remove("Content-Type")
    else:
        body = json.dumps(reply.body, ensure_ascii=False, separators=(",", ":"))
        response = flask.Response(body, status=reply.status, content_type="application/json")
    response.headers.update(reply.headers)
    response.headers["X-Request-Id"] = request_id
    return response


def _handle(request: flask.Request, database: Database, router: Router) -> Reply:
    resource, item_id = _route(router, request.path)
    endpoints = resource.member if item_id is not None else resource.collection
    method = "GET" if request.method == "HEAD" else request.method
    endpoint = endpoints.get(method)
    if endpoint is None:
        allowed = sorted(endpoints)
        raise errors.method_not_allowed([*allowed, "HEAD"] if "GET" in allowed else allowed)
    body = _json_body(request) if endpoint.body else None
    key = _idempotency_key(request) if method == "POST" else None
    call = Call(
        id=item_id,
        body=endpoint.body(body) if endpoint.body else None,
        query=endpoint.query(request.args) if endpoint.query else None,
    )
    if key is None:
        return transaction(database, lambda session: endpoint.view(session, call))
    digest = idempotency.fingerprint(method, request.path, body)
    return transaction(
        database, lambda session: _idempotent(session, key, digest, endpoint.view, call)
    )


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


def _route(router: Router, path: str) -> tuple[Resource, int | None]:
    trimmed = path.strip("/")
    segments = trimmed.split("/") if trimmed else []
    if segments and segments[0] in router.resources:
        resource: Resource | None = router.resources[segments[0]]
        segments = segments[1:]
    else:
        resource = router.bare
    if resource is None or len(segments) > 1:
        raise errors.not_found()
    if not segments:
        if not resource.collection:
            raise errors.not_found()
        return resource, None
    item_id = path_id(segments[0])
    if item_id is None or not resource.member:
        raise errors.not_found()
    return resource, item_id


def _json_body(request: flask.Request) -> dict[str, Any]:
    if request.mimetype != "application/json" or request.mimetype_params.get(
        "charset", "utf-8"
    ).lower() not in ("utf-8", "utf8"):
        raise errors.unsupported_media_type()
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise errors.payload_too_large(MAX_BODY_BYTES)
    raw = request.stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise errors.payload_too_large(MAX_BODY_BYTES)
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise errors.bad_request("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise errors.bad_request("the body must be a JSON object")
    return body


def _idempotency_key(request: flask.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise errors.bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return key


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def new_request_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def _request_id(request: flask.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.fullmatch(given) else new_request_id()
