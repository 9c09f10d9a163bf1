"""The batched sampler, on logits we choose."""

from collections import Counter

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from lightpd.common.engine.sampler import Sampler, SamplingBatch, seed_to_key

VOCAB = 50


def make_batch(n: int, **overrides) -> SamplingBatch:
    fields = dict(
        temperatures=torch.ones(n),
        top_ks=torch.full((n,), VOCAB),
        top_ps=torch.ones(n),
        min_ps=torch.zeros(n),
        keys=torch.tensor([seed_to_key(i) for i in range(n)]),
        steps=torch.zeros(n, dtype=torch.int64),
        all_greedy=False,
        uses_top_k_or_p=False,
        uses_min_p=False,
        num_top_logprobs=-1,
    )
    fields.update(overrides)
    return SamplingBatch(**fields)


def random_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, VOCAB), generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_and_logprobs_are_the_models():
    sampler = Sampler(VOCAB, torch.device("cpu"))
    logits = random_logits(6)
    batch = make_batch(6, temperatures=torch.zeros(6), all_greedy=True, num_top_logprobs=3)
    out = sampler(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    expected = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, expected.gather(1, out.token_ids[:, None]).squeeze(1))
    top_values, top_ids = expected.topk(3)
    assert torch.equal(out.top_ids, top_ids) and torch.allclose(out.top_logprobs, top_values)


def test_a_seeded_row_samples_the_same_whatever_shares_the_batch():
    sampler = Sampler(VOCAB, torch.device("cpu"))
    logits = random_logits(8)
    key = seed_to_key(1234)
    alone = []
    for step in range(20):
        batch = make_batch(1, keys=torch.tensor([key]), steps=torch.tensor([step]))
        alone.append(sampler(logits[3:4], batch).token_ids.item())
    together = []
    for step in range(20):
        keys = torch.tensor([seed_to_key(i + 100 * step) for i in range(8)])
        keys[3] = key
        steps = torch.randint(0, 100, (8,))
        steps[3] = step
        temps = torch.rand(8) + 0.5
        temps[3] = 1.0
        batch = make_batch(8, keys=keys, steps=steps, temperatures=temps)
        together.append(sampler(logits, batch).token_ids[3].item())
    assert alone == together
    assert len(set(alone)) > 1, "the draws should vary from step to step"


def test_samples_follow_the_softmax_distribution():
    sampler = Sampler(VOCAB, torch.device("cpu"))
    n = 4000
    logits = random_logits(1, seed=5).expand(n, VOCAB) / 2
    batch = make_batch(n, keys=torch.tensor([seed_to_key(i) for i in range(n)]))
    tokens = sampler(logits, batch).token_ids
    empirical = torch.bincount(tokens, minlength=VOCAB).float() / n
    assert (empirical - logits[0].softmax(-1)).abs().max() < 0.03


def test_top_k_top_p_and_min_p_restrict_the_choices():
    sampler = Sampler(VOCAB, torch.device("cpu"))
    n = 500
    logits = random_logits(1, seed=7).expand(n, VOCAB).contiguous()
    probs = logits[0].softmax(-1)
    keys = torch.tensor([seed_to_key(i) for i in range(n)])

    out = sampler(
        logits, make_batch(n, keys=keys, top_ks=torch.full((n,), 3), uses_top_k_or_p=True)
    ).token_ids
    assert set(out.tolist()) == set(probs.topk(3).indices.tolist())

    sorted_probs, order = probs.sort(descending=True)
    nucleus = int((sorted_probs.cumsum(0) < 0.6).sum()) + 1
    out = sampler(
        logits, make_batch(n, keys=keys, top_ps=torch.full((n,), 0.6), uses_top_k_or_p=True)
    ).token_ids
    assert set(out.tolist()) <= set(order[:nucleus].tolist())

    out = sampler(
        logits, make_batch(n, keys=keys, min_ps=torch.full((n,), 0.3), uses_min_p=True)
    ).token_ids
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert set(out.tolist()) <= allowed

    greedy = sampler(
        logits[:1], make_batch(1, top_ks=torch.tensor([1]), uses_top_k_or_p=True)
    ).token_ids
    assert greedy.item() == probs.argmax().item()


def test_penalties_match_transformers_and_openai_definitions():
    sampler = Sampler(VOCAB, torch.device("cpu"))
    logits = random_logits(2, seed=11)
    history = torch.tensor([[4, 9, 9, 17, 4, 4], [1, 2, 3, 0, 0, 0]])
    prompt_lens = torch.tensor([2, 1])
    history_lens = torch.tensor([6, 3])
    batch = make_batch(
        2,
        temperatures=torch.zeros(2),
        all_greedy=True,
        num_top_logprobs=-1,
        repetition_penalties=torch.tensor([1.3, 1.0]),
        presence_penalties=torch.tensor([0.0, 0.5]),
        frequency_penalties=torch.tensor([0.0, 0.25]),
        token_history=history,
        prompt_lens=prompt_lens,
        history_lens=history_lens,
    )
    penalized = sampler._apply_penalties(logits.clone(), batch)
    # Row 0: repetition penalty exactly as transformers applies it, over prompt + output.
    hf = RepetitionPenaltyLogitsProcessor(1.3)(history[:1], logits[:1].clone())
    assert torch.allclose(penalized[0], hf[0])
    # Row 1: output tokens are [2, 3] once each (token 1 is the prompt, untouched).
    expected = logits[1].clone()
    expected[[2, 3]] -= 0.5 + 0.25
    assert torch.allclose(penalized[1], expected)


