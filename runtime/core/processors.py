"""Logits processors in numpy, as transformers' generate() builds and orders them.

Every processor reads the decoder's sequences so far, `ids` (B, L) exactly as transformers' `input_ids` are at that
step (a decoder-only batch: the left-padded prompts, pads included, then the new tokens; an encoder-decoder: the
decoder start token, then the new tokens), and the step's scores (B, V) float32. The order is transformers' own:

    sequence_bias, encoder_repetition_penalty, repetition_penalty, (OpenAI's presence and frequency penalties),
    no_repeat_ngram_size, encoder_no_repeat_ngram_size,
    bad_words_ids, min_length, min_new_tokens, forced_bos_token_id, forced_eos_token_id, remove_invalid_values,
    exponential_decay_length_penalty, suppress_tokens, begin_suppress_tokens
    then, when sampling: temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff (sampling.py)
    then renormalize_logits.

Structured output's grammar mask runs between the processors and the warpers (where transformers puts a caller's own
processors). Greedy decoding and beam search skip the warpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kvgraph.graphs import KvgraphError
from kvgraph.runtime.core import sampling as s
from kvgraph.runtime.core.sampling import Processing, Sampling, log_softmax

Processor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (ids (B, L), scores (B, V)) -> scores (B, V)


@dataclass(frozen=True)
class Context:
    """What the processors know besides the sequences: fixed for one generation."""

    eos: tuple[int, ...]  # the end-of-sequence ids
    prompt_length: int  # the sequences' length when generation starts (transformers' input_ids_seq_length)
    max_length: int  # their length when it must stop (prompt_length + max_new_tokens)
    min_new_tokens: int = 0
    encoder_ids: np.ndarray | None = None  # (B, S) the sources as the encoder read them, pads included (encoder-decoders)
    padding: np.ndarray | None = None  # (B,) a decoder-only batch: each row's count of left pads in the prompt
    vocab_size: int = 0


@dataclass
class Processors:
    """The processors of one generation, in transformers' order; `process` before a grammar mask, `warp` after it."""

    steps: list[Processor] = field(default_factory=list)
    warpers: list[Processor] = field(default_factory=list)
    renormalize: bool = False

    def process(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float32)
        for step in self.steps:
            scores = step(ids, scores)
        return scores

    def warp(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for step in self.warpers:
            scores = step(ids, scores)
        return log_softmax(scores) if self.renormalize else scores

    def __call__(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return self.warp(ids, self.process(ids, scores))

    @property
    def active(self) -> bool:
        return bool(self.steps or self.warpers or self.renormalize)


def build(sampling: Sampling, context: Context) -> Processors:
    """The processors transformers' generate() would build from the same settings (greedy: no warpers)."""
    p, eos = sampling.processing, np.array(context.eos, dtype=np.int64)
    steps: list[Processor] = []
    if p.sequence_bias:
        steps.append(sequence_bias(dict(p.sequence_bias), context.vocab_size))
    if p.encoder_repetition_penalty != 1.0 and context.encoder_ids is not None:
        steps.append(encoder_repetition_penalty(p.encoder_repetition_penalty, context.encoder_ids))
    if sampling.repetition_penalty != 1.0:
        steps.append(repetition_penalty(sampling.repetition_penalty, context.padding))
    if p.presence_penalty or p.frequency_penalty:
        steps.append(occurrence_penalty(p.presence_penalty, p.frequency_penalty, context.prompt_length))
    if sampling.no_repeat_ngram_size:
        steps.append(no_repeat_ngram(sampling.no_repeat_ngram_size))
    if p.encoder_no_repeat_ngram_size and context.encoder_ids is not None:
        steps.append(encoder_no_repeat_ngram(p.encoder_no_repeat_ngram_size, context.encoder_ids))
    if p.bad_words_ids:
        words = [tuple(w) for w in p.bad_words_ids if not (len(w) == 1 and w[0] in context.eos)]
        if words:
            steps.append(sequence_bias({w: -np.inf for w in words}, context.vocab_size))
    if p.min_length and eos.size:
        steps.append(eos_barred_until(lambda ids: ids.shape[1] < p.min_length, eos))
    if context.min_new_tokens and eos.size:
        steps.append(eos_barred_until(lambda ids: ids.shape[1] - context.prompt_length < context.min_new_tokens, eos))
    if p.forced_bos_token_id is not None:
        steps.append(forced_at(lambda ids: ids.shape[1] == 1, [p.forced_bos_token_id]))
    if p.forced_eos_token_id:
        steps.append(forced_at(lambda ids: ids.shape[1] == context.max_length - 1, list(p.forced_eos_token_id)))
    if p.remove_invalid_values:
        steps.append(remove_invalid)
    if p.exponential_decay_length_penalty is not None and eos.size:
        start, factor = p.exponential_decay_length_penalty
        steps.append(exponential_decay(int(start) + context.prompt_length, float(factor), eos))
    if p.suppress_tokens:
        steps.append(suppressed_when(lambda ids: True, p.suppress_tokens))
    if p.begin_suppress_tokens:
        begin = context.prompt_length + (1 if context.prompt_length == 1 and p.forced_bos_token_id is not None else 0)
        steps.append(suppressed_when(lambda ids: ids.shape[1] == begin, p.begin_suppress_tokens))
    return Processors(steps, [] if sampling.greedy else warpers(sampling), p.renormalize_logits)


def warpers(sampling: Sampling) -> list[Processor]:
    """transformers' sampling warpers, in its order (temperature, top-k, top-p, min-p, typical, epsilon, eta)."""
    out: list[Processor] = []
    if sampling.temperature != 1.0:
        out.append(lambda ids, scores: scores / np.float32(sampling.temperature))
    if sampling.top_k:
        out.append(lambda ids, scores: s.apply_top_k(scores, sampling.top_k))
    if sampling.top_p < 1.0:
        out.append(lambda ids, scores: s.apply_top_p(scores, sampling.top_p))
    if sampling.min_p is not None:
        out.append(lambda ids, scores: s.apply_min_p(scores, sampling.min_p))
    if sampling.typical_p < 1.0:
        out.append(lambda ids, scores: s.apply_typical(scores, sampling.typical_p))
    if 0.0 < sampling.epsilon_cutoff < 1.0:
        out.append(lambda ids, scores: s.apply_epsilon(scores, sampling.epsilon_cutoff))
    if 0.0 < sampling.eta_cutoff < 1.0:
        out.append(lambda ids, scores: s.apply_eta(scores, sampling.eta_cutoff))
    return out


# -- the processors --------------------------------------------------------------------------------------------


def occurrence_penalty(presence: float, frequency: float, prompt_length: int) -> Processor:
    """OpenAI's presence and frequency penalties over each row's new tokens (those after prompt_length):
    score - presence * [count > 0] - frequency * count."""

    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = scores.copy()
        for row in range(ids.shape[0]):
            counts = np.bincount(ids[row, prompt_length:], minlength=scores.shape[-1])[: scores.shape[-1]]
            scores[row] -= (presence * (counts > 0) + frequency * counts).astype(np.float32)
        return scores

    return apply


def repetition_penalty(penalty: float, padding: np.ndarray | None) -> Processor:
    """Tokens a row has seen are penalised: positive scores divided, negative multiplied. A left-padded prompt's pads
    are not seen (transformers skips them by the attention mask): padding[row] is the row's count of them."""

    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        pads = _per_hypothesis(padding, ids.shape[0]) if padding is not None else np.zeros(ids.shape[0], dtype=np.int64)
        scores = scores.copy()
        for row in range(ids.shape[0]):
            seen = ids[row, int(pads[row]):]
            seen = np.unique(seen[seen < scores.shape[1]])
            chosen = scores[row, seen]
            scores[row, seen] = np.where(chosen < 0, chosen * np.float32(penalty), chosen / np.float32(penalty))
        return scores

    return apply


def encoder_repetition_penalty(penalty: float, encoder_ids: np.ndarray) -> Processor:
    inverse = np.float32(1.0 / penalty)

    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        sources = _per_hypothesis(encoder_ids, scores.shape[0])
        scores = scores.copy()
        for row in range(scores.shape[0]):
            chosen = np.take(scores[row], sources[row])
            scores[row, sources[row]] = np.where(chosen < 0, chosen * inverse, chosen / inverse)
        return scores

    return apply


def no_repeat_ngram(n: int) -> Processor:
    """Tokens that would complete an n-gram already in the row (its prompt and pads included, as transformers)."""

    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        length = ids.shape[1]
        if length < n:
            return scores
        scores = scores.copy()
        for row in range(ids.shape[0]):
            seq = ids[row].tolist()
            tail = tuple(seq[length - n + 1:]) if n > 1 else ()
            banned = {seq[i + n - 1] for i in range(length - n + 1) if tuple(seq[i:i + n - 1]) == tail}
            scores[row, [t for t in banned if t < scores.shape[1]]] = -np.inf
        return scores

    return apply


def encoder_no_repeat_ngram(n: int, encoder_ids: np.ndarray) -> Processor:
    """Tokens that would repeat an n-gram of the row's source."""
    grams = []
    for source in encoder_ids.tolist():
        table: dict[tuple[int, ...], list[int]] = {}
        for i in range(len(source) - n + 1):
            table.setdefault(tuple(source[i:i + n - 1]), []).append(source[i + n - 1])
        grams.append(table)

    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        beams = scores.shape[0] // len(grams)
        length = ids.shape[1]
        scores = scores.copy()
        for row in range(scores.shape[0]):
            tail = tuple(ids[row, length + 1 - n:length].tolist()) if n > 1 else ()
            banned = grams[row // beams].get(tail, [])
            scores[row, banned] = -np.inf
        return scores

    return apply


def sequence_bias(biases: dict[tuple[int, ...], float], vocab_size: int) -> Processor:
    """A bias added to a sequence's last token when the row ends with the rest of it (every step for one token);
    -inf for bad words."""
    for sequence in biases:
        if vocab_size and any(t >= vocab_size for t in sequence):
            raise KvgraphError(f"sequence_bias / bad_words_ids: token {max(sequence)} is outside the vocabulary [0, {vocab_size})")

    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        bias = np.zeros_like(scores)
        for sequence, value in biases.items():
            *prefix, last = sequence
            if len(sequence) == 1:
                bias[:, last] += value
            elif len(prefix) <= ids.shape[1]:
                rows = (ids[:, ids.shape[1] - len(prefix):] == np.array(prefix)).all(axis=1)
                bias[rows, last] += value
        return scores + bias

    return apply


def eos_barred_until(condition: Callable[[np.ndarray], bool], eos: np.ndarray) -> Processor:
    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if not condition(ids):
            return scores
        scores = scores.copy()
        scores[:, eos[eos < scores.shape[1]]] = -np.inf
        return scores

    return apply


def forced_at(condition: Callable[[np.ndarray], bool], tokens: list[int]) -> Processor:
    """At the step where `condition` holds, only `tokens` are possible (score 0, the rest -inf)."""

    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if not condition(ids):
            return scores
        forced = np.full_like(scores, -np.inf)
        forced[:, tokens] = 0.0
        return forced

    return apply


def remove_invalid(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    info = np.finfo(scores.dtype)
    return np.nan_to_num(scores, nan=0.0, posinf=info.max, neginf=info.min)


def exponential_decay(start: int, factor: float, eos: np.ndarray) -> Processor:
    """Past `start` (prompt length included), eos scores grow by |score| * (factor ** (length - start) - 1)."""

    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        length = ids.shape[1]
        if length <= start:
            return scores
        scores = scores.copy()
        chosen = scores[:, eos]
        penalty = np.abs(chosen) * np.float32(factor ** (length - start) - 1)
        scores[:, eos] = chosen + np.where(np.isfinite(chosen), penalty, 0.0).astype(np.float32)
        return scores

    return apply


def suppressed_when(condition: Callable[[np.ndarray], bool], tokens: tuple[int, ...]) -> Processor:
    def apply(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if not condition(ids):
            return scores
        scores = scores.copy()
        scores[:, [t for t in tokens if t < scores.shape[1]]] = -np.inf
        return scores

    return apply


def _per_hypothesis(per_prompt: np.ndarray, rows: int) -> np.ndarray:
    """A per-prompt array repeated for beams (B*k rows), as transformers' repeat_interleave."""
    return np.repeat(per_prompt, rows // per_prompt.shape[0], axis=0) if rows > per_prompt.shape[0] else per_prompt
