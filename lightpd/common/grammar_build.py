"""What a ``GrammarSpec`` means, in xgrammar's terms.

The control plane checks a spec with ``grammar_error`` before it sends one, so a
client learns at once what is wrong with its schema; each engine compiles the
same ``build_grammar`` for its tokenizer (``common/engine/grammar.py``).

xgrammar imports torch: callers import this module when a request first brings
a grammar, so a control plane that never sees one never loads torch.
"""

import re
from functools import lru_cache

import xgrammar as xgr

from lightpd.common.wire.sampling_params import GrammarSpec

# JSON comes out compact, without free whitespace: a model cannot pad it forever
# (small models like to), and its tokens go to content.
_COMPACT = dict(any_whitespace=False, separators=(",", ":"))
# OpenAI's {"type": "json_object"}: any object. Not strict, or it would allow only {}.
_JSON_OBJECT = '{"type": "object"}'
MAX_ERROR_CHARS = 300

# xgrammar's messages start with a time and a C++ source location, and failed
# checks with the condition checked; neither means anything to a client.
_NOISE = re.compile(r"^\[[0-9:]+\] \S+\.cc:[0-9]+: |Check failed: \(.*?\) is false: ")


def build_grammar(spec: GrammarSpec) -> xgr.Grammar:
    """The grammar of ``spec``; raises (RuntimeError, ValueError) if it is invalid."""
    match spec.kind:
        case "json_schema":
            return xgr.Grammar.from_json_schema(spec.text, **_COMPACT)
        case "json_object":
            return xgr.Grammar.from_json_schema(_JSON_OBJECT, strict_mode=False, **_COMPACT)
        case "regex":
            return xgr.Grammar.from_regex(spec.text)
        case "ebnf":
            return xgr.Grammar.from_ebnf(spec.text)
        case "structural_tag":
            return xgr.Grammar.from_structural_tag(spec.text)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def grammar_error(spec: GrammarSpec) -> str | None:
    """Why ``spec`` cannot be compiled, or accepts no text at all, in a line; None if
    it can be served."""
    try:
        grammar = build_grammar(spec)
        # Grammars written by hand may have no way out (``root ::= root``): every
        # token would be refused at the first step. JSON schemas built by xgrammar
        # always start somewhere.
        if spec.kind in ("ebnf", "regex") and not _starts(grammar):
            return "the grammar accepts no text: no string can start it"
    except Exception as exc:  # xgrammar raises RuntimeError, its own errors, TypeError
        return describe_error(exc)
    return None


@lru_cache(maxsize=1)
def _byte_compiler() -> xgr.GrammarCompiler:
    """A compiler over a vocabulary of the 256 bytes and an end token: any text can
    be spelled in it, so it tells whether a grammar can start, for any model."""
    vocab = [bytes([b]).decode("latin-1") for b in range(256)] + ["</s>"]
    info = xgr.TokenizerInfo(vocab, stop_token_ids=[256])
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)


def _starts(grammar: xgr.Grammar) -> bool:
    compiler = _byte_compiler()
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
    bitmask = xgr.allocate_token_bitmask(1, 257)
    matcher.fill_next_token_bitmask(bitmask)
    return bool(bitmask.any())


def describe_error(exc: BaseException) -> str:
    """xgrammar's message without its source locations, bounded (it may quote the
    whole schema)."""
    text = _NOISE.sub("", " ".join(str(exc).split())) or type(exc).__name__
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text
