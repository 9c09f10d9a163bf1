"""Request bodies of the OpenAI-compatible API (responses are built as plain dicts)."""

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lightpd.common.wire.sampling_params import MAX_GRAMMAR_CHARS

# Bounds checked before any work: numbers fit the nodes' int32 and int64 fields, and
# lists are short enough that a request costs little to check and to serve.
INT32_MAX = 2**31 - 1
MAX_N = 16
# Choice i of a seeded request samples with seed + i: leave room for every choice.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1 - MAX_N
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 4096
MAX_USER_CHARS = 256
MAX_PROMPTS = 64  # in a batch of prompts
MAX_PROMPT_TOKENS = 1 << 20  # in a prompt of token ids
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_TOOLS = 128  # as OpenAI allows
MAX_CHOICES = 1024  # guided_choice entries
MAX_CHOICE_CHARS = 4096
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # of a function or a JSON schema, as OpenAI's
MAX_MODEL_CHARS = 256  # a model name, as OpenAI's ids go
# Below these, sampling is greedy, as in vLLM: a temperature or top_p of 1e-40
# would otherwise underflow into a distribution with no token left in it.
GREEDY_TEMPERATURE = 1e-5
GREEDY_TOP_P = 1e-8
_SURROGATE = re.compile("[\ud800-\udfff]")
# OpenAI parameters we do not implement (here), with what to say; any other unknown
# field is refused too (explicit nulls, which some clients send, mean "not set").
NOT_YET = {
    "suffix": "lightpd does not implement suffix (fill-in-the-middle)",
    "tools": "tool calls are served by /v1/chat/completions",
    "tool_choice": "tool calls are served by /v1/chat/completions",
    "parallel_tool_calls": "tool calls are served by /v1/chat/completions",
    "functions": "the deprecated functions are not supported; use tools",
    "function_call": "the deprecated function_call is not supported; use tool_choice",
    "guided_decoding_backend": "lightpd has one grammar backend (xgrammar)",
    "guided_whitespace_pattern": "JSON output is always compact",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


def check_text(value: object, where: str = "") -> None:
    """Refuse text that is not Unicode: JSON may escape a lone surrogate (\\ud800), which
    no tokenizer (and no UTF-8 reply) can take."""
    if isinstance(value, str):
        if found := _SURROGATE.search(value):
            raise ValueError(
                f"{where or 'the body'} holds a lone surrogate (U+{ord(found.group()):04X}),"
                " which is not valid Unicode text"
            )
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, f"{where}.{key}" if where else str(key))


class Strict(BaseModel):
    """A request part that refuses fields it does not know, naming them (a field set
    to null is taken as not sent)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_and_name_the_unsupported(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        known = cls.model_fields
        data = {k: v for k, v in data.items() if k in known or v is not None}
        for name in data:
            if name not in known and name in NOT_YET:
                raise ValueError(f"unsupported parameter '{name}': {NOT_YET[name]}")
        return data


TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # the vocabulary is checked later
MaxTokens = Annotated[int | None, Field(ge=1, le=INT32_MAX)]


class StreamOptions(Strict):
    include_usage: bool = False


GrammarText = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]
Choice = Annotated[str, Field(max_length=MAX_CHOICE_CHARS)]
Choices = Annotated[list[Choice], Field(min_length=1, max_length=MAX_CHOICES)]


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self


class StructuredOutputs(Strict):
    """Newer vLLM's ``structured_outputs``: one constraint."""

    json_: dict[str, Any] | GrammarText | None = Field(None, alias="json")
    regex: GrammarText | None = None
    choice: Choices | None = None
    grammar: GrammarText | None = None
    json_object: bool | None = None
    structural_tag: GrammarText | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> "StructuredOutputs":
        given = [k for k, v in self if v is not None and v is not False]
        if len(given) != 1:
            raise ValueError(f"give exactly one constraint, got {len(given)}")
        return self


class TopLevel(Strict):
    """A whole request body: no text in it may be a lone surrogate."""

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: object) -> object:
        check_text(data)
        return data


class SamplingFields(TopLevel):
    """Fields both endpoints share: OpenAI's, then the usual vLLM/SGLang extras."""

    model: str = Field(max_length=MAX_MODEL_CHARS)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_USER_CHARS)
    top_k: int = Field(-1, ge=-1, le=INT32_MAX)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's structured output extras (openai/structured.py reads them).
    guided_json: dict[str, Any] | GrammarText | None = None
    guided_regex: GrammarText | None = None
    guided_choice: Choices | None = None
    guided_grammar: GrammarText | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's: shares cached prefixes only with requests of the same salt (tenancy.py).
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_USER_CHARS)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounded_biases(cls, bias: dict[str, float] | None) -> dict | None:
        if bias is None:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10) or int(key) > INT32_MAX:
                shown = key if len(key) <= 16 else f"{key[:16]}... ({len(key)} characters)"
                raise ValueError(f"keys must be token ids, got {shown!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {value} for token {key}")
        return bias

    @model_validator(mode="after")
    def _min_tokens_within_max_tokens(self) -> "SamplingFields":
        limit = getattr(self, "max_completion_tokens", None) or getattr(self, "max_tokens", None)
        if limit is not None and self.min_tokens > limit:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({limit})")
        return self

    @property
    def greedy(self) -> bool:
        """Sampling that keeps only the most likely token: temperature 0, or a
        temperature or top_p so small that it means the same."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_p < GREEDY_TOP_P

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string must be at most {MAX_STOP_CHARS} characters")
        return stop

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: MaxTokens = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    # Generate best_of candidates per prompt, return the n with the highest mean
    # token logprob (whole responses only, as OpenAI and vLLM).
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _best_of_covers_n(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of larger than n cannot be streamed")
        return self

    @field_validator("prompt")
    @classmethod
    def _bounded_prompt(
        cls, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, str):
            return prompt
        if prompt and isinstance(prompt[0], int):
            token_lists = [prompt]  # one prompt of token ids
        else:
            if len(prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in a batch, got {len(prompt)}")
            token_lists = [p for p in prompt if isinstance(p, list)]
        for ids in token_lists:
            if len(ids) > MAX_PROMPT_TOKENS:
                raise ValueError(f"a prompt must have at most {MAX_PROMPT_TOKENS} tokens")
            if any(not 0 <= t <= INT32_MAX for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {INT32_MAX}]")
        return prompt


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionDefinition(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str = Field(pattern=NAME_PATTERN)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(Strict):
    name: str = Field(max_length=64)
    arguments: str


class ToolCall(Strict):
    """A call the assistant made, as a client sends it back in the conversation."""

    id: str = Field(max_length=MAX_USER_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=MAX_USER_CHARS)
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=MAX_USER_CHARS)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: object) -> object:
        # Checked here, so that an error names what the user sent (an image part),
        # not each member of the union it failed to match.
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(
                        f"content parts of type {kind!r} are not supported: "
                        "this server takes text parts only"
                    )
        elif content is not None and not isinstance(content, str):
            raise ValueError("content must be a string or a list of text parts")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class TokenizeRequest(TopLevel):
    """vLLM's /tokenize: a prompt, or chat messages under the model's template."""

    model: str = Field(max_length=MAX_MODEL_CHARS)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_TOKENS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(TopLevel):
    model: str = Field(max_length=MAX_MODEL_CHARS)
    tokens: list[TokenId] = Field(max_length=MAX_PROMPT_TOKENS)
