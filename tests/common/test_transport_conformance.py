"""The KV transport conformance suite: what a connector does over any transport.

Two engines in this process, a sender (prefill role) and a receiver (decode
role), each with a connector of the transport under test: every transport of
``lightpd.common.kv_transports``, and the in-process loopback one that this
suite registers (a new transport is one file and one registry line). Every test
ends with both pools back to their initial free slots.
"""

import time

import pytest
import torch

from lightpd.common.engine import FinishReason
from lightpd.common.engine.connector import KVSendSpec, LayerChunk
from lightpd.common.kv_transports import TRANSPORTS
from lightpd.common.wire.messages import KVLayout
from tests.common.kv_pair import (
    GREEDY,
    SECRET,
    SLOTS,
    connector,
    decode_as_in_process,
    on_device,
    pair_of,
    prompt,
    socket_nobody_reads,
)

LOOPBACK = "tests.common.loopback_transport:LoopbackTransport"


@pytest.fixture
def loopback_registered(monkeypatch):
    monkeypatch.setitem(TRANSPORTS, "loopback", LOOPBACK)


# "nccl": NCCL between GPUs, Gloo on CPU.
NAMES = sorted({*TRANSPORTS, "loopback"})


@pytest.fixture(params=NAMES)
def pair(request, engines, loopback_registered):
    yield from pair_of(request.param, request.param, engines)


@pytest.fixture(params=NAMES)
def cached_pair(request, cached_engines, loopback_registered):
    yield from pair_of(request.param, request.param, cached_engines)


def test_whole_and_chunked_prompts_decode_as_in_process(pair, engines):
    prompts = {"short": prompt(5), "chunked": prompt(100, 1), "exact": prompt(16, 2)}
    decode_as_in_process(pair, engines[2], prompts)
    for request_id in prompts:
        assert pair.decoded(request_id).finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    # The sender learns of each hand-off, and holds nothing after.
    for request_id in prompts:
        reasons = [o.finish_reason for o in pair.outputs[request_id]]
        assert FinishReason.HANDED_OFF in reasons


def test_connectors_are_idle_once_their_transfers_end(pair, engines):
    # While a connector is busy, its node's loop polls every millisecond.
    decode_as_in_process(pair, engines[2], {"idle": prompt(20)})
    connectors = (pair.sender.connector, pair.receiver.connector)
    pair.run_until(lambda: not any(c.busy() for c in connectors), timeout=5.0)


def test_layers_out_of_order_are_accepted_but_a_gap_is_refused(pair):
    sender = pair.sender.connector
    tokens = prompt(8)
    pair.reserve("rev", tokens)
    pair.reserve("gap", tokens)
    slots = pair.sender.pool.allocate(8)
    try:
        sender.start_send("rev", pair.spec())
        sender.start_send("gap", pair.spec())
        for layer in reversed(range(pair.layout.num_layers)):  # last layer first
            sender.save_layer(layer, [LayerChunk("rev", 0, slots)])
        sender.save_layer(0, [LayerChunk("gap", 4, slots[4:])])  # positions 0-3 never came
        sender.finish_send("rev", 8, 7, None)
        pair.run_until(lambda: pair.ended("rev") and pair.ended("gap"))
    finally:
        pair.run_until(lambda: not pair.sender.connector._sends)
        pair.sender.pool.free(slots)
    assert pair.tokens("rev")[0] == 7  # the first token the sender gave
    gap = pair.final("gap")
    assert gap.finish_reason is FinishReason.ERROR and gap.retry
    assert "chunk starts at 4, expected 0" in gap.error


