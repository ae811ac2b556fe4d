"""Steppers: what the token loop (loop.BatchRun) drives. first(ids, mask) runs the prompt and returns the logits
of every row's next token (B, V); next(tokens, mask) feeds one token a row and returns the next logits;
reorder(index) makes row r continue from row index[r] (beam search).
"""

from __future__ import annotations

import numpy as np

from kvgraph.runtime.core.seq2seq_steps import Seq2SeqSteps
from kvgraph.runtime.core.session import LoadedGraphs
from kvgraph.runtime.core.steps import KVCache, decode_one, prefill


class CachedSteps:
    """prefill once, then one decode step per token, the cache handed over on the device."""

    def __init__(self, graphs: LoadedGraphs, cache: KVCache | None = None) -> None:
        self.graphs = graphs
        self.cache = cache
        self.mask: np.ndarray | None = None  # (B, P): the attention mask of everything fed so far

    def first(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        logits, self.cache = prefill(self.graphs, ids, mask)
        self.mask = mask
        return logits[:, -1]

    def next(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        logits, self.cache = decode_one(self.graphs, self.cache, tokens, mask)
        return logits[:, -1]

    def reorder(self, index: np.ndarray) -> None:
        """Beam search: row r continues from row index[r]; the cache follows on the device."""
        self.cache = self.cache.reordered(self.graphs, index)


class RecomputeSteps(CachedSteps):
    """No cache: every step runs the prefill graph over the whole sequence so far."""

    def first(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.ids, self.mask = ids, mask
        return prefill(self.graphs, ids, mask)[0][:, -1]

    def next(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.ids = np.concatenate([self.ids, tokens], axis=1)
        return prefill(self.graphs, self.ids, mask)[0][:, -1]

    def reorder(self, index: np.ndarray) -> None:
        self.ids = self.ids[index]


STEPPERS = {  # contract kind -> (graphs, use_cache) -> the stepper BatchRun drives
    "decoder": lambda graphs, use_cache: CachedSteps(graphs) if use_cache else RecomputeSteps(graphs),
    "encoder-decoder": lambda graphs, use_cache: Seq2SeqSteps(graphs, graphs.manifest.special_tokens.decoder_start_token_id, use_cache),
}


def stepper_for(graphs: LoadedGraphs, use_cache: bool):
    """The stepper the token loop drives for this export's graph kind: first(ids, mask) prefills, next(tokens, mask) steps."""
    return STEPPERS[graphs.contract.kind](graphs, use_cache)
