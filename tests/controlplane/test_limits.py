"""Limits on what one request may ask: body size, field bounds, odd tokens (issue 11).

None of these needs a node: every refusal comes before the request is dispatched.
"""

import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from lightpd.controlplane.app import create_app
from lightpd.controlplane.openai import routes
from lightpd.controlplane.settings import Settings

API_KEY = "sk-test-key"
ADMIN = "admin-secret-token"
CLUSTER = "cluster-token"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMIT = 4 * 1024 * 1024  # the default of LIGHTPD_MAX_BODY_BYTES


@pytest.fixture
def client(redis_url, tiny_model):
    settings = Settings(
        model=tiny_model("llama"),
        redis_url=redis_url,
        admin_token=ADMIN,
        cluster_token=CLUSTER,
        api_keys=API_KEY,
    )
    assert settings.max_body_bytes == LIMIT
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        client.model_name = Path(settings.model).name
        yield client


def error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    return reply.json()["error"]


def test_a_body_declared_over_the_limit_is_refused_with_413(client):
    body = b'{"prompt": "' + b"x" * LIMIT + b'"}'
    reply = client.post(
        "/v1/completions",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    err = error(reply, 413)
    assert str(LIMIT) in err["message"]
    assert err["type"] == "invalid_request_error"


def test_a_chunked_body_is_refused_once_it_passes_the_limit(client):
    chunk = b"x" * (1024 * 1024)
    num_sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal num_sent
        for _ in range(10):
            num_sent += 1
            yield chunk

    async def post() -> httpx.Response:
        # httpx's ASGI transport hands the body over chunk by chunk, with no
        # Content-Length; it runs on the app's own loop, where its Redis client lives.
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await c.post(
                "/v1/completions",
                content=chunks(),
                headers={**AUTH, "Content-Type": "application/json"},
            )

    reply = client.portal.call(post)
    assert "content-length" not in reply.request.headers
    assert str(LIMIT) in error(reply, 413)["message"]
    # Refused at the chunk that passed 4 MiB, not after the whole 10 MiB arrived.
    assert num_sent == 5


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("seed", 10**30, "seed"),
        ("seed", 2**63 - 1, "seed"),  # seed + choice index must still fit in int64
        ("top_k", 10**30, "top_k"),
        ("min_tokens", 10**30, "min_tokens"),
        ("max_tokens", 10**30, "max_tokens"),
        ("stop_token_ids", [10**30], "stop_token_ids.0"),
        ("stop_token_ids", list(range(65)), "stop_token_ids"),
        ("stop", [f"stop{i}" for i in range(17)], "stop"),
        ("stop", "x" * 300, "stop"),
        ("stop", ["ok", "x" * 300], "stop"),
        ("user", "u" * 300, "user"),
        ("prompt", [10**30], "prompt"),
        ("prompt", [[1, 2], [3, 10**30]], "prompt"),
        ("prompt", ["hi"] * 65, "prompt"),
    ],
)
def test_completion_fields_out_of_bounds_are_refused_with_400(client, field, value, param):
    body = {"model": client.model_name, "prompt": "hi", field: value}
    err = error(client.post("/v1/completions", json=body, headers=AUTH), 400)
    assert err["param"] == param
    assert err["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 10**30),
        ("top_k", 10**30),
        ("max_completion_tokens", 2**31),
        ("messages", [{"role": "user", "content": "hi"}] * 4097),
    ],
)
def test_chat_fields_out_of_bounds_are_refused_with_400(client, field, value):
    body = {"model": client.model_name, "messages": [{"role": "user", "content": "hi"}]}
    body[field] = value
    err = error(client.post("/v1/chat/completions", json=body, headers=AUTH), 400)
    assert err["param"] == field


def test_fields_within_bounds_reach_dispatch(client):
    # No node is registered, so a request that passes every check meets 503.
    body = {
        "model": client.model_name,
        "prompt": [[1, 2], [3, 4]],
        "n": 16,
        "seed": 2**63 - 1 - 16,
        "top_k": 2**31 - 1,
        "stop": [f"s{i}" for i in range(16)],
        "stop_token_ids": list(range(64)),
    }
    assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 503


@pytest.mark.parametrize(
    ("method", "path", "token"),
    [
        ("GET", "/v1/models", API_KEY),
        ("GET", "/admin/overview", ADMIN),
        ("PUT", "/internal/nodes/node-1/heartbeat", CLUSTER),
    ],
)
def test_a_non_ascii_bearer_token_is_refused_with_401(client, method, path, token):
    # Sent as UTF-8 bytes; the server reads headers as Latin-1, so the token it
    # compares is non-ASCII text (it was a 500 from compare_digest).
    for bearer in ("tökén", f"{token}é"):
        headers = {"Authorization": f"Bearer {bearer}".encode()}
        reply = client.request(method, path, headers=headers, json={})
        assert error(reply, 401)["type"] == "authentication_error"


def test_a_non_ascii_session_cookie_is_refused_with_401(client):
    for cookie in (f"{int(time.time()) + 60}.sïgnature", "²³¹.signature"):
        headers = {"Cookie": f"lightpd_session={cookie}".encode()}
        error(client.get("/admin/overview", headers=headers), 401)


