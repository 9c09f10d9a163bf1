"""Grammar-constrained decoding: compiled grammars, one matcher per request, and
the token bitmask of a step.

- ``GrammarCache`` compiles each ``GrammarSpec`` once for this engine's
  tokenizer, on a thread of its own, so a request's grammar compiles while it
  waits in the queue and prefills; the serving loop only waits for one that is
  not ready when the request is about to sample. A grammar that fails to
  compile fails its requests (``take_failed``), never the engine.
- ``RequestGrammar`` is one request's place in its grammar: it advances with
  every token the request accepts (the scheduler tells it), whoever sampled the
  token: this engine, the prefill node that sent the first token with the KV,
  or the node a resumed request was generated on before (its output tokens).
  It lives on the request, so a paused request resumes where it was.
- ``TokenBitmask`` fills a step's mask on the host, one row per constrained
  request, while the device computes the logits; one asynchronous copy takes it
  to the device, where the sampler applies it. A step without a constrained
  request does none of this.
- ``without_broken_grammars`` ends the requests whose grammar broke, wherever
  they are.

xgrammar (and the tokenizer it needs) is loaded when the first grammar comes.
"""

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from lightpd.common.engine.grammar_worker import CompileWorker, GrammarLimitError
from lightpd.common.engine.request import FinishReason, RequestOutput
from lightpd.common.wire.sampling_params import GrammarSpec

if TYPE_CHECKING:
    from lightpd.common.engine.request import Request

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 512
# Compiled grammars kept, in bytes (their token mask caches dominate); the least
# recently used go first. xgrammar's own compiler cache gets the same bound.
MAX_CACHED_GRAMMAR_BYTES = 256 << 20
# A compile runs in a worker process (grammar_worker.py), stopped past these: the
# request fails with the limit in its reason, the serving loop never waits for it.
COMPILE_BUDGET_S = 20.0
COMPILE_MEMORY_BYTES = 2 << 30


