"""Beam search over the graphs, step for step as transformers' generate(num_beams=k) does it.

Each prompt gets k rows (the batch is B*k). A step's log-probabilities (log_softmax, then the
processors of runtime/core/processors.py, as transformers applies them) are added to each running beam's score; the best
K = max(2, 1 + number of eos ids) * k candidates of a prompt are kept. Those that end (an eos id, or
the length limit) and rank in the top k go to the prompt's finished hypotheses, scored
sum(log p) / (generated length ** length_penalty); the best k that do not end become the running
beams, and every cache tensor's rows follow them on the device (graphs/reorder.py). The search stops
as transformers' does: early_stopping True once every prompt has k finished hypotheses, False when no
running beam can still beat the worst finished one (at its current length), "never" the same with
the best length a positive length_penalty could reach. Scores are float32, as there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from kvgraph.graphs import KvgraphError
from kvgraph.runtime.core.loop import Request
from kvgraph.runtime.core import processors
from kvgraph.runtime.core.processors import Context
from kvgraph.runtime.core.sampling import Sampling, log_softmax

NEG = np.float32(-1.0e9)


@dataclass(frozen=True)
class BeamOptions:
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, (int, np.integer)) or self.num_beams < 1:
            raise KvgraphError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        n = self.num_return_sequences
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.num_beams:
            raise KvgraphError(f"num_return_sequences must be an integer between 1 and num_beams ({self.num_beams}), got {n!r}")
        if self.early_stopping not in (True, False, "never"):
            raise KvgraphError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) or not np.isfinite(self.length_penalty):
            raise KvgraphError(f"length_penalty must be a finite number, got {self.length_penalty!r}")

    @property
    def search(self) -> bool:
        return self.num_beams > 1

    def refuse(self, sampling: Sampling, requests: list[Request], use_cache: bool) -> None:
        """What beam search here does not combine with: sampling, stop strings, prompts of different budgets."""
        if not sampling.greedy:
            raise KvgraphError("beam search here is deterministic: sampling (temperature > 0) does not combine with num_beams > 1")
        if any(r.stop for r in requests):
            raise KvgraphError("stop strings do not combine with num_beams > 1 (a beam ends at eos or max_new_tokens)")
        if len({(r.max_new_tokens, r.min_new_tokens) for r in requests}) > 1:
            raise KvgraphError("a batch searched with beams shares one max_new_tokens and min_new_tokens")


@dataclass
class Hypotheses:
    """What the search returns per prompt: k finished sequences (generated ids), best first, with their scores."""

    tokens: list[list[list[int]]]  # [prompt][rank] -> generated ids (an ending eos included)
    scores: np.ndarray  # (B, k) float32, length-penalised
    prefill_s: float
    decode_steps: int
    decode_seconds: float


def beam_search(stepper, prompt_ids: np.ndarray, decoder_prompt: np.ndarray, mask: np.ndarray, request: Request,
                sampling: Sampling, options: BeamOptions, eos_ids: frozenset[int], batch: int,
                encoder_decoder: bool = False) -> Hypotheses:
    """prompt_ids / mask: the padded prompts (B, S), already repeated k times (B*k, S), fed to stepper.first;
    decoder_prompt (B*k, P): what the decoder has seen (the prompt itself, or an encoder-decoder's start token).
    The processors (runtime/core/processors.py) run on each step's log-probs, as in transformers."""
    k, eos = options.num_beams, np.array(sorted(eos_ids), dtype=np.int64)
    start = time.perf_counter()
    logits = stepper.first(prompt_ids, mask)
    prefill_s = time.perf_counter() - start
    state = _Search(batch, k, decoder_prompt, request.max_new_tokens, len(eos))
    sources = prompt_ids[::k] if encoder_decoder else None
    padding = None if encoder_decoder else (mask[::k] == 0).sum(axis=1)  # left pads
    context = Context(tuple(eos.tolist()), state.prompt_len, state.max_length, request.min_new_tokens, sources, padding, logits.shape[-1])
    process = processors.build(sampling, context).process
    steps, seconds = 0, 0.0
    while True:
        log_probs = process(state.flat_running(), log_softmax(logits))
        if not state.advance(log_probs, eos, options):
            break
        stepper.reorder(state.reorder_index)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
        start = time.perf_counter()
        logits = stepper.next(state.flat_running()[:, -1:], mask)
        seconds += time.perf_counter() - start
        steps += 1
    return Hypotheses(state.results(), state.scores, prefill_s, steps, seconds)


class _Search:
    """The search state of B prompts x k beams (transformers' _beam_search, in numpy)."""

    def __init__(self, batch: int, k: int, decoder_prompt: np.ndarray, max_new_tokens: int, n_eos: int) -> None:
        self.batch, self.k = batch, k
        self.prompt_len = decoder_prompt.shape[1]
        self.max_length = self.prompt_len + max_new_tokens
        self.keep = max(2, 1 + n_eos) * k  # candidates kept per prompt, so k can go on even if the best k all end
        self.running = np.zeros((batch, k, self.max_length), dtype=np.int64)
        self.running[:, :, : self.prompt_len] = decoder_prompt.reshape(batch, k, -1)
        self.sequences, self.lengths = self.running.copy(), np.full((batch, k), self.prompt_len)
        self.running_scores = np.zeros((batch, k), dtype=np.float32)
        self.running_scores[:, 1:] = NEG  # the first step draws from one row only (all k are the same prompt)
        self.scores = np.full((batch, k), NEG, dtype=np.float32)
        self.finished = np.zeros((batch, k), dtype=bool)
        self.improvable = np.ones((batch, 1), dtype=bool)
        self.cur = self.prompt_len
        self.reorder_index = np.arange(batch * k)

    def flat_running(self) -> np.ndarray:
        return self.running[:, :, : self.cur].reshape(self.batch * self.k, self.cur)

    def advance(self, log_probs: np.ndarray, eos: np.ndarray, options: BeamOptions) -> bool:
        """One step of the search from this step's (B*k, V) processed log-probs; False when it is over."""
        b, k, vocab = self.batch, self.k, log_probs.shape[-1]
        totals = (log_probs.reshape(b, k, vocab) + self.running_scores[:, :, None]).reshape(b, k * vocab)
        top_scores, top = _topk(totals, self.keep)
        source, tokens = top // vocab, top % vocab
        candidates = np.take_along_axis(self.running, source[:, :, None], axis=1)
        candidates[:, :, self.cur] = tokens
        ends = np.isin(tokens, eos) | (self.cur + 1 >= self.max_length)
        # the best k that go on
        going = top_scores + ends.astype(np.float32) * NEG
        chosen = _topk(going, k)[1]
        self.running = np.take_along_axis(candidates, chosen[:, :, None], axis=1)
        self.running_scores = np.take_along_axis(going, chosen, axis=1)
        self.reorder_index = (np.take_along_axis(source, chosen, axis=1) + np.arange(b)[:, None] * k).reshape(-1)
        self._finish(candidates, top_scores, ends, options)
        self.cur += 1
        self._update_improvable(options)
        return bool(self.improvable.any() and not (self.finished.all() and options.early_stopping is True) and not ends.all())

    def _finish(self, candidates: np.ndarray, top_scores: np.ndarray, ends: np.ndarray, options: BeamOptions) -> None:
        """Candidates that end and rank in the top k join the finished hypotheses if they beat the worst ones."""
        just = ends & (np.arange(self.keep) < self.k)[None, :]
        scored = top_scores / np.float32((self.cur + 1 - self.prompt_len) ** options.length_penalty)
        full = self.finished.all(axis=1, keepdims=True) & (options.early_stopping is True)
        scored = scored + full.astype(np.float32) * NEG + (~self.improvable).astype(np.float32) * NEG + (~just).astype(np.float32) * NEG
        merged_scores = np.concatenate([self.scores, scored], axis=1)
        best = _topk(merged_scores, self.k)[1]
        pick = lambda a, b: np.take_along_axis(np.concatenate([a, b], axis=1), best if a.ndim == 2 else best[:, :, None], axis=1)
        self.sequences = pick(self.sequences, candidates)
        self.lengths = pick(self.lengths, np.full(ends.shape, self.cur + 1))
        self.finished = pick(self.finished, just)
        self.scores = np.take_along_axis(merged_scores, best, axis=1)

    def _update_improvable(self, options: BeamOptions) -> None:
        """Can a running beam still beat the worst finished hypothesis? (transformers' heuristic)"""
        if options.early_stopping == "never" and options.length_penalty > 0.0:
            length = self.max_length - self.prompt_len
        else:
            length = self.cur - self.prompt_len
        best_running = self.running_scores[:, :1] / np.float32(length ** options.length_penalty)
        worst_finished = np.where(self.finished, self.scores.min(axis=1, keepdims=True), NEG)
        self.improvable = self.improvable & (best_running > worst_finished).any(axis=1, keepdims=True)

    def results(self) -> list[list[list[int]]]:
        return [[self.sequences[b, j, self.prompt_len: self.lengths[b, j]].tolist() for j in range(self.k)] for b in range(self.batch)]


def _topk(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each row, largest first (ties: the lower index first): (values, indices)."""
    if values.shape[1] > 4 * k:
        part = np.argpartition(-values, k - 1, axis=1)[:, :k]
        order = np.lexsort((part, -np.take_along_axis(values, part, axis=1)), axis=1)
        index = np.take_along_axis(part, order, axis=1)
    else:
        index = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(values, index, axis=1), index
