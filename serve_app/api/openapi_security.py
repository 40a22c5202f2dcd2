"""Declare the API's credentials in its OpenAPI document, so the docs page (/v1/docs) can authorize.

Authentication itself is done by the gate (serve_app.api.gate), which reads the headers directly;
this only describes it: an API key in `X-API-Key` or `Authorization: Bearer`, or an OAuth2 access
token as a bearer token. Every operation requires one of them except the listed public paths.
The OpenAPI document and the docs page are public themselves: they hold no secret, and the
published schema is the API's contract (see README, "Authentication").
"""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI

SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "An API key (fa_...)."},
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key or an OAuth2 access token (RFC 9068 JWT)."},
}
REQUIREMENT = [{"apiKey": []}, {"bearer": []}]  # either one


def with_security_schemes(app: FastAPI, public_paths: frozenset[str]) -> Callable[[], dict]:
    """A replacement for `app.openapi` that adds the schemes and each operation's requirement."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["security"] = [] if path in public_paths else REQUIREMENT
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
