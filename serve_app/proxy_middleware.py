"""ASGI middleware for Serve's HTTP proxy, which runs before any deployment sees the request.

Serve's proxy lets a client choose its own request timeout (`x-request-timeout-seconds`, where 0
disables it) and turn off disconnect detection (`x-request-disconnect-disabled`). Both are meant for a
trusted front proxy; from the internet they let a caller hold replicas forever. The proxy reads them
after its middlewares run, so removing them here leaves the server-side `request_timeout_s` in force.

Installed through Serve's hook: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.proxy_middleware:proxy_middlewares
(set by the Makefile, the tests, cluster.yaml and the KubeRay manifest).
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

CLIENT_CONTROLLED_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})


class StripClientControlledHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(name, value) for name, value in scope["headers"] if name.lower() not in CLIENT_CONTROLLED_HEADERS]
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def proxy_middlewares() -> list[Middleware]:
    return [Middleware(StripClientControlledHeaders)]
