"""What the benchmark sends: random prompts, a shared prefix, multi-turn conversations.

Prompt text is made of random token ids of the model's tokenizer when one is
given (so lengths are exact, and the completions endpoint gets the ids
themselves), or else of random common words (lengths are then in words).
Everything is drawn from the seed, so two runs with the same options send the
same prompts, which is what makes runs (and the in-process engine) comparable.
"""

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "what",
    "can",
    "more",
    "out",
    "up",
    "about",
    "into",
    "them",
    "some",
    "could",
    "time",
    "only",
    "new",
    "other",
    "two",
    "may",
    "then",
    "first",
    "any",
    "like",
    "now",
    "my",
    "such",
    "make",
    "over",
    "our",
    "even",
    "most",
    "state",
    "after",
    "also",
    "made",
    "many",
    "did",
    "must",
    "before",
    "back",
    "through",
    "long",
    "where",
    "much",
    "should",
    "well",
    "people",
    "down",
    "own",
    "just",
    "because",
    "good",
    "each",
    "those",
    "how",
    "too",
    "little",
    "very",
    "world",
    "still",
    "see",
    "work",
    "life",
    "way",
    "between",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "great",
    "since",
    "against",
    "right",
    "three",
    "old",
    "year",
    "place",
    "around",
    "however",
    "small",
    "found",
    "model",
    "token",
    "cache",
    "batch",
    "kernel",
    "memory",
    "decode",
    "prefill",
    "request",
    "server",
    "latency",
    "queue",
    "node",
]


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    input_len: int = 256  # mean new prompt length of a turn (tokens, or words without tokenizer)
    input_range: float = 0.0  # lengths uniform in mean * [1 - range, 1 + range]
    output_len: int = 128
    output_range: float = 0.0
    shared_prefix_len: int = 0  # the same prompt start (chat: a system message) for all
    turns: int = 1  # requests per conversation, each extending the previous one
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.num_requests >= 1, f"--num-requests must be at least 1, got {self.num_requests}"),
            (self.input_len >= 1, f"--input-len must be at least 1, got {self.input_len}"),
            (self.output_len >= 1, f"--output-len must be at least 1, got {self.output_len}"),
            (0 <= self.input_range < 1, f"--input-range must be in [0, 1), got {self.input_range}"),
            (
                0 <= self.output_range < 1,
                f"--output-range must be in [0, 1), got {self.output_range}",
            ),
            (
                self.shared_prefix_len >= 0,
                f"--shared-prefix-len must be >= 0, got {self.shared_prefix_len}",
            ),
            (self.turns >= 1, f"--turns must be at least 1, got {self.turns}"),
            (
                self.num_requests % self.turns == 0,
                f"--num-requests ({self.num_requests}) must be a multiple of --turns "
                f"({self.turns}): each conversation has that many turns",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def num_conversations(self) -> int:
        return self.num_requests // self.turns


@dataclass(frozen=True)
class PlannedTurn:
    text: str  # the new user text of this turn (without the shared prefix)
    token_ids: list[int] | None  # the same text as token ids, when a tokenizer made it
    input_len: int  # planned length of the new text
    max_tokens: int


@dataclass(frozen=True)
class Conversation:
    index: int
    turns: list[PlannedTurn]


@dataclass(frozen=True)
class Workload:
    prefix: PlannedTurn | None
    conversations: list[Conversation]

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


class PromptSource(Protocol):
    def make(self, rng: random.Random, length: int) -> tuple[str, list[int] | None]: ...


class WordPrompts:
    """Random common English words; ``length`` counts words."""

    def make(self, rng: random.Random, length: int) -> tuple[str, list[int] | None]:
        return " ".join(rng.choice(_WORDS) for _ in range(length)), None


class TokenPrompts:
    """Random non-special token ids of a tokenizer; ``length`` counts tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        special = set(tokenizer.all_special_ids)
        self.ids = [i for i in range(len(tokenizer)) if i not in special]

    def make(self, rng: random.Random, length: int) -> tuple[str, list[int] | None]:
        ids = [rng.choice(self.ids) for _ in range(length)]
        return self.tokenizer.decode(ids), ids


def sample_length(rng: random.Random, mean: int, range_ratio: float) -> int:
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.randint(low, high)


def build_workload(
    spec: WorkloadSpec, source: PromptSource, *, warmup: bool = False, count: int | None = None
) -> Workload:
    """The run's conversations, ``spec.turns`` turns each; with ``warmup``, a
    different draw of ``count`` single-turn requests from the same lengths."""
    rng = random.Random(f"workload-{'warmup' if warmup else 'main'}-{spec.seed}")
    prefix = None
    if spec.shared_prefix_len:
        text, ids = source.make(random.Random(f"prefix-{spec.seed}"), spec.shared_prefix_len)
        prefix = PlannedTurn(text, ids, spec.shared_prefix_len, 0)
    turns = 1 if warmup else spec.turns
    num_conversations = (count or 0) if warmup else spec.num_conversations
    conversations = []
    for index in range(num_conversations):
        planned = []
        for _ in range(turns):
            length = sample_length(rng, spec.input_len, spec.input_range)
            text, ids = source.make(rng, length)
            max_tokens = sample_length(rng, spec.output_len, spec.output_range)
            planned.append(PlannedTurn(text, ids, length, max_tokens))
        conversations.append(Conversation(index, planned))
    return Workload(prefix, conversations)


def completion_prompt(prefix: PlannedTurn | None, turn: PlannedTurn) -> str | list[int]:
    """The completions endpoint's prompt: token ids when a tokenizer made them."""
    if turn.token_ids is not None:
        return (prefix.token_ids if prefix else []) + turn.token_ids
    return f"{prefix.text} {turn.text}" if prefix else turn.text


def chat_messages(
    prefix: PlannedTurn | None, history: Sequence[tuple[str, str]], turn: PlannedTurn
) -> list[dict[str, str]]:
    """The chat messages of a turn: the shared prefix as a system message, then the
    earlier turns (user text, reply received) and the new user text."""
    messages = [{"role": "system", "content": prefix.text}] if prefix else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*messages, {"role": "user", "content": turn.text}]


def planned_prompt_len(prefix: PlannedTurn | None, turn: PlannedTurn) -> int:
    return (prefix.input_len if prefix else 0) + turn.input_len