class GrammarCache:
    def __init__(self, model_dir: str, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._executor: ThreadPoolExecutor | None = None
        self._info: Any = None  # xgrammar.TokenizerInfo, built on the compile thread
        self._worker = CompileWorker(model_dir, vocab_size, self.stop_token_ids)
        # The bitmask row of tokens without a control character (bytes below 0x20).
        self.printable_tokens: torch.Tensor | None = None
        self._compiled: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._failed: dict[str, str] = {}  # request id -> why its grammar broke

    def start(
        self, request_id: str, spec: GrammarSpec, output_token_ids: Sequence[int] = ()
    ) -> "RequestGrammar":
        """The grammar state of a new request, compiling ``spec`` unless it is cached;
        ``output_token_ids`` (a resumed request's) are accepted before it samples."""
        future = self.compile(spec)
        grammar = RequestGrammar(request_id, future, self, spec.kind in JSON_KINDS)
        for token in output_token_ids:
            grammar.accept(token)
        # The callback holds the id only: a cached future keeps its callbacks.
        future.add_done_callback(lambda f: self._check(request_id, f))
        return grammar

    def _check(self, request_id: str, future: Future) -> None:
        exc = future.exception()
        if exc is not None:
            self.failed(request_id, compile_error(exc))

    def compile(self, spec: GrammarSpec) -> Future:
        """The compiled grammar of ``spec``, soon (cached by spec, the least recently
        used dropped first)."""
        future = self._compiled.get(spec)
        if future is not None:
            self._compiled.move_to_end(spec)
            return future
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        future = self._executor.submit(self._compile, spec)
        self._compiled[spec] = future
        self._trim()
        return future

    def _trim(self) -> None:
        """Drop the least recently used grammars past the count and byte bounds (a
        request holding one keeps it; a compile under way counts nothing yet)."""
        while len(self._compiled) > MAX_CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        num_bytes = sum(_size(f) for f in self._compiled.values())
        while num_bytes > MAX_CACHED_GRAMMAR_BYTES and len(self._compiled) > 1:
            _, dropped = self._compiled.popitem(last=False)
            num_bytes -= _size(dropped)

    @property
    def num_cached_bytes(self) -> int:
        return sum(_size(f) for f in self._compiled.values())

    def _compile(self, spec: GrammarSpec) -> Any:
        """On the grammar thread: the worker compiles, this process deserializes."""
        import xgrammar as xgr

        if self._info is None:
            self._info = tokenizer_info(self.model_dir, self.vocab_size, self.stop_token_ids)
            self.printable_tokens = _printable_tokens(
                self._info.decoded_vocab, self.vocab_size, self._info
            )
        compiled = self._worker.compile(spec, COMPILE_BUDGET_S, COMPILE_MEMORY_BYTES)
        return xgr.CompiledGrammar.deserialize_json(compiled, self._info)

    def failed(self, request_id: str, reason: str) -> None:
        with self._lock:
            self._failed.setdefault(request_id, reason)

    def take_failed(self) -> dict[str, str]:
        """Requests whose grammar did not compile or refused a token since the last
        call (some may have ended since), and why."""
        if not self._failed:
            return {}
        with self._lock:
            failed, self._failed = self._failed, {}
        return failed

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._worker.close()


def without_broken_grammars(
    outputs: list[RequestOutput],
    failed: dict[str, str],
    requests: dict[str, "Request"],
    drop: Callable[[str], object],
) -> list[RequestOutput]:
    """Fail the requests whose grammar broke (``GrammarCache.take_failed``): each of
    ``requests`` among them is taken out wherever it is (``drop``), forgotten, and
    ends with the reason; a token it took in ``outputs`` is not reported."""
    outputs = [o for o in outputs if o.request_id not in failed]
    for request_id, reason in failed.items():
        request = requests.get(request_id)
        if request is not None:
            drop(request_id)  # wherever it is; one that ended this step holds nothing
            requests.pop(request_id, None)
            outputs.append(RequestOutput.ending(request, FinishReason.ERROR, reason))
    return outputs


def tokenizer_info(model_dir: str, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's view of the model's vocabulary (the engine's and its worker's)."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None
    )


def _size(future: Future) -> int:
    """Bytes of a compiled grammar; 0 while it compiles or if it failed."""
    if not future.done() or future.exception() is not None:
        return 0
    return future.result().memory_size_bytes


class RequestGrammar:
    """Where one request stands in its grammar."""

    def __init__(
        self, request_id: str, compiled: Future, cache: GrammarCache, is_json: bool
    ) -> None:
        self.request_id = request_id
        self._compiled = compiled
        self._cache = cache
        self.is_json = is_json
        self._matcher: Any = None  # xgrammar.GrammarMatcher, once compiled
        self._pending: list[int] = []  # accepted before the grammar was compiled
        self.error: str | None = None

    @property
    def compiled(self) -> bool:
        """Whether the compile is over (done or failed): ``matcher`` will not wait."""
        return self._compiled.done() or self.error is not None

    def matcher(self) -> Any:
        """The matcher, past every token accepted so far; waits for the compile if it
        is still running. None if the grammar broke."""
        if self._matcher is None and self.error is None:
            try:
                compiled = self._compiled.result()
            except Exception as exc:
                self._fail(compile_error(exc))
                return None
            import xgrammar as xgr

            self._matcher = xgr.GrammarMatcher(compiled)
            pending, self._pending = self._pending, []
            for token in pending:
                self._accept(token)
        return self._matcher if self.error is None else None

    def accept(self, token: int) -> None:
        """The request took ``token``: advance (later, if the grammar is not compiled yet)."""
        if self.error is not None:
            return
        if self._matcher is None and not self._compiled.done():
            self._pending.append(token)
        elif self.matcher() is not None:
            self._accept(token)

    def _accept(self, token: int) -> None:
        if self._matcher.is_terminated():
            self._fail(f"token {token} came after the grammar was complete")
        elif not self._matcher.accept_token(token):
            self._fail(f"token {token} does not fit the grammar")

    @property
    def printable_tokens(self) -> torch.Tensor:
        return self._cache.printable_tokens

    @property
    def is_terminated(self) -> bool:
        """Whether the grammar is complete and its stop token taken: the request ends."""
        return self._matcher is not None and self._matcher.is_terminated()

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            self._cache.failed(self.request_id, reason)


class TokenBitmask:
    """The allowed tokens of each sampling row of a step, 32 to an int32."""

    def __init__(self, max_num_reqs: int, vocab_size: int, device: torch.device) -> None:
        self.max_num_reqs = max_num_reqs
        self.vocab_size = vocab_size
        self.device = device
        self._host: torch.Tensor | None = None  # allocated with the first grammar
        self._filler: Any = None

    def fill(self, requests: list["Request"]) -> torch.Tensor | None:
        """The mask of ``requests`` (all ones for unconstrained rows) on the device,
        its copy queued behind the step's compute; None if none is constrained."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return None
        import xgrammar as xgr

        if self._host is None:
            width = (self.vocab_size + 31) // 32
            pinned = self.device.type == "cuda"
            shape = (self.max_num_reqs, width)
            self._host = torch.empty(shape, dtype=torch.int32, pin_memory=pinned)
            self._filler = xgr.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))
        host = self._host[: len(requests)]
        host.fill_(-1)  # every bit set: all tokens allowed
        matchers, filled = [], []
        for i in rows:
            matcher = requests[i].grammar.matcher()
            if matcher is None:
                # Its grammar broke: the request fails after this step and its
                # token is not reported, so its row may allow nothing.
                host[i] = 0
            else:
                matchers.append(matcher)
                filled.append(i)
        if matchers:
            self._filler.batch_fill_next_token_bitmask(matchers, self._host, filled)
        json_rows = [i for i in filled if requests[i].grammar.is_json]
        if json_rows:
            # xgrammar lets a length-bounded JSON string hold raw control characters,
            # which JSON forbids (and compact JSON never needs): take them out.
            printable = requests[json_rows[0]].grammar.printable_tokens
            host[json_rows] &= printable
        return host.to(self.device, non_blocking=True)


JSON_KINDS = ("json_schema", "json_object")


def compile_error(exc: BaseException) -> str:
    from lightpd.common.grammar_build import describe_error

    if isinstance(exc, GrammarLimitError):
        return str(exc)  # it names the limit
    return f"the grammar does not compile: {describe_error(exc)}"


def _printable_tokens(decoded_vocab: list[bytes], vocab_size: int, info: Any) -> torch.Tensor:
    """A bitmask row allowing every token but those holding a byte below 0x20 (special
    tokens are kept: a stop token must stay allowed)."""
    special = set(info.special_token_ids) | set(info.stop_token_ids)
    allowed = torch.zeros(((vocab_size + 31) // 32) * 32, dtype=torch.bool)
    for token_id, text in enumerate(decoded_vocab[:vocab_size]):
        allowed[token_id] = token_id in special or not any(b < 0x20 for b in text)
    bits = allowed.view(-1, 32).long() << torch.arange(32)  # (W, 32)
    return bits.sum(dim=1).to(torch.int32)  # (W,) the high bit wraps, as packed bits do


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf, in place, on the logits' device."""
    import xgrammar as xgr

    vocab_size = min(logits.shape[-1], bitmask.shape[-1] * 32)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size)
