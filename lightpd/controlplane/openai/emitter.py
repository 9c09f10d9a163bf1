"""OpenAI response bodies and SSE chunks from the deltas of a request's choices:
text, logprobs, tool calls, usage (with the prefix caches' cached tokens)."""

import json
import logging
import time
from collections.abc import AsyncIterator

from lightpd.controlplane.deps import AppState
from lightpd.controlplane.dispatcher import NoCapacityError, RequestRejected
from lightpd.controlplane.errors import OpenAIError, error_body, stopping_error
from lightpd.controlplane.openai.choices import Choice, Delta, StartedStream, merge
from lightpd.controlplane.openai.schemas import SamplingFields
from lightpd.controlplane.openai.tool_calls import ToolCallReader, ToolPlan
from lightpd.controlplane.shutdown import EndedByShutdown, Shutdown

logger = logging.getLogger(__name__)


def http_error(exc: Exception) -> OpenAIError:
    if isinstance(exc, NoCapacityError):
        return OpenAIError(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
    return OpenAIError(400, str(exc))


class Emitter:
    """Turns the deltas of a request's choices into OpenAI response bodies and SSE
    chunks. It runs the choices too (``deltas``), for whole and streamed responses."""

    def __init__(
        self,
        state: AppState,
        shutdown: Shutdown,
        response_id: str,
        chat: bool,
        body: SamplingFields,
        prompts: list[list[int]],
        choices: list[Choice],
        *,
        candidates: int,
        wants_logprobs: bool,
        tools: ToolPlan | None = None,
    ) -> None:
        self.state = state
        self.shutdown = shutdown
        self.id = response_id
        self.chat = chat
        self.body = body
        self.choices = choices
        self.candidates = candidates  # per prompt; more than n with best_of
        self.wants_logprobs = wants_logprobs
        self.tools = tools  # read each chat choice's output for tool calls
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.cached_tokens: dict[int, int] = {}  # by prompt
        self._readers: dict[int, ToolCallReader] = {}

    def deltas(self) -> AsyncIterator[Delta]:
        """The deltas of every choice as they come (``merge``): whole responses and
        streams alike run their choices here. Closing it aborts what still runs."""
        return merge(self.state.dispatcher, self.state.tokenizer, self.choices, self.shutdown)

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())},
        }

    def _note_cached(self, delta: Delta) -> None:
        """Prompt tokens a node took from its prefix cache, counted once per prompt
        (its choices share it: the most any of them found)."""
        if delta.num_cached_tokens:
            prompt = delta.index // self.candidates
            cached = max(self.cached_tokens.get(prompt, 0), delta.num_cached_tokens)
            self.cached_tokens[prompt] = cached

    def _envelope(self, chunk: bool) -> dict:
        kind = (
            ("chat.completion.chunk" if chunk else "chat.completion")
            if self.chat
            else ("text_completion")
        )
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.state.settings.model_name,
        }

    async def collect(self) -> dict:
        """The whole response body, once every choice has ended."""
        texts = {c.index: "" for c in self.choices}
        logprobs = {c.index: [] for c in self.choices}
        reasons: dict[int, str] = {}
        deltas = self.deltas()
        try:
            async for delta in deltas:
                if delta.error is not None:
                    raise OpenAIError(502, f"generation failed: {delta.error}")
                texts[delta.index] += delta.text
                logprobs[delta.index] += delta.logprobs
                self.completion_tokens += len(delta.token_ids)
                self._note_cached(delta)
                if delta.finish_reason:
                    reasons[delta.index] = delta.finish_reason
        except (NoCapacityError, RequestRejected) as exc:
            raise http_error(exc) from exc
        except EndedByShutdown as exc:
            raise stopping_error() from exc
        finally:
            await deltas.aclose()
        out = []
        for index, c in self._best(logprobs):
            entry = {
                "index": index,
                "finish_reason": reasons.get(c.index, "abort"),
                "logprobs": self._logprobs(logprobs[c.index]) if self.wants_logprobs else None,
            }
            if self.chat and self.tools is not None:
                message = self.tools.reader().message(texts[c.index], entry["finish_reason"])
                entry["message"], entry["finish_reason"] = message
            elif self.chat:
                entry["message"] = {"role": "assistant", "content": texts[c.index]}
            else:
                entry["text"] = texts[c.index]
            out.append(entry)
        return {**self._envelope(False), "choices": out, "usage": self.usage()}

    def _best(self, logprobs: dict[int, list]) -> list[tuple[int, Choice]]:
        """The choices to return with their indices: all of them, or with best_of the
        n of each prompt's candidates with the highest mean token logprob."""
        n, choices = self.body.n, self.choices
        if self.candidates == n:
            return [(c.index, c) for c in choices]

        def mean_logprob(c: Choice) -> float:
            values = [e.logprob for e in logprobs[c.index]]
            return sum(values) / len(values) if values else float("-inf")

        kept = []
        for first in range(0, len(choices), self.candidates):
            group = choices[first : first + self.candidates]
            best = sorted(group, key=mean_logprob, reverse=True)[:n]
            base = first // self.candidates * n
            kept += [(base + rank, c) for rank, c in enumerate(best)]
        return kept

    async def stream(self, deltas: StartedStream) -> AsyncIterator[str]:
        """SSE events of ``deltas`` (this emitter's, once admitted) up to ``data:
        [DONE]``, which always comes: whatever ends the deltas early (no node for a
        retry, the end of a shutdown's grace, a bug) is told in an error event before
        it. Each event goes out whole."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        held_logprobs: dict[int, list] = {}  # of tokens whose text is not out yet
        try:
            if self.chat:  # the first chunk of each choice names the role
                for c in self.choices:
                    yield self._sse(self._chunk(self._role_entry(c.index), include_usage))
            async for delta in deltas:
                held = held_logprobs.setdefault(delta.index, [])
                for event in self._events(delta, held, include_usage):
                    yield event
        except (NoCapacityError, RequestRejected) as exc:  # a retry found no node
            yield self._error_event(http_error(exc))
        except EndedByShutdown:
            yield self._error_event(stopping_error())
        except Exception:
            logger.exception("stream %s failed", self.id)
            yield self._error_event(OpenAIError(500, "internal error in the control plane"))
        finally:
            await deltas.aclose()
        if include_usage:
            yield self._sse({**self._envelope(True), "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"

    @staticmethod
    def _role_entry(index: int) -> dict:
        return {
            "index": index,
            "logprobs": None,
            "finish_reason": None,
            "delta": {"role": "assistant", "content": ""},
        }

    def _events(self, delta: Delta, held: list, include_usage: bool) -> list[str]:
        """The SSE events of one delta. Its logprobs wait in ``held`` until text goes out."""
        self.completion_tokens += len(delta.token_ids)
        self._note_cached(delta)
        if delta.error is not None:
            return [self._sse(error_body(502, f"generation failed: {delta.error}"))]
        held += delta.logprobs
        if not delta.text and not delta.finish_reason:
            return []  # a partial character or a held-back stop prefix: wait
        if self.chat and self.tools is not None:
            return self._tool_chunks(delta, held, include_usage)
        lp = self._logprobs(held) if self.wants_logprobs else None
        held.clear()
        entry = {"index": delta.index, "logprobs": lp, "finish_reason": delta.finish_reason}
        if self.chat:
            entry["delta"] = {"content": delta.text} if delta.text else {}
        else:
            entry["text"] = delta.text
        return [self._sse(self._chunk(entry, include_usage))]

    def _tool_chunks(self, delta: Delta, held: list, include_usage: bool) -> list[str]:
        """Chunks of a choice read for tool calls; the held logprobs go with the first."""
        reader = self._readers.setdefault(delta.index, self.tools.reader())
        chunks = []
        for part, reason in reader.feed(delta.text, delta.finish_reason):
            lp = self._logprobs(held) if self.wants_logprobs and held else None
            held.clear()
            entry = {"index": delta.index, "logprobs": lp, "finish_reason": reason, "delta": part}
            chunks.append(self._sse(self._chunk(entry, include_usage)))
        return chunks

    def _chunk(self, entry: dict, include_usage: bool) -> dict:
        chunk = {**self._envelope(True), "choices": [entry]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    @staticmethod
    def _sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    @classmethod
    def _error_event(cls, error: OpenAIError) -> str:
        return cls._sse(error_body(error.status, error.message, error.param, error.code))

    def _logprobs(self, entries) -> dict:
        decode = self.state.tokenizer.decode

        def token(token_id: int) -> str:
            return decode([token_id])

        if self.chat:
            return {
                "content": [
                    {
                        "token": token(e.token_id),
                        "logprob": e.logprob,
                        "bytes": list(token(e.token_id).encode()),
                        "top_logprobs": [
                            {"token": token(t), "logprob": v, "bytes": list(token(t).encode())}
                            for t, v in e.top
                        ],
                    }
                    for e in entries
                ]
            }
        offsets, position = [], 0
        for e in entries:
            offsets.append(position)
            position += len(token(e.token_id))
        return {
            "tokens": [token(e.token_id) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token(t): v for t, v in e.top} for e in entries],
            "text_offset": offsets,
        }
