"""ASGI middleware for Serve's HTTP proxy, which runs before any deployment sees the request.

Installed through Serve's hook: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.proxy_middleware:proxy_middlewares
(set by the Makefile, the tests, cluster.yaml and the KubeRay manifest). Serve applies its own
request-id middleware inside these, so what they put in the scope is what Serve logs and echoes.

- StripClientControlledHeaders: Serve's proxy lets a client choose its own request timeout
  (`x-request-timeout-seconds`, where 0 disables it) and turn off disconnect detection
  (`x-request-disconnect-disabled`). Both are meant for a trusted front proxy; from the internet they
  let a caller hold replicas forever. Removed here, the server-side `request_timeout_s` stays in force.
- SafeRequestId: a client's `X-Request-Id` is kept only if it is a safe token; otherwise it is
  replaced by a fresh id before Serve reads it, so the response header, the problem body, the audit
  log and Serve's logs all carry the same id.
- BodyCap: every route but the uploads (`/v1/align`, `/v1/jobs`: capped by the ingress after authentication)
  takes at most MAX_JSON_BODY_BYTES. A larger declared Content-Length is answered 413 here, without
  a deployment call; a chunked body is counted and cut off (413) once it passes the cap, so no
  deployment is ever handed more.
- UploadNeedsCredential: an upload (`/v1/align`, `/v1/jobs`) that carries no credential header at all
  (neither `Authorization` nor `X-API-Key`) can only be answered 401, so the ingress is handed an
  empty body instead of the client's: it still admits, authenticates, counts and audits the request
  as always, and no byte of the body is ever read, by the proxy or the replica. (Serve's proxy
  otherwise streams the body into the replica while the ingress is still authenticating.)
- ReadinessCache: GET /v1/ready answers (under any route prefix) are reused for
  READINESS_CACHE_S, with one call in flight per path, so a flood of load-balancer probes costs the
  Ingress deployment at most one call per second instead of taking its slots (and Serve's queue).
- ProxyErrorsAsProblems: errors Serve's proxy produces itself (404 for no application, the 408 at
  `request_timeout_s`, 500, 503 on back-pressure) are plain text; they are rewritten into problem
  documents, keeping their status and Retry-After. When the proxy answers nothing at all (the
  ingress replica died mid-request, e.g. with its node: Serve then leaves uvicorn to send a bare
  500), the answer is a 503 problem with Retry-After. Errors uvicorn emits before ASGI runs (a
  non-numeric Content-Length, Content-Length with chunked) cannot be reached from here: the front
  proxy in deploy/ refuses those first (docs/errors.md).

Failure policy: each middleware only removes, replaces or refuses; an answer that already started
is never rewritten.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.json_body import MAX_JSON_BODY_BYTES
from serve_app.problems import PROBLEM_MEDIA_TYPE, Problem, problem_body

CLIENT_CONTROLLED_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key"})  # serve_app.security.authenticate reads these only
REQUEST_ID_HEADER = b"x-request-id"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UPLOAD_PATH_SUFFIXES = ("/v1/align", "/v1/jobs")  # under any route prefix
READINESS_PATH_SUFFIX = "/v1/ready"
READINESS_CACHE_S = 1.0

# Statuses Serve's proxy answers on its own, and the problem each becomes.
_PROXY_ERROR_SLUGS = {404: "not-found", 408: "request-timeout", 500: "internal-error", 503: "service-unavailable"}
_PROXY_ERROR_DETAILS = {
    404: "no such route",
    408: "the request took longer than the server allows",
    500: "an internal error occurred",
    503: "the service is at capacity or unavailable; retry later",
}
_DEFAULT_RETRY_AFTER_S = "5"  # Serve's own 503s may carry none; every 503 must (docs/errors.md)
# Serve's proxy answers nothing when the ingress replica is lost mid-request (it dies with its node):
# uvicorn would then send a bare 500. Losing a replica is an outage to retry, not a bug: 503.
_REPLICA_LOST = Problem("service-unavailable", "the replica serving this request was lost; retry later", headers={"Retry-After": _DEFAULT_RETRY_AFTER_S})


def is_safe_request_id(value: str) -> bool:
    """A request id that may be echoed in headers, bodies and logs as it is."""
    return bool(_SAFE_REQUEST_ID.match(value))


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key.lower() == name), None)


def request_id_of(scope: Scope) -> str | None:
    value = _header(scope, REQUEST_ID_HEADER)
    return value.decode("ascii") if value is not None else None


async def send_problem(send: Send, problem: Problem, request_id: str | None) -> None:
    body = json.dumps(problem_body(problem, request_id)).encode()
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in problem.headers.items()]
    if request_id:
        headers.append((REQUEST_ID_HEADER, request_id.encode("ascii")))
    await send({"type": "http.response.start", "status": problem.type.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class StripClientControlledHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(name, value) for name, value in scope["headers"] if name.lower() not in CLIENT_CONTROLLED_HEADERS]
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


class SafeRequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            supplied = [value for name, value in scope["headers"] if name.lower() == REQUEST_ID_HEADER]
            if len(supplied) != 1 or not is_safe_request_id(supplied[0].decode("latin-1")):
                headers = [(name, value) for name, value in scope["headers"] if name.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, uuid.uuid4().hex.encode("ascii")))
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


class BodyCap:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_upload(scope):
            await self.app(scope, receive, send)
            return
        too_large = Problem("payload-too-large", f"the request body exceeds {self.max_bytes} bytes (uploads go to /v1/align or /v1/jobs)")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_problem(send, too_large, request_id_of(scope))  # no deployment call, no body byte read
            return

        received = 0
        cut_off = False
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received, cut_off
            if cut_off:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    cut_off = True  # the deployment sees a disconnect: Serve cancels its call
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if cut_off and not response_started:
                return  # whatever the cancelled call answered: the client gets the 413 below
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, guarded_send)
        if cut_off and not response_started:
            await send_problem(send, too_large, request_id_of(scope))


class UploadNeedsCredential:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_upload(scope) or any(name.lower() in CREDENTIAL_HEADERS for name, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        body_given = False

        async def empty_body() -> Message:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # Never read the client's body, not even to notice a disconnect: Serve cancels this wait
            # once the (401) answer is sent.
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        await self.app(scope, empty_body, send)


def _is_upload(scope: Scope) -> bool:
    return scope["path"].rstrip("/").endswith(UPLOAD_PATH_SUFFIXES)


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    at: float


class ReadinessCache:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._answers: dict[str, _Answer] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "GET" or not path.endswith(READINESS_PATH_SUFFIX):
            await self.app(scope, receive, send)
            return
        answer = self._fresh(path)
        if answer is None:
            async with self._locks.setdefault(path, asyncio.Lock()):  # one call in flight; the rest reuse it
                answer = self._fresh(path) or await self._ask(path, scope, receive)
        headers = [(name, value) for name, value in answer.headers if name.lower() not in (REQUEST_ID_HEADER, b"content-length")]
        headers += [(b"content-length", str(len(answer.body)).encode()), (REQUEST_ID_HEADER, (request_id_of(scope) or "").encode())]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})

    def _fresh(self, path: str) -> _Answer | None:
        answer = self._answers.get(path)
        return answer if answer is not None and time.monotonic() - answer.at < READINESS_CACHE_S else None

    async def _ask(self, path: str, scope: Scope, receive: Receive) -> _Answer:
        start: Message = {}
        body = bytearray()

        async def collect(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self.app(scope, receive, collect)
        answer = _Answer(start.get("status", 503), list(start.get("headers", [])), bytes(body), time.monotonic())
        content_type = dict(answer.headers).get(b"content-type", b"")
        if answer.status in (200, 503) and content_type == b"application/json":  # the ingress's Readiness only, never a failed call
            self._answers[path] = answer
        return answer


class ProxyErrorsAsProblems:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rewriting: Problem | None = None
        started = False

        async def rewriting_send(message: Message) -> None:
            nonlocal rewriting, started
            if message["type"] == "http.response.start":
                rewriting, started = self._problem_for(message), True
            if rewriting is None:
                await send(message)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await send_problem(send, rewriting, request_id_of(scope))  # the plain-text body is dropped

        try:
            await self.app(scope, receive, rewriting_send)
        except Exception:
            if started:
                raise
        if not started:
            await send_problem(send, _REPLICA_LOST, request_id_of(scope))

    @staticmethod
    def _problem_for(start: Message) -> Problem | None:
        status = start["status"]
        headers = {name.lower(): value for name, value in start.get("headers", [])}
        if status not in _PROXY_ERROR_SLUGS or not headers.get(b"content-type", b"text/plain").startswith(b"text/plain"):
            return None  # Serve's own answers are plain text; the ingress answers errors as JSON (problems, readiness)
        kept = {}
        if status == 503:
            kept["Retry-After"] = headers.get(b"retry-after", _DEFAULT_RETRY_AFTER_S.encode()).decode("latin-1")
        return Problem(_PROXY_ERROR_SLUGS[status], _PROXY_ERROR_DETAILS[status], headers=kept)


def proxy_middlewares() -> list[Middleware]:
    # Serve wraps them in list order, so the last is outermost: the id is safe before anything answers.
    return [
        Middleware(StripClientControlledHeaders),
        Middleware(ProxyErrorsAsProblems),
        Middleware(ReadinessCache),
        Middleware(BodyCap),
        Middleware(UploadNeedsCredential),
        Middleware(SafeRequestId),
    ]
