"""The official openai client against a real fleet; outputs equal the in-process engine's."""

import asyncio
import subprocess
import sys
import time

import httpx
import openai
import pytest

from lightpd.common.engine import EngineConfig, LLMEngine
from lightpd.common.tokenizer import encode_chat, load_tokenizer
from lightpd.common.wire.sampling_params import SamplingParams
from lightpd.controlplane.lightctl.embedded_redis import free_port
from tests.e2e.fleet import API_KEY, LocalFleet

MODEL_NAME = "tiny"


# The fleet runs over both KV transports: ZeroMQ frames, and a torch.distributed
# group per node pair ("nccl": NCCL between GPUs, Gloo here on the CPU).
@pytest.fixture(scope="module", params=("zmq", "nccl"))
def fleet(tmp_path_factory, request):
    from lightpd.common.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path_factory.mktemp("m") / MODEL_NAME, "qwen2")
    node_args = (*LocalFleet.node_args, "--kv-transport", request.param)
    running = LocalFleet(str(model), node_args=node_args).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def engine(fleet):
    return LLMEngine(EngineConfig(model=fleet.model, device="cpu", num_kv_slots=4096))


def engine_text(fleet, engine, prompt_ids, params) -> tuple[str, list[int]]:
    tokens = engine.generate([prompt_ids], params)[0]
    tokenizer = load_tokenizer(fleet.model)
    return tokenizer.decode(tokens, skip_special_tokens=True), tokens


MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox."}]


def test_chat_and_completion_equal_the_in_process_engine(fleet, client, engine):
    tokenizer = load_tokenizer(fleet.model)
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0
    )
    want, tokens = engine_text(
        fleet,
        engine,
        encode_chat(tokenizer, MESSAGES),
        SamplingParams(temperature=0, max_new_tokens=20),
    )
    assert chat.choices[0].message.content == want
    assert chat.usage.completion_tokens == len(tokens)
    assert chat.usage.prompt_tokens == len(encode_chat(tokenizer, MESSAGES))

    completion = client.completions.create(
        model=MODEL_NAME, prompt="Hello world", max_tokens=12, temperature=0.8, seed=7
    )
    want, tokens = engine_text(
        fleet,
        engine,
        tokenizer.encode("Hello world"),
        SamplingParams(temperature=0.8, seed=7, max_new_tokens=12),
    )
    assert completion.choices[0].text == want
    assert completion.usage.completion_tokens == len(tokens)

    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_n_seeds_logprobs_and_stop_strings(fleet, client):
    kwargs = dict(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=16,
        temperature=1.0,
        seed=42,
        n=2,
        logprobs=True,
        top_logprobs=3,
    )
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    for choice in first.choices:
        entries = choice.logprobs.content
        assert entries and all(len(e.top_logprobs) == 3 for e in entries)
        assert all(e.logprob <= 0 and e.top_logprobs[0].logprob >= e.logprob for e in entries)

    completion = client.completions.create(
        model=MODEL_NAME, prompt="The quick", max_tokens=8, temperature=0, logprobs=2, stream=True
    )
    chunks = list(completion)
    tops = [top for c in chunks for top in (c.choices[0].logprobs.top_logprobs or [])]
    assert len(tops) == 8
    # Keyed by token text, as OpenAI does: two ids that decode alike share one key.
    assert all(1 <= len(top) <= 2 for top in tops)

    full = (
        client.completions.create(
            model=MODEL_NAME, prompt="The quick", max_tokens=24, temperature=0
        )
        .choices[0]
        .text
    )
    stop = full[5:8]
    assert len(stop) == 3
    cut = client.completions.create(
        model=MODEL_NAME,
        prompt="The quick",
        max_tokens=24,
        temperature=0,
        stop=[stop, "never-there"],
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]
    streamed = client.completions.create(
        model=MODEL_NAME, prompt="The quick", max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_64_concurrent_streaming_chats_all_finish(fleet):
    async def one(client, i: int) -> tuple[int, int]:
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": f"Request number {i}"}],
            max_tokens=4 + i % 13,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens, 4 + i % 13

    async def main():
        client = openai.AsyncOpenAI(
            base_url=f"{fleet.url}/v1", api_key=API_KEY, max_retries=0, timeout=120
        )
        return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), 240)

    results = asyncio.run(main())
    assert all(got == want for got, want in results)


