"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, and
vLLM's /tokenize and /detokenize."""

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lightpd.common.tokenizer import encode_chat
from lightpd.common.wire.sampling_params import GrammarSpec, SamplingParams
from lightpd.controlplane.deps import ApiKey, AppState, State
from lightpd.controlplane.dispatcher import NoCapacityError, RequestRejected
from lightpd.controlplane.errors import (
    NO_NODE_RETRY_AFTER_S,
    OpenAIError,
    error_response,
    stopping_error,
)
from lightpd.controlplane.openai.choices import Choice, Delta, StartedStream
from lightpd.controlplane.openai.emitter import Emitter, http_error
from lightpd.controlplane.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from lightpd.controlplane.openai.structured import check_tool_schemas, requested_grammar
from lightpd.controlplane.openai.tool_calls import ToolPlan, plan_tools, template_messages
from lightpd.controlplane.shutdown import EndedByShutdown, Shutdown
from lightpd.controlplane.tenancy import cache_namespace, tenant_of

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", dependencies=[ApiKey])


async def _models(state: AppState) -> list[dict]:
    """The served model, once a request can be served (clients that wait for it to
    be listed then get no 503)."""
    if not await state.fleet.servable():
        return []
    return [
        {
            "id": state.settings.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "lightpd",
            "max_model_len": await state.fleet.max_model_len(),
        }
    ]


@router.get("/models")
async def list_models(state: State) -> dict:
    return {"object": "list", "data": await _models(state)}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State) -> dict:
    model = next((m for m in await _models(state) if m["id"] == model_id), None)
    if model is None:
        message = f"The model `{_shown(model_id)}` does not exist."
        raise OpenAIError(404, message, "model", "model_not_found")
    return model


# vLLM's tokenizer endpoints, at the root as vLLM has them, behind the same API keys.
tokens_router = APIRouter(dependencies=[ApiKey])


@tokens_router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: State) -> dict:
    _check_model(body, state)
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            tokens = await asyncio.to_thread(encode_chat, state.tokenizer, messages)
        except ValueError as exc:
            raise OpenAIError(400, str(exc), "messages") from exc
    else:
        encode = state.tokenizer.encode
        add = body.add_special_tokens
        tokens = await asyncio.to_thread(lambda: encode(body.prompt, add_special_tokens=add))
    max_len = await state.fleet.max_model_len()
    return {"count": len(tokens), "max_model_len": max_len, "tokens": tokens}


@tokens_router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State) -> dict:
    _check_model(body, state)
    vocab = len(state.tokenizer)
    if any(t >= vocab for t in body.tokens):
        raise OpenAIError(400, f"token ids must be below {vocab}", "tokens")
    return {"prompt": await asyncio.to_thread(state.tokenizer.decode, body.tokens)}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: State):
    _check_model(body, state)
    if body.echo:
        raise OpenAIError(400, "echo is not supported", "echo")
    grammar = await requested_grammar(body)
    prompts = await _completion_prompts(body, state)
    return await _serve(
        request, state, body, prompts, body.max_tokens, body.logprobs, chat=False, grammar=grammar
    )


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    _check_model(body, state)
    tools = plan_tools(body, state.tokenizer.chat_template)
    if tools is not None:
        await check_tool_schemas(tools.parameters)
    grammar = await requested_grammar(body, tools and tools.grammar)
    messages = template_messages(body.messages)
    tool_list = tools and tools.tools
    try:  # off the event loop: a long conversation takes seconds to template and encode
        prompt = await asyncio.to_thread(encode_chat, state.tokenizer, messages, tool_list)
    except Exception as exc:  # a template may reject a conversation (roles out of order)
        raise OpenAIError(
            400, f"the chat template rejected the messages: {exc}", "messages"
        ) from exc
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    return await _serve(
        request, state, body, [prompt], max_tokens, top, chat=True, grammar=grammar, tools=tools
    )


