"""The encoder-decoder steps over onnxruntime: encode once, compute cross K/V once, then decode.

    encode(graphs, source_ids, source_mask)           -> encoder_hidden_states (OrtValue on the device)
    prefill(graphs, tokens, hidden, source_mask)      -> (logits, Seq2SeqCache)   self K/V + cross K/V
    decode_one(graphs, cache, tokens, source_mask)    -> (logits, Seq2SeqCache)   cross K/V bound, never rewritten

Sources are right-padded (conventions.right_pad); the decoder side is never padded: every row
starts with the decoder start token and rows advance together (finished rows are fed pad).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from kvgraph.graphs.contract import ATTENTION_MASK, ENCODER_HIDDEN, INPUT_IDS
from kvgraph.runtime.core.session import LoadedGraphs
from kvgraph.runtime.core.steps import KVCache, StaticCache, new_cache, run_step


@dataclass
class Seq2SeqCache:
    self_attention: KVCache | StaticCache  # present.{i}.* of the last step, (B, Hkv, P, D), or (B, Hkv, N, D) buffers
    cross: dict[str, ort.OrtValue]  # cross.{i}.* from prefill, (B, Hkv, Se, D): read-only from then on

    @property
    def length(self) -> int:
        return self.self_attention.length

    def reordered(self, graphs: LoadedGraphs, index: np.ndarray) -> Seq2SeqCache:
        """Beam search: the self-attention rows follow their beams; the cross K/V stay (a prompt's rows share its source)."""
        return Seq2SeqCache(self.self_attention.reordered(graphs, index), self.cross)


def encode(graphs: LoadedGraphs, source_ids: np.ndarray, source_mask: np.ndarray) -> ort.OrtValue:
    # (B, Se), (B, Se) int64 -> encoder_hidden_states (B, Se, H), left on the device
    binding = graphs.session("encoder").io_binding()
    arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (source_ids, source_mask)]
    binding.bind_cpu_input(INPUT_IDS, arrays[0])
    binding.bind_cpu_input(ATTENTION_MASK, arrays[1])
    binding.bind_output(ENCODER_HIDDEN, graphs.device.ort_type, graphs.device.index)
    graphs.session("encoder").run_with_iobinding(binding)
    return binding.get_outputs()[0]


def prefill(graphs: LoadedGraphs, tokens: np.ndarray, hidden: ort.OrtValue, source_mask: np.ndarray) -> tuple[np.ndarray, Seq2SeqCache]:
    # tokens (B, S): the decoder start token (and any forced prefix) -> logits (B, 1, V), self K/V of length S, cross K/V
    cache = new_cache(graphs, tokens.shape[0])
    logits, cache, cross = run_step(graphs, cache, "prefill", tokens, source_mask, {ENCODER_HIDDEN: hidden})
    return logits, Seq2SeqCache(cache, cross)


def decode_one(graphs: LoadedGraphs, cache: Seq2SeqCache, tokens: np.ndarray, source_mask: np.ndarray) -> tuple[np.ndarray, Seq2SeqCache]:
    # tokens (B, 1) -> logits (B, 1, V), self K/V grown by one; the cross K/V are bound as they are
    logits, self_attention, _ = run_step(graphs, cache.self_attention, "decode", tokens, source_mask, cache.cross)
    return logits, Seq2SeqCache(self_attention, cache.cross)


class Seq2SeqSteps:
    """Generator's stepper for an encoder-decoder: first() encodes and prefills, next() decodes one token."""

    def __init__(self, graphs: LoadedGraphs, start_token: int, use_cache: bool = True) -> None:
        self.graphs = graphs
        self.start_token = start_token
        self.use_cache = use_cache
        self.cache: Seq2SeqCache | None = None
        self.source_mask: np.ndarray | None = None
        self.hidden: ort.OrtValue | None = None
        self.decoded: np.ndarray | None = None  # decoder ids so far (no-cache mode re-runs prefill over them)

    def first(self, source_ids: np.ndarray, source_mask: np.ndarray) -> np.ndarray:
        self.source_mask = source_mask
        self.hidden = encode(self.graphs, source_ids, source_mask)
        self.decoded = np.full((source_ids.shape[0], 1), self.start_token, dtype=np.int64)
        logits, self.cache = prefill(self.graphs, self.decoded, self.hidden, source_mask)
        self.mask = np.ones_like(self.decoded)  # the decoder's own tokens: never padded
        return logits[:, -1]

    def reorder(self, index: np.ndarray) -> None:
        """Beam search: row r continues from row index[r] (within one prompt's rows)."""
        self.decoded = self.decoded[index]
        if self.use_cache:
            self.cache = self.cache.reordered(self.graphs, index)

    def next(self, tokens: np.ndarray, _decoder_mask: np.ndarray) -> np.ndarray:
        self.decoded = np.concatenate([self.decoded, tokens], axis=1)
        if not self.use_cache:  # recompute: self and cross K/V from scratch, every step
            return prefill(self.graphs, self.decoded, self.hidden, self.source_mask)[0][:, -1]
        logits, self.cache = decode_one(self.graphs, self.cache, tokens, self.source_mask)
        return logits[:, -1]
