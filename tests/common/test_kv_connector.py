"""The KV connector conformance suite: what any transport must do.

Two engines in this process, a sender (prefill role) and a receiver (decode
role), each with its own connector of the transport under test. Every test ends
with both pools back to their initial free slots. A new transport joins by
adding a factory to ``TRANSPORTS``.
"""

import contextlib
import time
from collections.abc import Callable

import pytest
import torch
import zmq

from lightpd.common.engine import EngineConfig, FinishReason, LLMEngine
from lightpd.common.engine.connector import KVConnector, KVRecvSpec, KVSendSpec, LayerChunk
from lightpd.common.engine.connector.collective import CollectiveConnector
from lightpd.common.engine.connector.zeromq import ZmqConnector
from lightpd.common.engine.kv_transfer import kv_layout
from lightpd.common.wire.auth import FleetKeys
from lightpd.common.wire.messages import KVLayout
from lightpd.common.wire.sampling_params import SamplingParams
from tests.conftest import DEVICE

SLOTS = 2048
KEYS = FleetKeys.from_token("conformance")
SECRET = "s" * 32
GREEDY = SamplingParams(temperature=0, max_new_tokens=6, seed=1)


def connector_of(kind: type[ZmqConnector]):
    """A factory of ``kind`` connectors for an engine (receiving ones bind on loopback)."""

    def make(engine: LLMEngine, layout: KVLayout, receives: bool) -> KVConnector:
        return kind(
            layout,
            engine.pool,
            KEYS,
            zmq.Context.instance(),
            bind_host="127.0.0.1" if receives else None,
            max_tokens=engine.max_model_len,
        )

    return make


# "collective": NCCL between GPUs, Gloo on CPU.
TRANSPORTS: dict[str, Callable[[LLMEngine, KVLayout, bool], KVConnector]] = {
    "zmq": connector_of(ZmqConnector),
    "collective": connector_of(CollectiveConnector),
}


def on_device(engine: LLMEngine):
    """Kernels launch on the current CUDA device: make it the engine's (a node process
    has one device; this test holds two engines, on two GPUs where there are)."""
    device = engine.runner.device
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def layout_of(engine: LLMEngine) -> KVLayout:
    return kv_layout(engine.config.model, engine.model_config, engine.runner.dtype)


def devices() -> tuple[str, str]:
    """Sender's and receiver's devices: both on DEVICE. (Two engines on two GPUs in
    one process trip Triton's launcher; NCCL across two GPUs is measured between
    real node processes by bench/pd_ttft.py.)"""
    return DEVICE, DEVICE


def make_engines(model: str, cache: bool) -> tuple[LLMEngine, LLMEngine, LLMEngine]:
    """A sender, a receiver and an in-process reference."""

    def engine(device: str, max_prefill_tokens: int) -> LLMEngine:
        config = EngineConfig(
            model=model,
            device=device,
            num_kv_slots=SLOTS,
            max_prefill_tokens=max_prefill_tokens,
            enable_prefix_cache=cache,
        )
        cuda = device.startswith("cuda")
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():
            return LLMEngine(config)

    sender, receiver = devices()
    # The sender computes prompts in chunks of 16 tokens, so long prompts take steps.
    return engine(sender, 16), engine(receiver, 512), engine(receiver, 512)


@pytest.fixture(scope="module")
def engines(tiny_model):
    # The transport's own behaviour: no prefix cache, so every prompt moves whole.
    engines = make_engines(tiny_model("llama"), cache=False)
    yield engines
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def cached_engines(tiny_model):
    engines = make_engines(tiny_model("llama"), cache=True)
    yield engines
    for engine in engines:
        engine.close()


