"""Awaiting a call to another deployment: every way it can fail on our side becomes a 503 problem.

Shared by the Ingress and the JobRunner: back-pressure (Serve's max_queued_requests), a replica
that died or raised (RayError), and a call that outlives its timeout (then cancelled) all answer
`service-unavailable` with Retry-After, naming the deployment, never its traceback.
"""

from __future__ import annotations

import asyncio
import logging

from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError

from serve_app.problems import unavailable

logger = logging.getLogger("ray.serve")


async def downstream(response, name: str, timeout_s: float, retry_after_s: int):
    """Await a DeploymentResponse; saturation, death and slowness all become 503 + Retry-After."""
    try:
        return await asyncio.wait_for(response, timeout_s)
    except BackPressureError:
        raise unavailable(f"the {name} is at capacity; retry later", retry_after_s) from None
    except asyncio.TimeoutError:
        response.cancel()
        raise unavailable(f"the {name} did not answer in time; retry later", retry_after_s) from None
    except RayError as error:
        # The message of a remote error is a full traceback: log the type only.
        logger.error("%s call failed: %s", name, type(error).__name__)
        raise unavailable(f"the {name} failed; retry later", retry_after_s) from None
