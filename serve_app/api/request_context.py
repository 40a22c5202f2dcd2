"""ASGI middleware around every ingress request: its id, the RateLimit headers, and its metrics.

- `request.state.request_id`: the client's X-Request-ID when safe (the proxy middleware already
  replaced an unsafe one before Serve read it, so this is the id of Serve's logs and the response
  header; the check only matters without that middleware), else a new random id;
- every answer to an identified caller (`request.state.caller`, errors included) carries the
  RateLimit headers of the decisions taken for it;
- aligner_requests{route, status} and the "total" stage time, for every request.

A plain ASGI class, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs the app in
a task group of its own and streams the response through a memory channel, on every request.
Failure policy: none of its own; an exception from the app propagates unchanged (counted as 500).
"""

from __future__ import annotations

import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import metrics
from serve_app.proxy_middleware import is_safe_request_id
from serve_app.security.ratelimit_headers import rate_limit_headers


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # what request.state reads and writes
        supplied = Headers(scope=scope).get("x-request-id", "")
        state["request_id"] = supplied if is_safe_request_id(supplied) else uuid.uuid4().hex
        started = time.perf_counter()
        status = 500  # unless the app starts an answer

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                caller = state.get("caller")
                if caller is not None:
                    MutableHeaders(scope=message).update(rate_limit_headers(caller.decisions.values()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = scope.get("route")
            metrics.REQUESTS.inc(tags={"route": route.path_format if route else "unmatched", "status": str(status)})
            metrics.STAGE_SECONDS.observe(time.perf_counter() - started, tags={"stage": "total"})
