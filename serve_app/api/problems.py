"""RFC 9457 problem details: one stable `type` per cause, and the handlers that render them.

Every error the API returns is `application/problem+json` with `type`, `title`, `status`, `detail`
and `instance` (the request id). `detail` is written for the client and never carries a traceback,
a remote exception's text, a credential, audio or transcript content.

Media and backend modules raise errors with a `reason` code; those codes are problem slugs here, so
the cause reads the same in code, in the response and in the docs (docs/errors.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path, get_route_path

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:forced-aligner:problem:"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProblemType:
    slug: str
    status: int
    title: str
    registered_uri: str | None = None  # an IANA-registered type, where one exists

    @property
    def uri(self) -> str:
        return self.registered_uri or PROBLEM_TYPE_BASE + self.slug


# The IANA HTTP Problem Types registry entries defined by draft-ietf-httpapi-ratelimit-headers.
_IANA = "https://iana.org/assignments/http-problem-types#"


_CATALOGUE = [
    # request shape
    ProblemType("invalid-request", 400, "The request is malformed"),
    ProblemType("not-found", 404, "No such resource"),
    ProblemType("method-not-allowed", 405, "Method not allowed on this resource"),
    ProblemType("request-timeout", 408, "The request took too long to arrive"),
    ProblemType("payload-too-large", 413, "The request body exceeds the size limit"),
    ProblemType("multipart-required", 415, "The request body must be multipart/form-data"),
    ProblemType("unsupported-media-type", 415, "The upload is not an accepted audio format"),
    # transcript
    ProblemType("invalid-transcript", 422, "The transcript cannot be aligned"),
    ProblemType("transcript-too-long", 422, "The transcript exceeds the length limit"),
    ProblemType("unsupported-language", 422, "The language is not supported"),
    ProblemType("malware-detected", 422, "The upload was refused by the malware scanner"),
    # decoded audio
    ProblemType("undecodable-audio", 422, "The audio could not be decoded"),
    ProblemType("empty-audio", 422, "The audio contains no samples"),
    ProblemType("audio-too-long", 422, "The audio exceeds the duration limit"),
    ProblemType("audio-too-short", 422, "The audio is too short to align"),
    ProblemType("too-many-channels", 422, "The audio has too many channels"),
    ProblemType("sample-rate-too-high", 422, "The audio's sample rate is too high"),
    ProblemType("not-single-audio-stream", 422, "The upload must hold exactly one audio stream and no video"),
    ProblemType("decode-timeout", 422, "Decoding the audio took too long"),
    # alignment
    ProblemType("no-alignment-found", 422, "The transcript could not be aligned to the audio"),
    ProblemType("unpronounceable-unit", 422, "The transcript has a word the backend cannot pronounce"),
    # authentication and traffic control
    ProblemType("unauthenticated", 401, "A valid credential is required"),
    ProblemType("insufficient-scope", 403, "The credential lacks the required scope"),
    ProblemType("quota-exceeded", 429, "Request quota exceeded", _IANA + "quota-exceeded"),
    ProblemType("abnormal-usage-detected", 429, "Abnormal usage detected", _IANA + "abnormal-usage-detected"),
    ProblemType("temporary-reduced-capacity", 503, "Temporarily reduced capacity", _IANA + "temporary-reduced-capacity"),
    # server side
    ProblemType("service-unavailable", 503, "The service is temporarily unavailable"),
    ProblemType("internal-error", 500, "Internal error"),
]
PROBLEM_TYPES: Mapping[str, ProblemType] = {problem.slug: problem for problem in _CATALOGUE}


class Problem(Exception):
    """Raise anywhere in the request path to answer with a problem document."""

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ):
        super().__init__(detail)
        self.type = PROBLEM_TYPES[slug]
        self.detail = detail
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})


def unavailable(detail: str, retry_after_s: int) -> Problem:
    """A 503 that tells the client when to come back."""
    return Problem("service-unavailable", detail, headers={"Retry-After": str(retry_after_s)})


def problem_body(problem: Problem, request_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem.type.uri,
        "title": problem.type.title,
        "status": problem.type.status,
        "detail": problem.detail,
        **problem.extensions,
    }
    if request_id:
        body["instance"] = f"urn:request:{request_id}"
    return body


def problem_response(problem: Problem, request_id: str | None) -> JSONResponse:
    return JSONResponse(
        problem_body(problem, request_id), status_code=problem.type.status, headers=problem.headers, media_type=PROBLEM_MEDIA_TYPE
    )


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _api_routes(router, prefix: str = ""):
    """(route, include prefix) for every route, inside included routers too (FastAPI >= 0.137 nests them)."""
    for route in router.routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            yield from _api_routes(nested, prefix + route.include_context.prefix)
        else:
            yield route, prefix


def _allowed_methods(request: Request) -> list[str]:
    """Every method of every route on this path (Starlette names only the first route's)."""
    path = get_route_path(request.scope)
    methods: set[str] = set()
    for route, prefix in _api_routes(request.app.router):
        route_methods = getattr(route, "methods", None)
        if route_methods and compile_path(prefix + route.path)[0].match(path):
            methods |= route_methods
    return sorted(methods)


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error FastAPI/Starlette can raise through `problem_response`."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, _request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = sorted({".".join(str(part) for part in error["loc"][1:]) or "body" for error in exc.errors()})
        detail = "invalid or missing fields: " + ", ".join(fields)
        return problem_response(Problem("invalid-request", detail), _request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed", 408: "request-timeout", 413: "payload-too-large"}.get(exc.status_code, "invalid-request")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        problem = Problem(slug, PROBLEM_TYPES[slug].title, headers=headers)
        return problem_response(problem, _request_id(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Log the exception class only: the message of a remote error embeds a full traceback and
        # may quote request content.
        logger.error("unhandled %s in request %s", type(exc).__name__, _request_id(request))
        return problem_response(Problem("internal-error", "an internal error occurred"), _request_id(request))
