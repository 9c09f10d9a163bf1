"""One streamed request to an OpenAI-compatible endpoint, timed chunk by chunk."""

import json
import time
from dataclasses import dataclass

import httpx

from lightpd.controlplane.lightctl.bench.record import RequestRecord

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # with or without a trailing /v1
    model: str
    endpoint: str = "completions"
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(
                f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint}"
            )

    @property
    def url(self) -> str:
        return root_url(self.base_url) + ENDPOINTS[self.endpoint]


def root_url(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class StreamClient:
    """Sends requests with ``stream: true`` and ``include_usage``, so output token
    counts are the server's own; a peer that sends no usage gets its output counted
    in chunks (marked by ``usage_reported = False``)."""

    def __init__(
        self,
        config: ClientConfig,
        max_connections: int = 10_000,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=256)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s, connect=30.0),
            limits=limits,
            headers=headers(config.api_key),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    def body(self, prompt: str | list[int] | list[dict], max_tokens: int) -> dict:
        body: dict = {
            "model": self.config.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": self.config.temperature,
        }
        if self.config.endpoint == "chat":
            body |= {"messages": prompt, "max_completion_tokens": max_tokens}
        else:
            body |= {"prompt": prompt, "max_tokens": max_tokens}
        if self.config.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def send(
        self, record: RequestRecord, prompt: str | list[int] | list[dict], max_tokens: int
    ) -> RequestRecord:
        """Fill ``record`` (its ``sent_s`` is set by the caller) with what came back;
        ``e2e_s`` is set whether it completed or failed."""
        started = time.perf_counter()
        texts: list[str] = []
        try:
            await self._stream(record, self.body(prompt, max_tokens), started, texts)
        except (httpx.HTTPError, ValueError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            # A failed request ran too: its end bounds the run's duration.
            record.e2e_s = time.perf_counter() - started
        record.output_text = "".join(texts)
        if not record.usage_reported:
            record.output_tokens = len(record.chunk_times_s)
        if not record.chunk_times_s and record.error is None:
            record.error = "the response streamed no output"
        return record

    async def _stream(
        self, record: RequestRecord, body: dict, started: float, texts: list[str]
    ) -> None:
        async with self.http.stream("POST", self.config.url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}: {_error_message(response.text)}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                now = time.perf_counter() - started
                self._read_chunk(json.loads(data), now, record, texts)
                if record.error:
                    return

    def _read_chunk(self, chunk: dict, now: float, record: RequestRecord, texts: list[str]) -> None:
        if "error" in chunk:
            record.error = f"error in stream: {_error_message(json.dumps(chunk))}"
            return
        for choice in chunk.get("choices") or []:
            if self.config.endpoint == "chat":
                text = (choice.get("delta") or {}).get("content")
            else:
                text = choice.get("text")
            # A chunk with text is output; so is the one that ends the choice, even
            # without text (its token may be invisible, e.g. a special one). The first
            # chat chunk names the role only and is sent before any token: not output.
            if text or choice.get("finish_reason"):
                record.chunk_times_s.append(now)
                texts.append(text or "")
        usage = chunk.get("usage")
        if usage:
            record.usage_reported = True
            record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
            record.output_tokens = usage.get("completion_tokens", 0)
            details = usage.get("prompt_tokens_details") or {}
            record.cached_tokens = details.get("cached_tokens") or 0


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text.strip()[:300]
