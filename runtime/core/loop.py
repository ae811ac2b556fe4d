"""The token loop over a batch: sample, append, check each row's stop conditions, step again.

Rows stop on their own (eos id, a stop string, or max_new_tokens); a finished row is fed the pad
token from then on and its tokens and text no longer change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np

from kvgraph.runtime.core import processors
from kvgraph.runtime.core.processors import Context
from kvgraph.runtime.core.sampling import Sampling, TokenLogprob, draw, masked, token_logprob

Step = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (tokens (B, 1), mask (B, P+1)) -> logits (B, V)


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0  # eos cannot be chosen before this many new tokens (Hugging Face's min_new_tokens)
    logprobs: int | None = None  # record each new token's log-probability and this many top alternatives (None: none)


@dataclass
class RowState:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "stop" or "length" once finished
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when its request asks for them

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Vocabulary(Protocol):
    eos_ids: frozenset[int]
    pad_id: int

    def text_of(self, token_ids: list[int]) -> str: ...

    def decoder_prefix(self, request: Request) -> list[int]: ...  # what the decoder saw before the first new token


class BatchRun:
    """Iterate to run; yields (row, token) after each token is appended and the row checked."""

    def __init__(self, requests: list[Request], first_logits: np.ndarray, mask: np.ndarray, step: Step,
                 sampling: Sampling, vocab: Vocabulary, constraint=None, speculation=None,
                 sequences: np.ndarray | None = None, sources: np.ndarray | None = None) -> None:
        """sequences: what the decoder has seen, (B, L) as transformers' input_ids (a decoder-only batch: the left-padded
        prompts; default: each request's decoder prefix); sources: an encoder-decoder's padded sources (B, S)."""
        self.requests = requests
        self.speculation = speculation  # speculative decoding's stepper: its drafted / accepted counts go into the results
        self.logits = first_logits  # (B, V) for the next token of every row
        self.mask = mask  # (B, P) attention mask of everything fed so far
        self.step = step
        self.sampling = sampling
        self.vocab = vocab
        self.rows = [RowState() for _ in requests]
        self.matchers = [constraint.matcher() for _ in requests] if constraint is not None else None  # structured output
        self.sequences = sequences if sequences is not None else np.array([vocab.decoder_prefix(r) for r in requests], dtype=np.int64)
        self.processors = processors.build(sampling, self._context(sources, first_logits.shape[-1]))
        self.decode_seconds = 0.0
        self.decode_steps = 0

    def _context(self, sources: np.ndarray | None, vocab_size: int) -> Context:
        first = self.requests[0]
        length = self.sequences.shape[1]
        padding = None if sources is not None else np.array([length - len(r.prompt_ids) for r in self.requests], dtype=np.int64)
        return Context(tuple(sorted(self.vocab.eos_ids)), length, length + first.max_new_tokens, first.min_new_tokens, sources, padding,
                       vocab_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng(self.sampling.seed)
        while True:
            chosen = self._choose(rng)
            for b, row in enumerate(self.rows):
                if not row.finished:
                    if self.requests[b].logprobs is not None:
                        row.logprobs.append(token_logprob(self.logits[b], int(chosen[b]), self.requests[b].logprobs))
                    self._append(b, int(chosen[b]))
                    yield b, int(chosen[b])
            if all(row.finished for row in self.rows):
                break
            feed = np.array([[self.vocab.pad_id if row.finished else row.tokens[-1]] for row in self.rows], dtype=np.int64)
            self.sequences = np.concatenate([self.sequences, feed], axis=1)
            self.mask = np.concatenate([self.mask, np.ones_like(feed)], axis=1)
            start = time.perf_counter()
            self.logits = self.step(feed, self.mask)
            self.decode_seconds += time.perf_counter() - start
            self.decode_steps += 1
        for row in self.rows:
            if row.finish_reason != "stop":
                row.text = self.vocab.text_of(row.tokens)

    def _choose(self, rng: np.random.Generator) -> np.ndarray:
        """(B,) next tokens: the processors (processors.py), the grammar's mask, then argmax or the warpers and a draw."""
        if self.sampling.greedy and not self.processors.active and self.matchers is None:
            return self.logits.argmax(axis=-1).astype(np.int64)  # the hot path: no copy of (B, V)
        scores = self._allowed(self.processors.process(self.sequences, self.logits))
        if self.sampling.greedy:
            return scores.argmax(axis=-1).astype(np.int64)
        return draw(self.processors.warp(self.sequences, scores), rng)

    def _allowed(self, logits: np.ndarray) -> np.ndarray:
        """Structured output: each row's grammar mask (decoding/constrained.py, through sampling.masked). Where it leaves nothing (the grammar is
        complete, only eos fits, and min_new_tokens bars eos), the grammar wins."""
        if self.matchers is None:
            return logits
        out = masked(logits, [None if row.finished else m for row, m in zip(self.rows, self.matchers)])
        stuck = [b for b, row in enumerate(self.rows) if not row.finished and np.isneginf(out[b]).all()]
        if stuck:
            out[stuck] = masked(self.logits[stuck], [self.matchers[b] for b in stuck])
        return out

    def run(self) -> BatchRun:
        for _ in self:
            pass
        return self

    def _append(self, b: int, token: int) -> None:
        row, request = self.rows[b], self.requests[b]
        row.tokens.append(token)
        if self.matchers is not None:
            self.matchers[b].feed(token)
        if token in self.vocab.eos_ids or (self.matchers is not None and self.matchers[b].done):
            row.finish_reason = "eos"
        elif request.stop and self._cut_at_stop(row, request.stop):
            row.finish_reason = "stop"
        elif len(row.tokens) >= request.max_new_tokens:
            row.finish_reason = "length"

    def _cut_at_stop(self, row: RowState, stops: tuple[str, ...]) -> bool:
        text = self.vocab.text_of(row.tokens)
        hits = [text.find(s) for s in stops if s and s in text]
        if not hits:
            return False
        row.text = text[: min(hits)]  # text is cut before the stop string
        return True