BAD_INPUTS = [
    ("malformed JSON", {"content": b"{not json"}, 400, None),
    ("negative max_tokens", {"json": {"messages": MESSAGES, "max_tokens": -1}}, 400, "max_tokens"),
    ("huge max_tokens", {"json": {"messages": MESSAGES, "max_tokens": 10**7}}, 400, "max_tokens"),
    ("n=0", {"json": {"messages": MESSAGES, "n": 0}}, 400, "n"),
    ("unknown model", {"json": {"messages": MESSAGES, "model": "gpt-9"}}, 404, "model"),
    (
        "too-long prompt",
        {"json": {"messages": [{"role": "user", "content": "fox " * 3000}]}},
        400,
        "messages",
    ),
    ("wrong key", {"json": {"messages": MESSAGES}, "key": "sk-wrong"}, 401, None),
    ("wrong content type", {"content": b"messages=hi", "type": "text/plain"}, 415, None),
    ("top_p out of range", {"json": {"messages": MESSAGES, "top_p": 3}}, 400, "top_p"),
]


@pytest.mark.parametrize(
    ("case", "request_", "status", "param"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_inputs_get_openai_errors_and_the_fleet_keeps_serving(
    fleet, client, case, request_, status, param
):
    headers = {
        "Authorization": f"Bearer {request_.get('key', API_KEY)}",
        "Content-Type": request_.get("type", "application/json"),
    }
    body = request_.get("json")
    if body is not None:
        body = {"model": MODEL_NAME, **body}
    reply = httpx.post(
        f"{fleet.url}/v1/chat/completions",
        headers=headers,
        timeout=30,
        json=body,
        content=request_.get("content"),
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param or param in error["message"]
    ok = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=3)
    assert ok.usage.completion_tokens >= 1


def test_client_disconnect_aborts_the_request_on_its_nodes(fleet):
    body = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", f"{fleet.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as reply:
        for i, _ in enumerate(reply.iter_lines()):
            if i > 6:
                break  # leave mid-stream
    deadline = time.monotonic() + 20
    while True:
        latest = fleet.admin("GET", "/admin/requests?limit=1").json()[0]
        nodes = fleet.admin("GET", "/admin/nodes").json()
        idle = all(n["stats"]["num_free_slots"] == n["num_slots"] for n in nodes if n["stats"])
        if latest["state"] == "aborted" and idle:
            break
        assert time.monotonic() < deadline, (latest, nodes)
        time.sleep(0.2)
    assert int(latest["output_tokens"]) < 400


def test_admin_api_metrics_and_a_second_control_plane(fleet, client):
    client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4)
    assert httpx.get(f"{fleet.url}/admin/nodes", timeout=10).status_code == 401
    stats = fleet.admin("GET", "/admin/stats").json()
    assert stats["roles"]["decode"]["ready"] == 1 and stats["roles"]["prefill"]["ready"] == 1
    recent = fleet.admin("GET", "/admin/requests?limit=5").json()
    assert recent[0]["state"] in ("finished", "decoding", "transferring", "prefilling")
    assert {"prefill_node", "decode_node", "timeline"} <= recent[-1].keys()
    key = fleet.admin("POST", "/admin/api-keys").json()["api_key"]
    keyed = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=key, max_retries=0)
    assert keyed.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert fleet.admin("DELETE", f"/admin/api-keys/{key}").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        keyed.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    metrics = httpx.get(f"{fleet.url}/metrics", timeout=10).text
    for name in (
        "lightpd_requests_total",
        "lightpd_time_to_first_token_seconds_bucket",
        "lightpd_time_per_output_token_seconds_bucket",
        "lightpd_prompt_tokens_total",
        "lightpd_generation_tokens_total",
        "lightpd_node_free_slots{",
    ):
        assert name in metrics, name

    # Another control plane on the same Redis serves the same fleet.
    port = free_port()
    second = subprocess.Popen(
        [sys.executable, "-m", "lightpd.controlplane"], env={**fleet.env, "LIGHTPD_PORT": str(port)}
    )
    try:
        other = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=5
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = other.chat.completions.create(
                    model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0
                )
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        same = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0
        )
        assert reply.choices[0].message.content == same.choices[0].message.content
    finally:
        second.terminate()
        second.wait(timeout=15)