def _check_model(body: SamplingFields, state: AppState) -> None:
    if body.model != state.settings.model_name:
        raise OpenAIError(
            404, f"The model `{_shown(body.model)}` does not exist.", "model", "model_not_found"
        )


def _shown(name: str, limit: int = 64) -> str:
    """A client's model name as an error quotes it: never more than ``limit`` characters."""
    return name if len(name) <= limit else f"{name[:limit]}... ({len(name)} characters)"


async def _completion_prompts(body: CompletionRequest, state: AppState) -> list[list[int]]:
    # Texts are encoded off the event loop, which must keep serving heartbeats. Threads
    # may share the fast tokenizer: encoding without truncation or padding only reads it.
    prompt = body.prompt
    if isinstance(prompt, str):
        return [await asyncio.to_thread(state.tokenizer.encode, prompt)]
    if not prompt:
        raise OpenAIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return await asyncio.to_thread(lambda: [state.tokenizer.encode(p) for p in prompt])
    return [list(p) for p in prompt]


async def _serve(
    request: Request,
    state: AppState,
    body: SamplingFields,
    prompts: list[list[int]],
    max_tokens: int | None,
    logprobs: int | None,
    chat: bool,
    grammar: GrammarSpec | None = None,
    tools: ToolPlan | None = None,
) -> JSONResponse | StreamingResponse:
    # best_of > n: more candidates, each with its token logprobs, the n best kept.
    candidates = getattr(body, "best_of", None) or body.n
    max_len = await _check_servable(state, body, candidates * len(prompts), max_tokens)
    scored = logprobs if candidates == body.n or logprobs is not None else 0
    namespace = cache_namespace(state.settings, request, body.cache_salt)
    tenant = tenant_of(state.settings, request)
    vocab = len(state.tokenizer)
    choices = []
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    for p_index, prompt in enumerate(prompts):
        room = _room(prompt, vocab, max_len, max_tokens, chat)
        for n_index in range(candidates):
            index = p_index * candidates + n_index
            params = _sampling_params(
                body, max_tokens or room, scored, n_index, grammar, namespace, tenant
            )
            choices.append(
                Choice(index, f"{response_id}-{index}", prompt, params, body.stop_strings)
            )
    shutdown: Shutdown = request.app.state.shutdown
    emitter = Emitter(
        state, shutdown, response_id, chat, body, prompts, choices,
        candidates=candidates, wants_logprobs=logprobs is not None, tools=tools,
    )  # fmt: skip
    return await _respond(request, emitter)


async def _check_servable(
    state: AppState, body: SamplingFields, num_sequences: int, max_tokens: int | None
) -> int:
    """The fleet's context length, once the request is within this server's bounds."""
    if max_tokens is not None:  # else each sequence is bounded by its context's room
        _check_budget(state, num_sequences, max_tokens)
    max_len = await state.fleet.max_model_len()
    if max_len is None:
        raise OpenAIError(
            503,
            "no node is ready to serve requests",
            headers={"Retry-After": str(NO_NODE_RETRY_AFTER_S)},
        )
    vocab = len(state.tokenizer)
    bad = next((t for t, _ in body.logit_bias_pairs if t >= vocab), None)
    if bad is not None:
        raise OpenAIError(400, f"logit_bias: token id {bad} is not below {vocab}", "logit_bias")
    return max_len


def _room(prompt: list[int], vocab: int, max_len: int, max_tokens: int | None, chat: bool) -> int:
    """How many tokens may follow the prompt in the context; a 400 if ``max_tokens``
    do not fit, or the prompt is empty, too long or has ids outside the vocabulary."""
    if not prompt:
        raise OpenAIError(400, "the prompt is empty", "prompt")
    if any(not 0 <= t < vocab for t in prompt):
        raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    room = max_len - len(prompt)
    if room < 1:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {max_len} tokens. However, you "
            f"requested {len(prompt)} tokens in the prompt, leaving no room to generate.",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > room:
        raise OpenAIError(
            400,
            f"max_tokens is too large: {max_tokens}. This model's maximum context length "
            f"is {max_len} tokens and the prompt has {len(prompt)}, so at most {room} can be "
            "generated.",
            "max_tokens",
        )
    return room


