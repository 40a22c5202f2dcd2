"""Fixtures shared by the authentication tests: `pytest_plugins = ["tests.support.auth_fixtures"]`.

`redis_client` is the request-path client an ingress replica uses (short timeouts, one retry),
talking to the session's real redis-server (tests/conftest.py), so failure tests answer quickly.
"""

from __future__ import annotations

import pytest
import pytest_asyncio

from serve_app.security.api_keys import ApiKeyStore
from serve_app.security.redis_store import request_path_client

PEPPER = b"test-pepper-not-for-production-0001"


@pytest.fixture
def api_key_pepper() -> bytes:
    return PEPPER


@pytest_asyncio.fixture
async def redis_client(redis_server):
    client = request_path_client(redis_server.url)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def api_key_store(redis_client, api_key_pepper) -> ApiKeyStore:
    return ApiKeyStore(redis_client, api_key_pepper)
