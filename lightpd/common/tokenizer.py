"""The model's own tokenizer and chat template, with transformers' token ids.

The tokenizer is the one transformers builds for the checkpoint (which is not always
``tokenizer.json`` as it is: see ``tokenizer_export``), run through the Rust
``tokenizers`` library; the chat template renders as transformers renders it, with
jinja2. Neither imports transformers or torch into the control plane.
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from lightpd.common.tokenizer_export import exported_tokenizer

# transformers' named special tokens, in its order (all_special_ids follows it).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    """A fast tokenizer and its chat template, with the methods of transformers' that we use."""

    def __init__(self, backend: RustTokenizer, config: dict[str, Any], chat_template: str | None):
        self._backend = backend
        self.chat_template = chat_template
        self.special_tokens_map, extra = _special_tokens(config)
        specials = list(dict.fromkeys([*self.special_tokens_map.values(), *extra]))
        self._add_missing_special_tokens(specials)
        self.all_special_ids = [backend.token_to_id(t) for t in specials]
        # Encoding then only reads the tokenizer, so threads may share it.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        # transformers skips this cleanup for BPE, where it would corrupt text.
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
        )

    def __len__(self) -> int:
        """Vocabulary size, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """The conversation rendered by the chat template, as transformers renders it;
        with ``tokenize``, its token ids (no special tokens added around them)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        # Like transformers: keys set to None are dropped (templates test for presence).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = _compile(self.chat_template).render(
            messages=messages,
            tools=template_kwargs.pop("tools", None),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **template_kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _add_missing_special_tokens(self, tokens: list[str]) -> None:
        # transformers registers every named special token as an added special
        # token, so it is split out of text and skipped when decoding.
        added = {t.content for t in self._backend.get_added_tokens_decoder().values()}
        missing = [AddedToken(t, special=True, normalized=False) for t in tokens if t not in added]
        if missing:
            self._backend.add_special_tokens(missing)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer transformers' ``AutoTokenizer`` builds for ``model_dir``."""
    exported = exported_tokenizer(model_dir)
    backend = RustTokenizer.from_str(exported["backend"])
    config = {
        **exported.get("special_tokens", {}),
        "extra_special_tokens": exported.get("extra_special_tokens", []),
        "clean_up_tokenization_spaces": exported.get("clean_up_tokenization_spaces", False),
        "split_special_tokens": exported.get("split_special_tokens", False),
    }
    return Tokenizer(backend, config, exported.get("chat_template"))


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None
) -> list[int]:
    """Token ids of ``messages`` under the model's chat template, ready for the reply;
    ``tools`` (OpenAI's tool definitions) go to the template as transformers passes them."""
    if not tokenizer.chat_template:
        raise ValueError("this model's tokenizer has no chat template; use completions instead")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, tools=tools
    )
    return tokenizer.encode(text, add_special_tokens=False)


def _special_tokens(config: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The named special tokens (transformers' standard names in its order, then
    model-specific `*_token` keys) and the extra, unnamed ones."""
    named = {k: t for k, v in config.items() if k.endswith("_token") and (t := _token_text(v))}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        named |= {k: t for k, v in extra.items() if (t := _token_text(v))}
        extra = []
    order = {name: i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
    keys = sorted(named, key=lambda k: order.get(k, len(order)))
    return {k: named[k] for k in keys}, [t for v in extra if (t := _token_text(v))]


def _token_text(value: Any) -> str | None:
    """A special token as configs write it: a string, or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _clean_up_tokenization(text: str) -> str:
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


# The chat template's environment, as transformers sets it up: templates are
# code from the model's folder, so they run sandboxed.


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text for
    training masks; rendering keeps the text as it is."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's own attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore names, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature: `self` may be a key
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _Dict:
    """``dict`` for templates: calling it and ``fromkeys``, nothing more."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja2's own tojson, no HTML escaping: the output is a prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    return env.from_string(template)
