"""More concurrent Redis calls than connections: the calls wait their turn, none fails."""

import asyncio
import time

from lightpd.controlplane.app import redis_client
from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis
from lightpd.controlplane.settings import Settings


def test_calls_beyond_the_pool_wait_for_a_connection(tiny_model) -> None:
    server = EmbeddedRedis().start()
    try:
        settings = Settings(
            model=tiny_model("llama"),
            redis_url=server.url,
            redis_max_connections=2,
            admin_token="admin",
            cluster_token="cluster",
        )

        async def calls() -> list:
            client = redis_client(settings)
            try:
                # Each call holds its connection for 0.1 s (BLPOP on an empty list).
                return await asyncio.gather(*(client.blpop(["empty"], 0.1) for _ in range(20)))
            finally:
                await client.aclose()

        started = time.monotonic()
        results = asyncio.run(calls())
        elapsed = time.monotonic() - started
    finally:
        server.stop()

    assert results == [None] * 20
    # Two connections, twenty calls of 0.1 s: they ran about two at a time.
    assert elapsed >= 0.9