class Pair:
    def __init__(self, sender: LLMEngine, receiver: LLMEngine, make) -> None:
        self.sender, self.receiver = sender, receiver
        self.layout = layout_of(sender)
        sender.attach(make(sender, self.layout, False))
        receiver.attach(make(receiver, layout_of(receiver), True))
        self.outputs: dict[str, list] = {}  # both engines'
        self.received: dict[str, list[int]] = {}  # tokens the receiver emitted
        self.skips: dict[str, int] = {}  # prompt tokens each reservation holds already

    @property
    def endpoint(self) -> str:
        return self.receiver.connector.endpoint

    def reserve(self, request_id: str, prompt: list[int], timeout_s: float = 10.0) -> None:
        spec = KVRecvSpec(SECRET, timeout_s)
        self.receiver.reserve(request_id, prompt, GREEDY, spec)
        self.receiver.admit_reservations()
        assert request_id in self.receiver.pop_admitted()
        # As a decode node's Reserved says: the prefix its cache holds is not sent.
        self.skips[request_id] = self.receiver.cached_prefix(request_id)

    def spec(
        self, endpoint: str | None = None, timeout_s: float = 2.0, skip_tokens: int = 0
    ) -> KVSendSpec:
        """Where the sender sends, over what the receiver takes tensors over."""
        transport = self.receiver.connector.transport
        return KVSendSpec(endpoint or self.endpoint, SECRET, timeout_s, transport, skip_tokens)

    def send(self, request_id: str, prompt: list[int], endpoint: str | None = None) -> None:
        spec = self.spec(endpoint, skip_tokens=self.skips.get(request_id, 0))
        self.sender.add_request(request_id, prompt, GREEDY, spec)

    def step(self) -> None:
        for engine in (self.sender, self.receiver):
            with on_device(engine):
                outputs = engine.step()
            for output in outputs:
                self.outputs.setdefault(output.request_id, []).append(output)
                if engine is self.receiver:
                    self.received.setdefault(output.request_id, []).extend(output.new_token_ids)

    def run_until(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"not done in time: {self.outputs}"
            self.step()
            time.sleep(0.001)

    def ended(self, request_id: str) -> bool:
        return any(o.finished for o in self.outputs.get(request_id, []))

    def decoded(self, request_id: str):
        """The receiver's final output of ``request_id``, if it has ended there."""
        ends = [o for o in self.outputs.get(request_id, []) if o.finished and o.new_token_ids]
        return ends[0] if ends else None

    def tokens(self, request_id: str) -> list[int]:
        return self.received.get(request_id, [])

    def final(self, request_id: str):
        return next(o for o in self.outputs[request_id] if o.finished)

    def settle(self) -> None:
        """Step until both pools hold nothing, then close the connectors."""
        self.run_until(
            lambda: all(e.num_available_slots == SLOTS for e in (self.sender, self.receiver))
        )
        for engine in (self.sender, self.receiver):
            assert not engine.has_unfinished()
            engine.connector.close()
            engine.attach(None)


def pair_of(transport: str, engines: tuple[LLMEngine, LLMEngine, LLMEngine]):
    sender, receiver, _ = engines
    same_gpu = sender.pool.device == receiver.pool.device and sender.pool.device.type == "cuda"
    if transport == "collective" and same_gpu:
        pytest.skip("NCCL needs the two ranks on two GPUs")
    pair = Pair(sender, receiver, TRANSPORTS[transport])
    yield pair
    pair.settle()  # every test leaves both pools exactly as it found them


@pytest.fixture(params=sorted(TRANSPORTS))
def pair(request, engines):
    yield from pair_of(request.param, engines)


@pytest.fixture(params=sorted(TRANSPORTS))
def cached_pair(request, cached_engines):
    yield from pair_of(request.param, cached_engines)


def prompt(n: int, offset: int = 0) -> list[int]:
    return [3 + (i * 7 + offset) % 390 for i in range(n)]


def test_whole_and_chunked_prompts_decode_as_in_process(pair, engines):
    reference = engines[2]
    prompts = {"short": prompt(5), "chunked": prompt(100, 1), "exact": prompt(16, 2)}
    for request_id, tokens in prompts.items():
        pair.reserve(request_id, tokens)
        pair.send(request_id, tokens)
    pair.run_until(lambda: all(pair.decoded(r) for r in prompts))
    with on_device(reference):
        expected = reference.generate(list(prompts.values()), GREEDY)
    for (request_id, _), want in zip(prompts.items(), expected, strict=True):
        assert pair.tokens(request_id) == want
        assert pair.decoded(request_id).finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    # The sender learns of each hand-off, and holds nothing after.
    for request_id in prompts:
        reasons = [o.finish_reason for o in pair.outputs[request_id]]
        assert FinishReason.HANDED_OFF in reasons


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
    intruder = TRANSPORTS["zmq"](pair.sender, pair.layout, False)
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


class socket_nobody_reads:
    """An endpoint of a fleet member that never answers."""

    def __enter__(self) -> str:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        KEYS.serve(self.sock)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.sock.close(linger=0)


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
