"""The two steps of generation over onnxruntime, with the cache kept as OrtValues on the device.

    prefill(graphs, input_ids, attention_mask)            -> (logits, cache)
    decode_one(graphs, cache, tokens, attention_mask)     -> (logits, cache)
    extend(graphs, cache, tokens, attention_mask)         -> (logits, cache)   (several new tokens)

Inputs and outputs are bound with IOBinding: each step's presents stay on the session's device
and are bound as the next step's pasts as they are, with no numpy round trip of K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..graphs.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS
from ..graphs.conventions import extend_position_ids, prefill_position_ids
from .session import Device, LoadedGraphs


@dataclass
class KVCache:
    """past.{i}.key / past.{i}.value of every layer, in contract order, each (B, Hkv, P, D)."""

    values: list[ort.OrtValue]
    device: Device

    @property
    def length(self) -> int:
        return self.values[0].shape()[2] if self.values else 0

    def truncated(self, length: int) -> KVCache:
        """The first `length` positions only (a copy), e.g. to rewind a conversation."""
        if length == self.length:
            return self
        kept = [np.ascontiguousarray(v.numpy()[:, :, :length]) for v in self.values]
        return KVCache([ort.OrtValue.ortvalue_from_numpy(a, self.device.ort_type, self.device.index) for a in kept], self.device)


def prefill(graphs: LoadedGraphs, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache]:
    # input_ids, attention_mask: (B, S) int64 -> logits (B, 1, V) (or (B, S, V)), cache of length S
    feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: prefill_position_ids(attention_mask)}
    return _run(graphs, "prefill", feeds, past=None)


def decode_one(graphs: LoadedGraphs, cache: KVCache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache]:
    # tokens: (B, 1); attention_mask: (B, P+1) including the new token -> logits (B, 1, V), cache of length P+1
    return _after_past(graphs, "decode", cache, tokens, attention_mask)


def extend(graphs: LoadedGraphs, cache: KVCache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache]:
    # tokens: (B, Q); attention_mask: (B, P+Q) including the new tokens -> logits (B, 1, V), cache of length P+Q
    return _after_past(graphs, "extend", cache, tokens, attention_mask)


def _after_past(graphs: LoadedGraphs, graph: str, cache: KVCache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache]:
    if attention_mask.shape[1] != cache.length + tokens.shape[1]:
        raise ValueError(f"{graph} expects attention_mask of shape (B, {cache.length + tokens.shape[1]}), got {attention_mask.shape}")
    positions = extend_position_ids(attention_mask, tokens.shape[1])
    feeds = {INPUT_IDS: tokens, ATTENTION_MASK: attention_mask, POSITION_IDS: positions}
    return _run(graphs, graph, feeds, past=cache)


def _run(graphs: LoadedGraphs, graph: str, feeds: dict[str, np.ndarray], past: KVCache | None) -> tuple[np.ndarray, KVCache]:
    session = graphs.session(graph)
    device = graphs.device
    binding = session.io_binding()
    arrays = {name: np.ascontiguousarray(array, dtype=np.int64) for name, array in feeds.items()}  # alive until run
    for name, array in arrays.items():
        binding.bind_cpu_input(name, array)
    if past is not None:
        for name, value in zip(graphs.contract.past_names(), past.values):
            binding.bind_ortvalue_input(name, value)
    binding.bind_output(LOGITS, "cpu")  # sampling happens on the host
    for name in graphs.contract.present_names():
        binding.bind_output(name, device.ort_type, device.index)
    session.run_with_iobinding(binding)
    outputs = binding.get_outputs()
    return outputs[0].numpy(), KVCache(list(outputs[1:]), device)
