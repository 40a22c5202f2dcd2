"""Render problem documents (serve_app.problems) for FastAPI, and route every framework error to one.

The handlers below answer every exception FastAPI or Starlette can raise as
`application/problem+json`; an unexpected exception becomes a 500 with its class name logged only.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path, get_route_path

from serve_app.problems import PROBLEM_MEDIA_TYPE, PROBLEM_TYPES, Problem, problem_body

logger = logging.getLogger(__name__)


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
