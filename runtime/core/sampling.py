"""Choosing the next token from logits: greedy, or sampled in Hugging Face's order.

Order (as transformers applies its processors and warpers): repetition penalty, temperature,
top-k, top-p, then a draw from the softmax. Everything is numpy on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from kvgraph.graphs import KvgraphError


@dataclass(frozen=True)
class Processing:
    """The processors' settings that are not sampling's (sampling.Sampling holds those), with transformers' meaning."""

    min_length: int = 0  # eos barred while the sequence (prompt included) is shorter
    encoder_repetition_penalty: float = 1.0  # > 1 favours tokens of the source (encoder-decoders)
    encoder_no_repeat_ngram_size: int = 0  # no n-gram of the source occurs in the output
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start after this many new tokens, factor)
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()  # (token sequence, bias added to its last token)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # sequences never generated
    forced_bos_token_id: int | None = None  # the first new token (mBART-50, NLLB: the target language)
    forced_eos_token_id: tuple[int, ...] = ()  # the token(s) at the last position max_length allows
    suppress_tokens: tuple[int, ...] = ()  # never generated
    begin_suppress_tokens: tuple[int, ...] = ()  # not generated as the first new token
    renormalize_logits: bool = False  # log_softmax after every processor
    remove_invalid_values: bool = False  # nan -> 0, +-inf -> the largest finite values
    # OpenAI's penalties (not transformers'): a token's score minus presence_penalty once it has been generated, minus
    # frequency_penalty times the number of times it has been (new tokens only, as OpenAI and vLLM count them)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        eos = self.forced_eos_token_id
        normal = {"forced_eos_token_id": () if eos is None else (eos,) if isinstance(eos, (int, np.integer)) else tuple(eos),
                  "suppress_tokens": tuple(self.suppress_tokens or ()), "begin_suppress_tokens": tuple(self.begin_suppress_tokens or ()),
                  "bad_words_ids": tuple(tuple(w) for w in self.bad_words_ids or ()),
                  "sequence_bias": tuple((tuple(ids), float(b)) for ids, b in (self.sequence_bias.items() if isinstance(self.sequence_bias, dict)
                                                                               else self.sequence_bias or ()))}
        for name, value in normal.items():
            object.__setattr__(self, name, value)
        for name in ("min_length", "encoder_no_repeat_ngram_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise KvgraphError(f"{name} must be an integer >= 0, got {value!r}")
        if not np.isfinite(self.encoder_repetition_penalty) or self.encoder_repetition_penalty <= 0:
            raise KvgraphError(f"encoder_repetition_penalty must be > 0 (1 = off), got {self.encoder_repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not -2 <= value <= 2:
                raise KvgraphError(f"{name} must be a number between -2 and 2 (0 = off), got {value!r}")
        decay = self.exponential_decay_length_penalty
        if decay is not None and (len(decay) != 2 or not float(decay[1]) > 0):
            raise KvgraphError(f"exponential_decay_length_penalty must be (start index, factor > 0), got {decay!r}")
        for name in ("bad_words_ids", "sequence_bias"):
            sequences = [s for s, _ in self.sequence_bias] if name == "sequence_bias" else self.bad_words_ids
            if any(not s or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 for t in s) for s in sequences):
                raise KvgraphError(f"{name}: every entry must be a non-empty list of token ids >= 0")



@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = None
    no_repeat_ngram_size: int = 0  # 0 disables: no n-gram of this size occurs twice in a row's sequence
    min_p: float | None = None  # None disables: drop tokens below min_p x the top token's probability
    typical_p: float = 1.0  # 1 disables: locally typical sampling's mass
    epsilon_cutoff: float = 0.0  # 0 disables: drop tokens below this probability
    eta_cutoff: float = 0.0  # 0 disables: eta sampling's epsilon
    processing: Processing = field(default_factory=Processing)  # the other processors (bans, forced tokens, ...)

    @classmethod
    def of(cls, options: dict[str, Any]) -> Sampling:
        """Sampling and Processing keywords together (generate()'s **options); an unknown keyword is a TypeError."""
        own = {f.name for f in fields(cls)} - {"processing"}
        other = {f.name for f in fields(Processing)}
        unknown = sorted(set(options) - own - other)
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        return cls(**{k: v for k, v in options.items() if k in own}, processing=Processing(**{k: v for k, v in options.items() if k in other}))

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise KvgraphError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise KvgraphError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise KvgraphError(f"top_p must be in (0, 1], got {self.top_p}")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise KvgraphError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise KvgraphError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.typical_p <= 1:
            raise KvgraphError(f"typical_p must be in (0, 1], got {self.typical_p}")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            if not 0 <= getattr(self, name) < 1:
                raise KvgraphError(f"{name} must be in [0, 1) (0 = off), got {getattr(self, name)}")
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


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the most likely token's (the top token always stays)."""
    probs = softmax(logits)
    remove = probs < min_p * probs.max(axis=-1, keepdims=True)
    remove[np.arange(len(logits)), probs.argmax(axis=-1)] = False
    return np.where(remove, -np.inf, logits)


def apply_typical(logits: np.ndarray, mass: float) -> np.ndarray:
    """Locally typical sampling (transformers' TypicalLogitsWarper): keep the tokens whose surprise is closest to the
    entropy until their probability reaches `mass`."""
    normalized = log_softmax(logits)
    p = np.exp(normalized)
    entropy = -np.nansum(normalized * p, axis=-1, keepdims=True)
    shifted = np.abs(-normalized - entropy)
    order = np.argsort(shifted, axis=-1, kind="stable")
    sorted_shifted = np.take_along_axis(shifted, order, axis=-1)
    cumulative = np.cumsum(softmax(np.take_along_axis(logits, order, axis=-1)), axis=-1)
    last = np.minimum((cumulative < mass).sum(axis=1), shifted.shape[-1] - 1)
    remove_sorted = sorted_shifted > np.take_along_axis(sorted_shifted, last[:, None], axis=1)
    remove_sorted[:, :1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits)


def apply_epsilon(logits: np.ndarray, epsilon: float) -> np.ndarray:
    """Drop tokens whose probability is below epsilon (the top token always stays)."""
    return _below(logits, softmax(logits) < epsilon)


def apply_eta(logits: np.ndarray, epsilon: float) -> np.ndarray:
    """Eta sampling: drop tokens below min(epsilon, sqrt(epsilon) * exp(-entropy)) (the top token always stays)."""
    probs = softmax(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=-1, keepdims=True)
    eta = np.minimum(epsilon, np.sqrt(epsilon) * np.exp(-entropy))
    return _below(logits, probs < eta)


def _below(logits: np.ndarray, remove: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1, keepdims=True)
    return np.where(remove & (logits < top), -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray, dtype=np.float32) -> np.ndarray:
    """log(softmax) over the last axis, computed in `dtype` (beam search: float32 as transformers; scoring: float64)."""
    shifted = logits.astype(dtype)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model's own distribution at its position (the raw logits' log-softmax,
    before any processor or warper, as vLLM reports by default), and the `top` most likely tokens there, best first."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int = 0) -> TokenLogprob:
    """(V,) logits -> the token's TokenLogprob with the `top` best tokens (float64 arithmetic)."""
    lp = log_softmax(np.asarray(logits), np.float64)
    return TokenLogprob(int(token), float(lp[token]), tuple((int(t), float(lp[t])) for t in best_tokens(lp, top)))


def best_tokens(lp: np.ndarray, top: int) -> np.ndarray:
    """The `top` highest of (V,) scores, best first, ties by token id: a full stable sort's first `top`, in O(V) (a
    partition finds the threshold; only the tokens at or above it are sorted)."""
    top = min(top, len(lp))
    if not top:
        return np.array([], dtype=np.int64)
    threshold = np.partition(lp, len(lp) - top)[len(lp) - top]
    candidates = np.flatnonzero(lp >= threshold)  # in id order, so the stable sort breaks ties by id
    return candidates[np.argsort(-lp[candidates], kind="stable")][:top]


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
    return draw(scores, rng)


def draw(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, V) warped scores -> (B,) int64 tokens drawn from their softmax (float64)."""
    probs = softmax(np.asarray(scores, dtype=np.float64))
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
