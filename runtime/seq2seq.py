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

from ..graphs.contract import ATTENTION_MASK, ENCODER_HIDDEN, ENCODER_MASK, INPUT_IDS, WRITE_INDICES
from .session import LoadedGraphs
from .steps import KVCache, StaticCache, aliased, check_room, new_static_cache, run_graph


@dataclass
class Seq2SeqCache:
    self_attention: KVCache | StaticCache  # present.{i}.* of the last step, (B, Hkv, P, D), or (B, Hkv, N, D) buffers
    cross: list[ort.OrtValue]  # cross.{i}.* from prefill, (B, Hkv, Se, D): read-only from then on

    @property
    def length(self) -> int:
        return self.self_attention.length


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
    contract = graphs.contract
    host = {INPUT_IDS: tokens, ENCODER_MASK: source_mask}
    if contract.static:  # the self-attention K/V land in fresh buffers, written in place from index 0
        buffers = new_static_cache(graphs, tokens.shape[0])
        check_room(buffers, tokens.shape[1])
        host[WRITE_INDICES] = np.zeros(tokens.shape[0], dtype=np.int64)
        logits, cross = run_graph(graphs, "prefill", host, {ENCODER_HIDDEN: hidden}, contract.cross_names(), aliased(graphs, buffers))
        buffers.length = tokens.shape[1]
        return logits, Seq2SeqCache(buffers, cross)
    logits, caches = run_graph(graphs, "prefill", host, {ENCODER_HIDDEN: hidden}, [*contract.present_names(), *contract.cross_names()])
    layers = len(contract.present_names())
    return logits, Seq2SeqCache(KVCache(caches[:layers], graphs.device), caches[layers:])


def decode_one(graphs: LoadedGraphs, cache: Seq2SeqCache, tokens: np.ndarray, source_mask: np.ndarray) -> tuple[np.ndarray, Seq2SeqCache]:
    # tokens (B, 1) -> logits (B, 1, V), self K/V grown by one; the cross K/V are bound as they are
    contract = graphs.contract
    host = {INPUT_IDS: tokens, ENCODER_MASK: source_mask}
    if isinstance(cache.self_attention, StaticCache):
        buffers = cache.self_attention
        check_room(buffers, 1)
        host[WRITE_INDICES] = np.full(tokens.shape[0], buffers.length, dtype=np.int64)
        logits, _ = run_graph(graphs, "decode", host, dict(zip(contract.cross_names(), cache.cross)), [], aliased(graphs, buffers))
        buffers.length += 1
        return logits, cache
    on_device = {**dict(zip(contract.past_names(), cache.self_attention.values)), **dict(zip(contract.cross_names(), cache.cross))}
    logits, presents = run_graph(graphs, "decode", host, on_device, contract.present_names())
    return logits, Seq2SeqCache(KVCache(presents, graphs.device), cache.cross)


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
        return logits[:, -1]

    def next(self, tokens: np.ndarray, _decoder_mask: np.ndarray) -> np.ndarray:
        self.decoded = np.concatenate([self.decoded, tokens], axis=1)
        if not self.use_cache:  # recompute: self and cross K/V from scratch, every step
            return prefill(self.graphs, self.decoded, self.hidden, self.source_mask)[0][:, -1]
        logits, self.cache = decode_one(self.graphs, self.cache, tokens, self.source_mask)
        return logits[:, -1]
