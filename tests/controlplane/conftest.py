"""A real Redis (the embedded redis-server) for control plane tests."""

import pytest
import redis

from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """The module's Redis, emptied for each test."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url