def test_health_answers_while_a_large_chat_body_is_tokenized(client, monkeypatch):
    """The chat template and tokenizer run off the event loop. The tokenization is
    held until /health has answered: were it on the loop, /health could not answer,
    and the hold would end by its timeout instead."""
    started, health_answered = threading.Event(), threading.Event()
    held_until_health: list[bool] = []
    encode_chat = routes.encode_chat

    def held_encode_chat(tokenizer, messages, *more):
        started.set()
        held_until_health.append(health_answered.wait(timeout=10))
        return encode_chat(tokenizer, messages, *more)

    monkeypatch.setattr(routes, "encode_chat", held_encode_chat)
    content = "hello world " * (3 * 1024 * 1024 // 12)  # 3 MiB, under the limit
    body = {"model": client.model_name, "messages": [{"role": "user", "content": content}]}
    replies: list[httpx.Response] = []
    chat = threading.Thread(
        target=lambda: replies.append(client.post("/v1/chat/completions", json=body, headers=AUTH))
    )
    chat.start()
    try:
        assert started.wait(timeout=30)
        assert client.get("/health").status_code == 200
    finally:
        health_answered.set()
        chat.join()
    assert held_until_health == [True]
    # The body was accepted and tokenized; with no node ready, dispatch answers 503.
    assert replies[0].status_code == 503, replies[0].text


# Smaller gaps an abuse probe found (issue 25): each a 400 that says what is wrong.


@pytest.mark.parametrize(
    ("endpoint", "body", "where"),
    [
        ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {"prompt": ["fine", "x\udfffy"]}, "prompt[1]"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
            "messages[0].content[0].text",
        ),
    ],
)
def test_a_lone_surrogate_is_refused_with_400(client, endpoint, body, where):
    # As a client writes it: JSON escapes the surrogate (\\ud800), as json.dumps does.
    raw = json.dumps({"model": client.model_name, **body})
    headers = {**AUTH, "Content-Type": "application/json"}
    err = error(client.post(endpoint, content=raw, headers=headers), 400)
    assert f"{where} holds a lone surrogate" in err["message"]
    assert "not valid Unicode" in err["message"]


def test_min_tokens_above_max_tokens_is_refused(client):
    body = {"model": client.model_name, "prompt": "hi", "min_tokens": 100, "max_tokens": 4}
    err = error(client.post("/v1/completions", json=body, headers=AUTH), 400)
    assert "min_tokens (100) must not exceed max_tokens (4)" in err["message"]
    chat = {"model": client.model_name, "messages": [{"role": "user", "content": "hi"}]}
    chat |= {"min_tokens": 9, "max_completion_tokens": 8}
    err = error(client.post("/v1/chat/completions", json=chat, headers=AUTH), 400)
    assert "min_tokens (9) must not exceed max_tokens (8)" in err["message"]


def test_a_huge_logit_bias_key_is_refused_without_python_internals(client):
    body = {"model": client.model_name, "prompt": "hi", "logit_bias": {"9" * 5000: 1}}
    err = error(client.post("/v1/completions", json=body, headers=AUTH), 400)
    assert "keys must be token ids" in err["message"] and "(5000 characters)" in err["message"]
    assert "int_max_str_digits" not in err["message"] and len(err["message"]) < 200


def test_a_long_model_id_is_never_echoed_whole(client):
    name = "m" * 10_000
    err = error(
        client.post("/v1/completions", json={"model": name, "prompt": "hi"}, headers=AUTH), 400
    )
    assert err["param"] == "model" and name not in err["message"]
    reply = client.get(f"/v1/models/{name}", headers=AUTH)
    assert reply.status_code == 404 and name not in reply.text
    assert "(10000 characters)" in reply.json()["error"]["message"]


def test_a_grammar_that_accepts_nothing_is_refused_with_400(client):
    body = {"model": client.model_name, "prompt": "hi", "guided_grammar": "root ::= root"}
    err = error(client.post("/v1/completions", json=body, headers=AUTH), 400)
    assert "accepts no text" in err["message"]


def test_the_api_map_is_not_public_by_default(client, redis_url, tiny_model):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path
    settings = Settings(
        model=tiny_model("llama"),
        redis_url=redis_url,
        admin_token=ADMIN,
        cluster_token=CLUSTER,
        api_docs=True,
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as open_docs:
        assert open_docs.get("/openapi.json").status_code == 200


def test_one_request_cannot_ask_for_more_output_than_the_budget(client):
    # The probe's request: 64 prompts x n=16 x 2,000 tokens = 2,048,000 output tokens.
    body = {"model": client.model_name, "prompt": [[5, 6, 7]] * 64, "n": 16, "max_tokens": 2000}
    err = error(client.post("/v1/completions", json=body, headers=AUTH), 400)
    assert "1024 sequences x 2000 tokens = 2048000" in err["message"]
    assert "LIGHTPD_MAX_REQUEST_TOKENS" in err["message"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        # The probe's grammar bomb: 1,024 distinct choices of 1,000 characters.
        (
            {"guided_choice": [f"{i:04d}" + "q" * 996 for i in range(1024)]},
            "guided_choice: the choices are longer than 120000 characters in all",
        ),
        (
            {
                "guided_json": {
                    "type": "object",
                    "properties": {
                        f"p{i}": {"type": "string", "pattern": "a+"} for i in range(6000)
                    },
                }
            },
            "more than 5000 object properties",
        ),
        (
            {"guided_json": {"type": "string", "enum": [f"v{i}" for i in range(50_000)]}},
            "more than 1000 enum values",
        ),
        ({"guided_regex": "a" * 5000}, "the regular expression is longer than 4096 characters"),
    ],
    ids=["choice-bomb", "properties", "enum", "regex"],
)
def test_grammars_past_the_size_bounds_are_refused_before_any_compile(client, extra, says):
    body = {"model": client.model_name, "prompt": "hi", "max_tokens": 8, **extra}
    started = time.monotonic()
    err = error(client.post("/v1/completions", json=body, headers=AUTH), 400)
    assert says in err["message"]
    assert time.monotonic() - started < 5  # refused by counting, not by compiling
