"""Two engines in this process joined by KV connectors: a sender (prefill role) and
a receiver (decode role), each with a connector of a transport named as in
``lightpd.common.kv_transports``, and an in-process reference engine."""

import contextlib
import time
from collections.abc import Callable

import pytest
import torch
import zmq

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.engine.connector import KVConnector, KVRecvSpec, KVSendSpec, make_connector
from lightpd.common.engine.kv_transfer import kv_layout
from lightpd.common.wire.auth import FleetKeys
from lightpd.common.wire.messages import KVLayout
from lightpd.common.wire.sampling_params import SamplingParams
from tests.conftest import DEVICE

SLOTS = 2048
KEYS = FleetKeys.from_token("conformance")
SECRET = "s" * 32
GREEDY = SamplingParams(temperature=0, max_new_tokens=6, seed=1)


def connector(transport: str, engine: LLMEngine, layout: KVLayout, receives: bool) -> KVConnector:
    """A ``transport`` connector for ``engine`` (a receiving one binds on loopback)."""
    return make_connector(
        transport,
        layout,
        engine.pool,
        KEYS,
        zmq.Context.instance(),
        bind_host="127.0.0.1" if receives else None,
        max_tokens=engine.max_model_len,
    )


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


class Pair:
    def __init__(
        self, sender: LLMEngine, receiver: LLMEngine, sends_over: str, receives_over: str
    ) -> None:
        self.sender, self.receiver = sender, receiver
        self.layout = layout_of(sender)
        sender.attach(connector(sends_over, sender, self.layout, False))
        receiver.attach(connector(receives_over, receiver, layout_of(receiver), True))
        self.outputs: dict[str, list] = {}  # both engines'
        self.received: dict[str, list[int]] = {}  # tokens the receiver emitted
        self.skips: dict[str, int] = {}  # prompt tokens each reservation holds already

    @property
    def endpoint(self) -> str:
        return self.receiver.connector.endpoint

    def reserve(self, request_id: str, prompt: list[int], timeout_s: float = 10.0) -> None:
        spec = KVRecvSpec(SECRET, timeout_s)
        self.receiver.reserve(request_id, prompt, GREEDY, spec)
        self.receiver.scheduler.admit_waiting_reservations()
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


def pair_of(sends_over: str, receives_over: str, engines: tuple[LLMEngine, LLMEngine, LLMEngine]):
    """A fixture's pair, left with both pools exactly as it found them."""
    sender, receiver, _ = engines
    same_gpu = sender.pool.device == receiver.pool.device and sender.pool.device.type == "cuda"
    if sends_over == receives_over == "nccl" and same_gpu:
        pytest.skip("NCCL needs the two ranks on two GPUs")
    pair = Pair(sender, receiver, sends_over, receives_over)
    yield pair
    pair.settle()


def prompt(n: int, offset: int = 0) -> list[int]:
    return [3 + (i * 7 + offset) % 390 for i in range(n)]


def decode_as_in_process(pair: Pair, reference: LLMEngine, prompts: dict[str, list[int]]) -> None:
    """Hand ``prompts`` off through ``pair``: the receiver's tokens are the reference's."""
    for request_id, tokens in prompts.items():
        pair.reserve(request_id, tokens)
        pair.send(request_id, tokens)
    pair.run_until(lambda: all(pair.decoded(r) for r in prompts))
    with on_device(reference):
        expected = reference.generate(list(prompts.values()), GREEDY)
    for (request_id, _), want in zip(prompts.items(), expected, strict=True):
        assert pair.tokens(request_id) == want, request_id


class socket_nobody_reads:
    """An endpoint of a fleet member that never answers."""

    def __enter__(self) -> str:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        KEYS.serve(self.sock)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.sock.close(linger=0)
