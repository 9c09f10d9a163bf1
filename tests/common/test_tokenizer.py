"""Our tokenizer gives the same tokens, text and chat prompts as transformers'."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from lightpd.common.tokenizer import encode_chat, load_tokenizer
from lightpd.controlplane.openai.text_stream import TextStream

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
TEXTS = [
    "Hello world! How are you today?",
    "  leading and trailing spaces  \n\n\ttabs\r\nand lines\n",
    "0 1 2 10 100 1000 12345 3.14159 -7",
    "café naïve façade e\u0301 ß Ω Ж 中文 日本語 한국어",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷",
    "<|bos|>special<|im_end|> <|im_start|>user\nhi<|pad|><|im_end|>",
    "almost special <|im_end <|bos| |im_start|>",
    "I'm sure they'll say it's fine, isn't it ?",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me about GPUs 🚀"},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Très bien, merci !"},
        {"role": "user", "content": "And <|im_end|> now?\n"},
    ],
]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tokenizers(request, tiny_model):
    path = tiny_model(request.param)
    return load_tokenizer(path), AutoTokenizer.from_pretrained(path)


def test_encode_matches_transformers(tokenizers):
    ours, theirs = tokenizers
    for text in TEXTS:
        for add_special_tokens in (True, False):
            expected = theirs.encode(text, add_special_tokens=add_special_tokens)
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text


def test_decode_matches_transformers(tokenizers):
    ours, theirs = tokenizers
    rng = random.Random(0)
    id_lists = [[rng.randrange(len(theirs)) for _ in range(rng.randint(1, 24))] for _ in range(200)]
    # The growing prefixes incremental detokenization decodes, split characters included.
    emoji = theirs.encode(TEXTS[4], add_special_tokens=False)
    id_lists += [emoji[:n] for n in range(len(emoji) + 1)]
    for ids in id_lists:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), ids


def test_vocabulary_and_special_tokens_match_transformers(tokenizers):
    ours, theirs = tokenizers
    assert len(ours) == len(theirs)
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.chat_template == theirs.chat_template


def test_chat_prompts_match_transformers(tokenizers):
    ours, theirs = tokenizers
    for messages in CONVERSATIONS:
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert encode_chat(ours, messages) == theirs.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_token_id_is_in_the_models_vocabulary(tiny_model, arch):
    # The control plane refuses prompt ids at or past len(tokenizer).
    path = Path(tiny_model(arch))
    config = json.loads((path / "config.json").read_text())
    assert len(load_tokenizer(path)) == config["vocab_size"]


# Checkpoints saved by other tools and versions: the same files read two ways.

TEMPLATE = """\
{%- set ns = namespace(turns=0) -%}
{%- for m in messages -%}
{%- if m['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif -%}
{%- if loop.index > 3 %}{% break %}{% endif -%}
{%- set ns.turns = ns.turns + 1 %}
<|im_start|>{{ m['role'] }}{% if m.name is defined %} ({{ m.name }}){% endif %}
    {{ m['content'] | tojson }} {{ dict(a=m['content']) | tojson(indent=2) }}<|im_end|>
{% endfor %}
{{- ns.turns }}|{{ bos_token }}|{{ unk_token }}|{{ image_token }}|{{ tools is none }}|
{{- strftime_now('%Y') }}
{%- if add_generation_prompt %}<|im_start|>assistant
{% generation %}{% endgeneration %}{% endif %}"""


@pytest.fixture
def old_style_checkpoint(tiny_model, tmp_path):
    """A tokenizer_config.json as older transformers wrote it, with the template inside
    it and options the tiny checkpoints leave out."""
    shutil.copy(Path(tiny_model("llama")) / "tokenizer.json", tmp_path)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<|bos|>", "special": True},
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",  # not in the vocabulary: added as a new special token
        "image_token": "<|image|>",
        "add_bos_token": True,  # transformers 5 ignores both beside a tokenizer.json
        "add_eos_token": True,
        "chat_template": [
            {"name": "default", "template": TEMPLATE},
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_config_options_match_transformers(old_style_checkpoint):
    ours = load_tokenizer(old_style_checkpoint)
    theirs = AutoTokenizer.from_pretrained(old_style_checkpoint)
    assert len(ours) == len(theirs) == 402
    assert ours.all_special_ids == theirs.all_special_ids
    for text in [*TEXTS, "<unk> and <|image|>"]:
        for add_special_tokens in (True, False):
            expected = theirs.encode(text, add_special_tokens=add_special_tokens)
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected
    messages = [
        {"role": "system", "content": 'Quote "this" — and ü, 😀'},
        # (A key set to None is left out: transformers 5.17 renders it, 5.24 drops it.)
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "name": "bot"},
        {"role": "user", "content": "again"},
    ]
    for add_generation_prompt in (False, True):
        assert ours.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        ) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def test_a_template_may_reject_a_conversation(old_style_checkpoint):
    ours = load_tokenizer(old_style_checkpoint)
    with pytest.raises(jinja2.TemplateError, match="tools are not supported"):
        encode_chat(ours, [{"role": "tool", "content": "{}"}])


def test_a_folder_transformers_cannot_read_is_refused_with_its_reason(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizer"}')
    with pytest.raises(ValueError, match=r"transformers could not load the tokenizer of \S+: \w.+"):
        load_tokenizer(tmp_path)


def test_the_control_plane_imports_neither_torch_nor_transformers():
    pytest.importorskip("fastapi")  # absent where only the engine is installed (GPU image)
    pytest.importorskip("redis")
    check = (
        "import sys, lightpd.controlplane.app; "
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:5]; "
        "assert not any(m.startswith('transformers') for m in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# Tokenizer files that disagree with their model family's class: transformers picks
# the class by config.json's model_type when tokenizer_config.json names none (or
# names the generic backend), and that class may rebuild parts of the pipeline.

MATRIX_TEXTS = [
    "0 1 2 3 4 5",
    'JSON: {"a": [1, 2',
    "12345678901234567890 3.14159e-10",
    "中文 日本語 한국어 混合 text",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷",
    "runs    of     spaces\n\n\n\nand\t\tnewlines \n \n",
    "<|bos|>inside<|im_end|> text <|tool|>call<|tool|>x",
    " leading space and trailing ",
]


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama", "mistral"])
def family(request):
    return request.param


@pytest.mark.parametrize("tokenizer_class", [None, "TokenizersBackend"])
@pytest.mark.parametrize("add_bos_token", [True, False])
def test_token_ids_and_text_are_transformers_own(
    tiny_model, tmp_path, family, tokenizer_class, add_bos_token
):
    source = Path(tiny_model("llama"))
    shutil.copy(source / "tokenizer.json", tmp_path)
    model_config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**model_config, "model_type": family}))
    config = {
        "bos_token": "<|bos|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        # A special token the vocabulary lacks: added, and split out of text.
        "extra_special_tokens": ["<|tool|>"],
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert len(ours) == len(theirs)
    assert ours.all_special_ids == theirs.all_special_ids
    for text in MATRIX_TEXTS:
        for add_special_tokens in (True, False):
            expected = theirs.encode(text, add_special_tokens=add_special_tokens)
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
        ids = theirs.encode(text, add_special_tokens=True)
        expected_text = theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=True) == expected_text, text
        # Streamed one token at a time, as the control plane sends it.
        stream = TextStream(ours, stops=[])
        streamed = "".join(stream.add([token]) for token in ids) + stream.flush()
        assert streamed == expected_text, text


def test_the_qwen2_case_of_the_report(tiny_model, tmp_path):
    """A qwen2 checkpoint whose tokenizer.json splits digit runs as one: transformers'
    Qwen2Tokenizer splits every digit, and so must we."""
    path = Path(tiny_model("qwen2"))
    theirs = AutoTokenizer.from_pretrained(path)
    assert type(theirs).__name__ == "Qwen2Tokenizer"
    ours = load_tokenizer(path)
    for text in ("0 1 2 3 4 5", 'JSON: {"a": [1, 2', "2026-12-07 12345"):
        assert ours.encode(text) == theirs.encode(text), text


def test_the_export_is_made_once_and_reused(tiny_model, tmp_path, monkeypatch):
    from lightpd.common import tokenizer_export

    monkeypatch.setenv("LIGHTPD_HOME", str(tmp_path))
    path = Path(tiny_model("qwen3"))
    load_tokenizer(path)
    exports = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(exports) == 1
    made = exports[0].stat().st_mtime_ns
    load_tokenizer(path)
    assert exports[0].stat().st_mtime_ns == made  # read from the cache, not made again
    assert (
        tokenizer_export.exported_tokenizer(path)["tokenizer_class"]
        == type(AutoTokenizer.from_pretrained(path)).__name__
    )