def test_a_first_token_without_every_layer_fails_both_sides_at_the_deadline(pair):
    # Layers may travel on several connections, so a first token ahead of some layers
    # waits for them, but only until the reservation's deadline.
    sender = pair.sender.connector
    tokens = prompt(8)
    pair.reserve("short", tokens, timeout_s=0.5)
    slots = pair.sender.pool.allocate(8)
    try:
        sender.start_send("short", pair.spec())
        for layer in range(pair.layout.num_layers - 1):  # the last layer never comes
            sender.save_layer(layer, [LayerChunk("short", 0, slots)])
        sender.finish_send("short", 8, 7, None)
        pair.run_until(lambda: pair.ended("short"))
    finally:
        pair.run_until(lambda: not pair.sender.connector._sends)  # the sender heard it too
        pair.sender.pool.free(slots)
    last = pair.layout.num_layers - 1
    final = pair.final("short")
    assert final.finish_reason is FinishReason.ERROR and final.retry
    assert f"incomplete KV after 0.5 s: layers [{last}] short" in final.error


def test_abort_mid_transfer_on_the_sender(pair):
    tokens = prompt(200)
    pair.reserve("a", tokens, timeout_s=1.0)
    pair.send("a", tokens)
    pair.step()  # one 16-token chunk out of 200
    assert pair.sender.abort("a").finish_reason is FinishReason.ABORT
    pair.run_until(lambda: pair.ended("a"))
    final = pair.final("a")
    assert final.finish_reason is FinishReason.ERROR
    assert "KV did not arrive within 1 s" in final.error


def test_abort_mid_transfer_on_the_receiver(pair):
    tokens = prompt(200)
    pair.reserve("b", tokens)
    pair.send("b", tokens)
    pair.step()
    assert pair.receiver.abort("b").finish_reason is FinishReason.ABORT
    pair.run_until(lambda: pair.ended("b"))
    final = pair.final("b")  # the sender's: the receiver refused its first token
    assert final.finish_reason is FinishReason.ERROR and final.retry
    assert "no reservation (aborted or expired)" in final.error


def test_receiver_gone(pair):
    with socket_nobody_reads() as endpoint:
        pair.send("c", prompt(20), endpoint=endpoint)
        pair.run_until(lambda: pair.ended("c"))
    final = pair.final("c")
    assert final.finish_reason is FinishReason.ERROR
    assert "did not acknowledge the KV within 2 s" in final.error


def test_sender_gone_and_deadline_expiry(pair):
    pair.reserve("d", prompt(20), timeout_s=0.3)
    pair.run_until(lambda: pair.ended("d"))
    assert "KV did not arrive within 0.3 s; reservation released" in pair.final("d").error


def test_layout_mismatch_fails_both_sides(pair, engines):
    def errors_of(request_id: str) -> list[str]:
        outputs = pair.outputs.get(request_id, [])
        return [o.error for o in outputs if o.finish_reason is FinishReason.ERROR]

    other = KVLayout(**{**msgspec_dict(pair.layout), "num_layers": pair.layout.num_layers + 1})
    pair.sender.connector.layout = other
    try:
        pair.reserve("e", prompt(10))
        pair.send("e", prompt(10))
        pair.run_until(lambda: len(errors_of("e")) >= 2)
    finally:
        pair.sender.connector.layout = pair.layout
    errors = errors_of("e")
    assert len(errors) == 2 and all("KV layout mismatch" in e for e in errors)


def test_duplicate_foreign_and_unsigned_transfers_change_nothing(pair):
    tokens = prompt(12)
    pair.reserve("f", tokens)
    # KV for an id nobody reserved, and KV under the wrong secret, are dropped.
    intruder = connector("zmq", pair.sender, pair.layout, False)
    slots = pair.sender.pool.allocate(12)
    try:
        intruder.start_send("nobody", KVSendSpec(pair.endpoint, SECRET, 1.0))
        intruder.start_send("f", KVSendSpec(pair.endpoint, "w" * 32, 1.0))
        for request_id in ("nobody", "f"):
            intruder.save_layer(0, [LayerChunk(request_id, 0, slots)])
            intruder.finish_send(request_id, 12, 5, None)
        deadline = time.monotonic() + 5
        refusals = []
        while len(refusals) < 2 and time.monotonic() < deadline:
            refusals += intruder.poll()
            pair.step()
        reasons = sorted(e.reason for e in refusals)
        assert "no reservation" in reasons[0] and "secret does not match" in reasons[1]
    finally:
        intruder.close()
        pair.sender.pool.free(slots)
    pair.send("f", tokens)
    with pytest.raises(ValueError, match="already in use"):
        pair.send("f", tokens)
    pair.run_until(lambda: pair.decoded("f"))
    assert pair.final("f").finish_reason is not FinishReason.ERROR  # "f" was unharmed


