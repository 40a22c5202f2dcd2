"""FastAPI dependencies: authentication and limits as declarations on a route, not code in it.

    @app.post("/v1/align")
    async def align(caller: Caller = Depends(authorized("align"))): ...

`authorized(scope)` runs the gate's steps in order: admit the client (IP, ban, pre-auth bucket),
then authenticate, authorize the scope, check bans and shedding and take the request token. The
caller is also left on `request.state` so the rate-limit headers reach every answer, errors included.
"""

# No `from __future__ import annotations`: FastAPI resolves these annotations at runtime.

from typing import Awaitable, Callable

from fastapi import Depends, Request

from serve_app.api.gate import Caller, Gate


async def gate(request: Request) -> Gate:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
    return request.app.state.gate  # built by the Ingress replica (deployments/ingress.py)


def authorized(scope: str) -> Callable[..., Awaitable[Caller]]:
    async def dependency(request: Request, gate: Gate = Depends(gate)) -> Caller:
        route = request.scope["route"].path_format  # the template (/v1/admin/keys/{key_id}), never the ids in it
        caller = await gate.admit(request, route)  # also leaves the caller on request.state
        await gate.authenticate(request, caller, scope)
        return caller

    return dependency