async def _respond(request: Request, emitter: Emitter) -> JSONResponse | StreamingResponse:
    if emitter.body.stream:
        # The response starts only once every choice holds decode slots, so a request
        # that cannot be served gets a plain HTTP error, never an error inside a 200.
        started = await _until_admitted(request, emitter.deltas(), emitter.choices)
        return StreamingResponse(emitter.stream(started), media_type="text/event-stream")
    task = asyncio.create_task(emitter.collect())
    while not task.done():  # a client that goes away aborts its request
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return _client_left()
    return JSONResponse(await task)


def _check_budget(state: AppState, num_sequences: int, max_tokens: int) -> None:
    """One request may not ask for more output than LIGHTPD_MAX_REQUEST_TOKENS in all:
    n (or best_of) x prompts x max_tokens, so that one client cannot fill a node."""
    budget = state.settings.max_request_tokens
    if num_sequences * max_tokens > budget:
        raise OpenAIError(
            400,
            f"the request asks for up to {num_sequences} sequences x {max_tokens} tokens = "
            f"{num_sequences * max_tokens} output tokens, over this server's limit of "
            f"{budget} (LIGHTPD_MAX_REQUEST_TOKENS): lower n, the number of prompts or "
            "max_tokens",
            "max_tokens",
        )


def _client_left() -> JSONResponse:
    # Nobody reads it; answering (rather than raising) keeps an ordinary
    # disconnect out of the error log.
    return error_response(499, "the client closed the request")


async def _until_admitted(
    request: Request, deltas: AsyncIterator[Delta], choices: list[Choice]
) -> StartedStream:
    """Wait until every choice holds decode slots. A refusal before that is raised
    as the HTTP error it is (503 with Retry-After, or 400); a client that leaves
    meanwhile is let go (closing ``deltas`` aborts its choices)."""
    admitted = asyncio.ensure_future(asyncio.gather(*(c.admitted.wait() for c in choices)))
    started = StartedStream(deltas)
    try:
        while not admitted.done() and started.pending is not None:
            done, _ = await asyncio.wait(
                {admitted, started.pending}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED
            )
            if started.pending in done:
                try:
                    delta = started.pending.result()
                except StopAsyncIteration:
                    started.pending = None
                    break
                except (NoCapacityError, RequestRejected) as exc:
                    raise http_error(exc) from exc
                except EndedByShutdown as exc:
                    raise stopping_error() from exc
                started.early.append(delta)
                started.pending = asyncio.ensure_future(anext(deltas))
            elif not done and await request.is_disconnected():
                raise OpenAIError(499, "the client closed the request")
    except BaseException:
        await started.aclose()
        raise
    finally:
        admitted.cancel()
        await asyncio.gather(admitted, return_exceptions=True)
    return started


def _sampling_params(
    body: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    n_index: int,
    grammar: GrammarSpec | None = None,
    namespace: int = 0,
    tenant: tuple[int, float] = (0, 1.0),
) -> SamplingParams:
    # The nodes need a seed so decode continues prefill's random stream; choice i of
    # a seeded request uses seed + i, so n > 1 gives different yet repeatable texts.
    seed = random.getrandbits(63) if body.seed is None else body.seed + n_index
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            min_new_tokens=min(body.min_tokens, max_tokens),
            temperature=0.0 if body.greedy else body.temperature,
            top_k=body.top_k,
            top_p=1.0 if body.greedy else body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=seed,
            logprobs=logprobs,
            stop_token_ids=tuple(body.stop_token_ids),
            ignore_eos=body.ignore_eos,
            logit_bias=body.logit_bias_pairs,
            grammar=grammar,
            cache_namespace=namespace,
            tenant=tenant[0],
            tenant_weight=tenant[1],
        )
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from exc