def msgspec_dict(struct) -> dict:
    return {f: getattr(struct, f) for f in struct.__struct_fields__}


def test_free_slots_are_counted_by_the_pool():
    # The suite's end-state check relies on the pool's count: a sanity check of it.
    from lightpd.common.engine.kv_pool import TokenKVPool

    pool = TokenKVPool(16, 1, 1, 4, torch.float32, "cpu")
    slots = pool.allocate(5)
    assert pool.num_free_slots == 11
    pool.free(slots)
    assert pool.num_free_slots == 16


def test_only_what_the_receiver_lacks_is_sent(cached_pair, cached_engines, monkeypatch):
    """Delta-only transfer: the receiver's cached prefix is not sent, whatever the
    sender's own cache holds (more, less or the same); the tokens stay exact."""
    pair, reference = cached_pair, cached_engines[2]
    sent: dict[str, int] = {}  # positions each request's transfer carried, per layer 0
    save_layer = pair.sender.connector.save_layer

    def counting(layer: int, chunks: list[LayerChunk]) -> None:
        for chunk in chunks if layer == 0 else []:
            sent[chunk.request_id] = sent.get(chunk.request_id, 0) + chunk.slots.numel()
        save_layer(layer, chunks)

    monkeypatch.setattr(pair.sender.connector, "save_layer", counting)
    for engine in (pair.sender, pair.receiver):  # the engines serve every transport's run
        engine.scheduler.kv.prefix_cache.evict(SLOTS)
    tag = 50
    system = prompt(40, tag)
    first = system + prompt(9, tag + 1)
    # Turn 1: nobody holds anything. Turn 2 shares 40 tokens with it (both caches hold
    # them). Then the receiver alone holds a prefix (the sender's cache is emptied),
    # and then the sender alone (a prompt the receiver never saw, after one only
    # the sender computed).
    turns = {
        "t1": first,
        "t2": system + prompt(12, tag + 2),
        "recv-only": system + prompt(7, tag + 3),
    }
    expected_skip = {"t1": 0, "t2": 40, "recv-only": 40}
    for request_id, tokens in turns.items():
        if request_id == "recv-only":
            pair.sender.scheduler.kv.prefix_cache.evict(SLOTS)
        pair.reserve(request_id, tokens)
        assert pair.skips[request_id] == expected_skip[request_id]
        pair.send(request_id, tokens)
        pair.run_until(lambda r=request_id: pair.decoded(r) is not None)
        assert sent[request_id] == len(tokens) - expected_skip[request_id]
    # The sender holds a prefix the receiver does not: it is read from the cache.
    other = prompt(30, tag + 4) + prompt(5, tag + 5)
    pair.reserve("send-only-warm", other)
    pair.send("send-only-warm", other)
    pair.run_until(lambda: pair.decoded("send-only-warm") is not None)
    pair.receiver.scheduler.kv.prefix_cache.evict(SLOTS)
    again = other[:30] + prompt(6, tag + 6)
    pair.reserve("send-only", again)
    assert pair.skips["send-only"] == 0
    pair.send("send-only", again)
    pair.run_until(lambda: pair.decoded("send-only") is not None)
    sender_cached = [o.num_cached_tokens for o in pair.outputs["send-only"] if o.new_token_ids]
    assert sender_cached[0] >= 30 and sent["send-only"] == len(again)
    turns |= {"send-only-warm": other, "send-only": again}
    with on_device(reference):
        expected = reference.generate(list(turns.values()), GREEDY)
    for (request_id, _), want in zip(turns.items(), expected, strict=True):
        assert pair.tokens(request_id) == want, request_id
