"""Our tokenizer gives the same tokens, text and chat prompts as transformers'."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer, TokenizersBackend

from common.tokenizer import encode_chat, load_tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3")
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


def reference_tokenizer(arch: str, path: str):
    """transformers' tokenizer for the folder. For a qwen2 config, AutoTokenizer
    builds Qwen2Tokenizer, which replaces tokenizer.json's pre-tokenizer with its own
    and adds <|endoftext|> past the model's vocabulary; our tiny checkpoints were not
    made with that pipeline, so the reference is the class tokenizer_config.json
    names, the one AutoTokenizer gives for the other architectures."""
    if arch == "qwen2":
        return TokenizersBackend.from_pretrained(path)
    reference = AutoTokenizer.from_pretrained(path)
    assert type(reference) is TokenizersBackend
    return reference


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tokenizers(request, tiny_model):
    path = tiny_model(request.param)
    return load_tokenizer(path), reference_tokenizer(request.param, path)


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
    theirs = TokenizersBackend.from_pretrained(old_style_checkpoint)
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


def test_a_folder_without_tokenizer_json_is_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no tokenizer\.json: only fast tokenizers"):
        load_tokenizer(tmp_path)


def test_the_control_plane_imports_neither_torch_nor_transformers():
    pytest.importorskip("fastapi")  # absent where only the engine is installed (GPU image)
    pytest.importorskip("redis")
    check = (
        "import sys, controlplane.app; "
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:5]; "
        "assert not any(m.startswith('transformers') for m in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