@pytest.mark.parametrize(
    "extra, named, says",
    [
        ({"suffix": "tail"}, "suffix", "fill-in-the-middle"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "chat/completions"),
        ({"frobnicate": 1}, "frobnicate", "does not implement it"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is given"),
        ({"best_of": 2, "n": 3}, "best_of", "at least n"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias", "not below"),
    ],
)
def test_parameters_we_do_not_implement_are_refused_by_name(fleet, extra, named, says):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, **extra}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.post(f"{fleet.url}/v1/completions", json=body, headers=headers, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert named in (error["param"] or "") or named in error["message"]
    assert says in error["message"], error


def test_image_parts_and_nulls_get_what_a_user_expects(fleet, client):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}, image]}],
            max_tokens=2,
        )
    message = refused.value.body["message"]
    assert "'image_url'" in message and "messages.0.content" in message
    assert ".str" not in message  # the field the user sent, not the union's members
    # Clients that send explicit nulls for what they do not use are served.
    body = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 2,
        "tools": None,
        "functions": None,
        "logit_bias": None,
        "response_format": {"type": "text"},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.post(f"{fleet.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text


def test_logit_bias_and_best_of(fleet, client):
    tokenizer = load_tokenizer(fleet.model)
    forced = tokenizer.encode("fox")[-1]
    biased = client.completions.create(
        model=MODEL_NAME,
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert biased.choices[0].text == tokenizer.decode([forced] * 4)
    # best_of: the candidate with the highest mean token logprob among best_of seeded
    # samples (candidate i samples with seed + i, like choice i of n).
    common = dict(model=MODEL_NAME, prompt="Once upon", max_tokens=6, temperature=1.0, seed=11)
    best = client.completions.create(**common, n=1, best_of=3)
    every = client.completions.create(**common, n=3, logprobs=0)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices]
    assert best.choices[0].text == every.choices[means.index(max(means))].text
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all 3 ran


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of ``name`` whose labels include ``labels`` (0 if none)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        have = dict(part.split("=", 1) for part in line[len(name) + 1 : line.index("}")].split(","))
        if all(have.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_models_tokenize_detokenize_version_and_readiness(fleet, client):
    tokenizer = load_tokenizer(fleet.model)
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    text = "The quick brown fox"
    reply = httpx.post(
        f"{fleet.url}/tokenize", json={"model": MODEL_NAME, "prompt": text}, headers=headers
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["tokens"] == tokenizer.encode(text)
    assert reply.json()["count"] == len(tokenizer.encode(text))
    chat = httpx.post(
        f"{fleet.url}/tokenize", json={"model": MODEL_NAME, "messages": MESSAGES}, headers=headers
    ).json()
    assert chat["tokens"] == encode_chat(tokenizer, MESSAGES)
    back = httpx.post(
        f"{fleet.url}/detokenize",
        json={"model": MODEL_NAME, "tokens": tokenizer.encode(text, add_special_tokens=False)},
        headers=headers,
    )
    assert back.json()["prompt"] == text
    assert (
        httpx.post(f"{fleet.url}/tokenize", json={"model": MODEL_NAME, "prompt": "x"}).status_code
        == 401
    )
    assert httpx.get(f"{fleet.url}/version").json()["version"]
    ready = httpx.get(f"{fleet.url}/ready")
    assert ready.status_code == 200 and ready.json()["decode_nodes"] == 1


def test_stop_string_endings_count_as_finished_and_vllm_metric_families(fleet, client):
    common = dict(model=MODEL_NAME, prompt="Once upon a time", temperature=0, max_tokens=12)
    full = client.completions.create(**common).choices[0].text
    assert len(full) > 4
    before = httpx.get(f"{fleet.url}/metrics", timeout=10).text
    stopped = client.completions.create(**common, stop=[full[2:4]])
    assert stopped.choices[0].finish_reason == "stop"
    after = httpx.get(f"{fleet.url}/metrics", timeout=10).text
    labels = {"model_name": MODEL_NAME}
    stop = "lightpd_request_success_total"
    assert metric(after, stop, finished_reason="stop", **labels) == (
        metric(before, stop, finished_reason="stop", **labels) + 1
    )
    aborted = "lightpd_requests_total"
    assert metric(after, aborted, status="aborted", **labels) == metric(
        before, aborted, status="aborted", **labels
    )
    for name in (
        "lightpd_num_requests_running",
        "lightpd_num_requests_waiting",
        "lightpd_kv_cache_usage_perc",
        "lightpd_num_preemptions_total",
        "lightpd_request_queue_time_seconds_bucket",
        "lightpd_request_prefill_time_seconds_bucket",
        "lightpd_request_decode_time_seconds_bucket",
        "lightpd_request_inference_time_seconds_bucket",
        "lightpd_time_to_first_token_seconds_bucket",
        "lightpd_e2e_request_latency_seconds_bucket",
        "lightpd_request_prompt_tokens_bucket",
        "lightpd_request_generation_tokens_bucket",
    ):
        assert f'{name}{{model_name="{MODEL_NAME}"' in after or f"{name}{{" in after, name
        assert MODEL_NAME in next(line for line in after.splitlines() if line.startswith(name))


def test_a_vanishing_temperature_or_top_p_samples_greedily(fleet, client):
    """temperature 1e-40 or top_p 1e-300 keep only the most likely token, as in vLLM:
    the text is the greedy one, never a stream of token 0 (issue 25)."""

    def text(**sampling) -> str:
        reply = client.completions.create(
            model=MODEL_NAME, prompt="The quick brown fox", max_tokens=12, seed=3, **sampling
        )
        return reply.choices[0].text

    greedy = text(temperature=0)
    assert greedy.strip()
    assert text(temperature=1e-40) == greedy
    assert text(temperature=1.0, top_p=1e-300) == greedy
