"""KV connectors by transport name, and what passes between transports.

What every transport must do is test_transport_conformance.py's; here: how a
name becomes a connector, and the frames every receiver takes, so that a sender
falls back to them for a receiver of another transport.
"""

import pytest
import torch
import zmq

from lightpd.common.engine.connector import KVSendSpec, make_connector
from lightpd.common.engine.kv_pool import TokenKVPool
from lightpd.common.kv_transports import TRANSPORT_CHOICES, check_transport, resolve_transport
from lightpd.common.wire.messages import KVLayout
from tests.common.kv_pair import (
    GREEDY,
    KEYS,
    SECRET,
    decode_as_in_process,
    pair_of,
    prompt,
)


def test_the_choices_users_may_pass():
    assert TRANSPORT_CHOICES == ("auto", "zmq", "nccl")
    assert resolve_transport("auto", "cuda") == "nccl"
    assert resolve_transport("auto", "cpu") == "zmq"
    assert resolve_transport("zmq", "cuda") == "zmq"
    with pytest.raises(ValueError) as refused:
        check_transport("tcp")
    assert str(refused.value) == "--kv-transport must be auto, zmq or nccl, not 'tcp'"


@pytest.mark.parametrize(
    ("name", "takes"), [("auto", "zmq"), ("zmq", "zmq"), ("nccl", "gloo"), ("tcp", None)]
)
def test_a_connector_says_what_its_receiving_side_takes(name, takes):
    # On a CPU pool: "nccl" is Gloo there, and "auto" is ZeroMQ.
    pool = TokenKVPool(16, 2, 1, 4, torch.float32, "cpu")
    layout = KVLayout(
        model_fingerprint="0" * 16, dtype="float32", num_layers=2, num_kv_heads=1, head_dim=4
    )
    args = (layout, pool, KEYS, zmq.Context.instance(), "127.0.0.1")
    if takes is None:
        with pytest.raises(ValueError, match="must be auto, zmq or nccl, not 'tcp'"):
            make_connector(name, *args)
        return
    connector = make_connector(name, *args)
    try:
        assert connector.transport == takes
        assert connector.endpoint.startswith("tcp://127.0.0.1:")
    finally:
        connector.close()


@pytest.fixture
def mixed_pair(request, engines):
    """A sender and a receiver of the transports ``request.param`` names."""
    yield from pair_of(*request.param, engines)


@pytest.mark.parametrize("mixed_pair", [("nccl", "zmq"), ("zmq", "nccl")], indirect=True)
def test_a_receiver_of_another_transport_takes_frames(mixed_pair, engines):
    # The sender sees the receiver's transport in its KVSendSpec: not its own, so it
    # sends frames; every receiver takes them.
    decode_as_in_process(mixed_pair, engines[2], {"a": prompt(5), "b": prompt(40, 1)})


@pytest.mark.parametrize("mixed_pair", [("nccl", "zmq")], indirect=True)
def test_a_zeromq_receiver_refuses_tensors_over_a_group(mixed_pair):
    pair, tokens = mixed_pair, prompt(20)
    pair.reserve("g", tokens)
    # As if the receiver took the sender's own transport: its headers come tagged.
    spec = KVSendSpec(pair.endpoint, SECRET, 2.0, pair.sender.connector.transport)
    pair.sender.add_request("g", tokens, GREEDY, spec)

    def errors() -> list[str]:  # the sender's and the receiver's
        return [o.error for o in pair.outputs.get("g", []) if o.error]

    pair.run_until(lambda: len(errors()) == 2)
    assert all("this node receives KV over ZeroMQ only" in e for e in errors())
