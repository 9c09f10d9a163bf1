"""Driving nodes without a control plane: a request's whole P/D path through one
``NodeClient`` (reserve on the decode node, prefill, collect the tokens), for the
tests of the node plane. The control plane's dispatcher does this for real."""

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec

from lightpd.common.wire.messages import TokenEvent, TokenLogprobs
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.node_client import NodeClient, NodeError, NodeTimeout


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


def secret(client: NodeClient, request_id: str) -> str:
    """The secret the nodes know the request's stream by (to forge its messages)."""
    return client._stream(request_id).secret


async def events(
    client: NodeClient, request_id: str, timeout: float = 60.0
) -> AsyncIterator[TokenEvent]:
    """A request's events up to and including the one that finishes it; NodeTimeout
    when none comes for ``timeout``."""
    try:
        while True:
            event = await client.next_event(request_id, timeout)
            if event is None:
                raise NodeTimeout(f"request {request_id}: nothing for {timeout:g} s")
            yield event
            if event.finish_reason is not None:
                return
    finally:
        client.close_stream(request_id)


async def generate(
    client: NodeClient,
    prefill_endpoint: str,
    decode_endpoint: str,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    timeout: float = 60.0,
) -> Generation:
    """Reserve on the decode node, prefill, and collect the whole output."""
    if params.seed is None:
        params = msgspec.structs.replace(params, seed=random.getrandbits(63))
    client.open_stream(request_id)
    try:
        reserved = await client.reserve(decode_endpoint, request_id, prompt, params)
        await client.prefill(prefill_endpoint, request_id, prompt, params, reserved.target())
    except NodeError:
        await client.abort(decode_endpoint, request_id)
        client.close_stream(request_id)
        raise
    result = Generation()
    async for event in events(client, request_id, timeout):
        result.token_ids += event.token_ids
        result.logprobs += event.logprobs or []
        result.finish_reason = event.finish_reason
        result.error = event.error
    return result
