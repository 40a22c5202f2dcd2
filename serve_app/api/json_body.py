"""Read a small JSON request body after authentication, streamed and counted under a byte cap.

Why not a FastAPI body parameter: FastAPI reads and parses a declared body *before* it runs the
route's dependencies, so an unauthenticated caller could make the ingress parse hundreds of MB.
Routes call `read_json_body` inside the handler, after `Depends(authorized(...))` has admitted and
authenticated the caller, and document the schema with `json_request_body` (openapi_extra).

Failure policy: a declared Content-Length over the cap is refused before a byte is read, a body
that grows past it while streaming (chunked) is refused the moment it does (413 payload-too-large);
a body that is not JSON of the right media type, or does not fit the model, is 400 invalid-request
naming the fields at fault (never the values).
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serve_app.problems import Problem

MAX_JSON_BODY_BYTES = 64 * 1024  # admin bodies are a few hundred bytes; the proxy holds every non-upload route to this too

Model = TypeVar("Model", bound=BaseModel)


def json_request_body(model: type[BaseModel]) -> dict:
    """The OpenAPI requestBody for a route that reads `model` with `read_json_body`."""
    return {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}


async def read_json_body(request: Request, model: type[Model], max_bytes: int = MAX_JSON_BODY_BYTES) -> Model:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise Problem("invalid-request", "send the body as application/json")
    declared_length = request.headers.get("content-length")
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > max_bytes:
        raise _too_large(max_bytes)  # refused before reading a byte of the body
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)  # chunked bodies carry no Content-Length: count them
    if not body:
        raise Problem("invalid-request", "the request body is required")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as invalid:
        fields = sorted({".".join(str(part) for part in error["loc"]) or "body" for error in invalid.errors()})
        raise Problem("invalid-request", "invalid or missing fields: " + ", ".join(fields)) from None


def _too_large(max_bytes: int) -> Problem:
    return Problem("payload-too-large", f"the request body exceeds {max_bytes} bytes")