def test_suppressed_ids_are_never_chosen():
    sampler = Sampler(VOCAB, torch.device("cpu"))
    logits = random_logits(2)
    best = logits.argmax(-1)
    batch = make_batch(
        2,
        temperatures=torch.zeros(2),
        all_greedy=True,
        suppressed_ids=torch.tensor([[best[0].item(), -1], [-1, -1]]),
    )
    out = sampler(logits, batch).token_ids
    assert out[0] != best[0] and out[1] == best[1]
    assert out[0] == logits[0].topk(2).indices[1]


def reference_penalties(
    logits: torch.Tensor,
    history: torch.Tensor,
    prompt_lens: torch.Tensor,
    history_lens: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """The penalties one row and one token at a time."""
    out = logits.clone()
    for b in range(len(logits)):
        tokens = history[b, : history_lens[b]].tolist()
        for t in set(tokens):
            x = out[b, t]
            out[b, t] = x / repetition[b] if x > 0 else x * repetition[b]
        generated = Counter(tokens[prompt_lens[b] :])
        for t, n in generated.items():
            out[b, t] -= frequency[b] * n + presence[b]
    return out


@pytest.mark.parametrize("kind", ["repetition", "presence", "frequency"])
def test_penalties_over_a_history_longer_than_the_vocabulary(kind):
    sampler = Sampler(VOCAB, torch.device("cpu"))
    logits = random_logits(3, seed=13)
    g = torch.Generator().manual_seed(14)
    history = torch.randint(0, VOCAB, (3, 300), generator=g)
    history_lens = torch.tensor([300, 170, 60])
    prompt_lens = torch.tensor([120, 1, 60])  # row 2 has no output yet
    # Stale ids past each row's history, some outside the vocabulary: never counted.
    history[1, 170:] = torch.randint(-5, 10 * VOCAB, (130,), generator=g)
    history[2, 60:] = 10 * VOCAB
    values = {"repetition": 1.4, "presence": 0.7, "frequency": 0.3}
    off = {"repetition": 1.0, "presence": 0.0, "frequency": 0.0}
    penalties = {k: torch.full((3,), values[k] if k == kind else off[k]) for k in values}
    batch = make_batch(
        3,
        temperatures=torch.zeros(3),
        all_greedy=True,
        repetition_penalties=penalties["repetition"],
        presence_penalties=penalties["presence"],
        frequency_penalties=penalties["frequency"],
        token_history=history.int(),  # the request table holds int32
        prompt_lens=prompt_lens,
        history_lens=history_lens,
    )
    expected = reference_penalties(
        logits,
        history,
        prompt_lens,
        history_lens,
        penalties["repetition"],
        penalties["presence"],
        penalties["frequency"],
    )
    assert not torch.allclose(expected, logits), "the penalty should change something"
    assert torch.allclose(sampler._apply_penalties(logits.clone(), batch), expected)
    assert torch.equal(sampler(logits, batch).token_ids, expected.argmax(-1))


def test_logit_bias_is_added_to_the_logits_of_its_rows_only():
    sampler = Sampler(VOCAB, torch.device("cpu"))
    logits = random_logits(3)
    # Row 0 forces token 7, row 1 bans its argmax and nudges token 3, row 2 has none.
    banned = int(logits[1].argmax())
    bias_ids = torch.tensor([[7, -1], [banned, 3], [-1, -1]])
    bias_values = torch.tensor([[100.0, 0.0], [-100.0, 0.5], [0.0, 0.0]])
    batch = make_batch(
        3,
        temperatures=torch.zeros(3),
        all_greedy=True,
        num_top_logprobs=0,
        bias_ids=bias_ids,
        bias_values=bias_values,
    )
    out = sampler(logits, batch)
    expected = logits.clone()
    expected[0, 7] += 100
    expected[1, banned] -= 100
    expected[1, 3] += 0.5
    assert torch.equal(out.token_ids, expected.argmax(-1))
    assert out.token_ids[0] == 7 and out.token_ids[1] != banned
    # Logprobs are of the biased distribution, as OpenAI's API reports them.
    chosen = expected.log_softmax(-1).gather(1, out.token_ids[:, None]).squeeze(1)
    assert torch.allclose(out.logprobs, chosen)
