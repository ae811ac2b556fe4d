"""Choosing the next token from logits: greedy, or sampled in Hugging Face's order.

Order (as transformers applies its processors and warpers): repetition penalty, temperature,
top-k, top-p, then a draw from the softmax. Everything is numpy on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvgraph.graphs import KvgraphError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = None
    no_repeat_ngram_size: int = 0  # 0 disables: no n-gram of this size occurs twice in a row's sequence

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise KvgraphError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise KvgraphError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise KvgraphError(f"top_p must be in (0, 1], got {self.top_p}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise KvgraphError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        n = self.no_repeat_ngram_size
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise KvgraphError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float) -> np.ndarray:
    """logits (B, V); seen[b] = token ids in row b so far. Positive logits divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for b, ids in enumerate(seen):
        ids = np.unique(ids)
        chosen = logits[b, ids]
        logits[b, ids] = np.where(chosen < 0, chosen * penalty, chosen / penalty)
    return logits


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.sort(logits, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose probability reaches p (at least one token)."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1)  # ascending, as transformers' TopPLogitsWarper
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    cumulative = np.cumsum(probs, axis=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray, dtype=np.float32) -> np.ndarray:
    """log(softmax) over the last axis, computed in `dtype` (beam search: float32 as transformers; scoring: float64)."""
    shifted = logits.astype(dtype)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def processed_logits(logits: np.ndarray, seen: list[np.ndarray], sampling: Sampling) -> np.ndarray:
    """(B, V) logits after penalty, temperature, top-k, top-p (float64)."""
    out = apply_repetition_penalty(logits.astype(np.float64), seen, sampling.repetition_penalty)
    if sampling.greedy:
        return out
    out = out / sampling.temperature
    return apply_top_p(apply_top_k(out, sampling.top_k), sampling.top_p)


def next_tokens(logits: np.ndarray, seen: list[np.ndarray], sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """(B, V) logits -> (B,) int64 next token ids."""
    if sampling.greedy and sampling.repetition_penalty == 1.0:
        return logits.argmax(axis=-1).astype(np.int64)  # the hot path: no float64 copy of (B, V)
    scores = processed_logits(logits, seen, sampling)
    if sampling.greedy:
        return scores.argmax(axis=-1).astype(np.int64)
    probs = softmax(scores)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def banned_ngram_tokens(sequences: np.ndarray | list[list[int]], n: int) -> list[list[int]]:
    """Per row, the tokens that would repeat an n-gram of the row's sequence so far (transformers'
    NoRepeatNGramLogitsProcessor): those that followed an earlier occurrence of the last n - 1 tokens."""
    banned = []
    for row in sequences:
        row = [int(t) for t in row]
        if len(row) + 1 < n:
            banned.append([])
            continue
        tail = tuple(row[len(row) - n + 1:]) if n > 1 else ()
        banned.append(sorted({row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == tail}))
    return banned


def masked(logits: np.ndarray, matchers: list) -> np.ndarray:
    """logits (B, V) with every row's disallowed tokens at -inf: a matcher's allowed() is a (V,) boolean mask
    (structured output's RowMatcher); rows whose matcher is None are unchanged."""
    logits = np.array(logits, dtype=np.float32)
    for row, matcher in enumerate(matchers):
        if matcher is not None:
            logits[row, ~matcher.allowed()] = -np.inf
    return logits


def ban(logits: np.ndarray, banned: list[list[int]]) -> np.ndarray:
    """logits (B, V) with the banned tokens of each row at -inf (a copy when anything is banned)."""
    if not any(banned):
        return logits
    logits = np.array(logits, dtype=np.float32)
    for row, tokens in enumerate(banned):
        logits[row, tokens] = -np.inf
    return logits
