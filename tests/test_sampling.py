"""Sampling against two references on fixed logits: plain-Python loops and transformers' own processors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvgraph.graphs import KvgraphError
from kvgraph.runtime.core.sampling import Sampling, next_tokens, processed_logits

LOGITS = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32) * 3
SEEN = [np.array([1, 5, 5, 7]), np.array([0, 39]), np.array([12])]


def _reference(row: list[float], seen, temperature, top_k, top_p, penalty) -> list[float]:
    """The plainest statement of each step, one row at a time."""
    row = list(row)
    for t in set(int(i) for i in seen):
        row[t] = row[t] * penalty if row[t] < 0 else row[t] / penalty
    row = [x / temperature for x in row]
    if top_k:
        kth = sorted(row, reverse=True)[top_k - 1]
        row = [x if x >= kth else -math.inf for x in row]
    if top_p < 1:
        finite = [x for x in row if x != -math.inf]
        z = sum(math.exp(x - max(finite)) for x in finite)
        kept, total = set(), 0.0
        for i in sorted(range(len(row)), key=lambda i: -row[i]):
            if row[i] == -math.inf:
                break
            kept.add(i)
            total += math.exp(row[i] - max(finite)) / z
            if total >= top_p:
                break
        row = [x if i in kept else -math.inf for i, x in enumerate(row)]
    return row


CASES = [(1.0, 0, 1.0, 1.0), (0.7, 5, 1.0, 1.0), (1.3, 0, 0.8, 1.0), (0.9, 10, 0.5, 1.3), (1.0, 1, 1.0, 2.0), (2.0, 0, 0.95, 0.8)]


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", CASES)
def test_processed_logits_match_plain_reference(temperature, top_k, top_p, penalty):
    ours = processed_logits(LOGITS, SEEN, Sampling(temperature, top_k, top_p, penalty))
    for b in range(3):
        expected = np.array(_reference(LOGITS[b].tolist(), SEEN[b], temperature, top_k, top_p, penalty))
        np.testing.assert_array_equal(np.isinf(ours[b]), np.isinf(expected))
        np.testing.assert_allclose(ours[b][~np.isinf(expected)], expected[~np.isinf(expected)], rtol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", CASES)
def test_processed_logits_match_transformers(temperature, top_k, top_p, penalty):
    ours = processed_logits(LOGITS, SEEN, Sampling(temperature, top_k, top_p, penalty))
    scores = torch.from_numpy(LOGITS.astype(np.float64))
    # padding repeats an id the row already has, so the penalty sees the same set of tokens
    ids = torch.stack([torch.cat([torch.from_numpy(s), torch.full((4 - len(s),), int(s[0]))]) for s in SEEN])
    for processor in [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)] + (
        [TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []):
        scores = processor(ids, scores)
    theirs = scores.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)], rtol=1e-6)


def test_greedy_is_argmax_after_penalty():
    tokens = next_tokens(LOGITS, SEEN, Sampling(repetition_penalty=1.0), np.random.default_rng(0))
    assert tokens.tolist() == LOGITS.argmax(-1).tolist()
    top = int(LOGITS[0].argmax())
    penalised = next_tokens(LOGITS, [np.array([top])] + SEEN[1:], Sampling(repetition_penalty=50.0), np.random.default_rng(0))
    assert penalised[0] != top


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    sampling = Sampling(temperature=1.0, top_k=3)
    draws = [tuple(next_tokens(LOGITS, SEEN, sampling, np.random.default_rng(7))) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(1)
    counts = np.bincount([next_tokens(LOGITS[:1], SEEN[:1], sampling, rng)[0] for _ in range(3000)], minlength=40)
    probs = np.exp(processed_logits(LOGITS[:1], SEEN[:1], sampling)[0] - processed_logits(LOGITS[:1], SEEN[:1], sampling)[0].max())
    probs /= probs.sum()
    assert set(np.nonzero(counts)[0]) <= set(np.nonzero(probs)[0]) and len(np.nonzero(counts)[0]) == 3
    np.testing.assert_allclose(counts / 3000, probs, atol=0.03)


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_invalid_sampling_values_are_refused(kwargs, message):
    with pytest.raises(KvgraphError, match=message):
        Sampling(**kwargs)


def test_openai_penalties_count_new_tokens_only_as_openai_defines_them():
    """presence / frequency penalties (OpenAI's, not transformers'): logit - presence * [count > 0] - frequency * count,
    with counts over the generated tokens; the prompt's tokens are not penalised. A plain loop is the reference."""
    from kvgraph.runtime.core.processors import Context, build

    ids = np.array([[9, 9, 4, 5, 5, 5, 2], [9, 1, 1, 1, 3, 3, 0]])  # 3 prompt tokens, then 4 new ones per row
    sampling = Sampling(processing=Sampling.of({"presence_penalty": 0.5, "frequency_penalty": -0.25}).processing)
    scores = build(sampling, Context(eos=(), prompt_length=3, max_length=20, vocab_size=40)).process(ids, LOGITS[:2])
    for b in range(2):
        expected = [float(x) for x in LOGITS[b]]
        new = [int(t) for t in ids[b, 3:]]
        for token in set(new):
            expected[token] -= 0.5 + -0.25 * new.count(token)
        assert scores[b].tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(KvgraphError, match="presence_penalty must be a number between -2 and 2"):
        Sampling.of({"presence_penalty": 2.5})


def test_best_tokens_are_a_stable_sorts_first_k_ties_included():
    from kvgraph.runtime.core.sampling import best_tokens

    rng = np.random.default_rng(0)
    for trial in range(60):  # odd trials: five distinct values over 1,000 tokens, so ties straddle the k-th place
        scores = rng.integers(0, 5, size=1000).astype(np.float64) if trial % 2 else rng.standard_normal(4096)
        for k in (0, 1, 5, 20):
            assert best_tokens(scores, k).tolist() == np.argsort(-scores, kind="stable")[:k].tolist()
    assert best_tokens(np.array([0.5, 2.0]), 5).tolist() == [1, 0]  # more asked for than there are tokens
