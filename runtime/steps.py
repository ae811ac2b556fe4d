"""The two steps of generation over onnxruntime, with the cache kept as OrtValues on the device.

    prefill(graphs, input_ids, attention_mask)            -> (logits, cache)
    decode_one(graphs, cache, tokens, attention_mask)     -> (logits, cache)
    extend(graphs, cache, tokens, attention_mask)         -> (logits, cache)   (several new tokens)

Inputs and outputs are bound with IOBinding: each step's presents stay on the session's device
and are bound as the next step's pasts as they are, with no numpy round trip of K/V.

A static-cache export (manifest contract.cache == "static") takes the same calls: its StaticCache
holds (B, Hkv, N, D) buffers that are bound as both past and present, so TensorScatter writes the
new positions in place; the decode step's binding is built once and reused every step (all
inputs are OrtValues on the device, as CUDA graph capture requires).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..graphs.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, WRITE_INDICES
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


class StaticCache:
    """Fixed (B, Hkv, N, D) buffers on the device plus the (B, N) mask; `length` positions are written."""

    def __init__(self, graphs: LoadedGraphs, batch: int) -> None:
        contract, device = graphs.contract, graphs.device
        shape = (batch, contract.num_kv_heads, contract.max_length, contract.head_dim)  # (B, Hkv, N, D)
        # zeros, not uninitialized memory: the attention reads every position (masked ones too),
        # and a NaN left in freed memory would turn the masked scores into NaN
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=contract.dtype), device.ort_type, device.index)
                       for _ in contract.cache_slots()]
        self.device = device
        self.length = 0
        self.mask = np.zeros((batch, contract.max_length), dtype=np.int64)  # (B, N)
        self._decode: _StaticDecode | None = None

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def truncated(self, length: int) -> StaticCache:
        """Keep the first `length` positions: the rest is overwritten by later steps (no copy)."""
        self.length = min(self.length, length)
        self.mask[:, self.length:] = 0
        return self


def prefill(graphs: LoadedGraphs, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache | StaticCache]:
    # input_ids, attention_mask: (B, S) int64 -> logits (B, 1, V) (or (B, S, V)), cache of length S
    if graphs.contract.static:
        return _static_write(graphs, new_static_cache(graphs, input_ids.shape[0]), input_ids, attention_mask)
    feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: prefill_position_ids(attention_mask)}
    return _run(graphs, "prefill", feeds, past=None)


def decode_one(graphs: LoadedGraphs, cache: KVCache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache]:
    # tokens: (B, 1); attention_mask: (B, P+1) including the new token -> logits (B, 1, V), cache of length P+1
    return _after_past(graphs, "decode", cache, tokens, attention_mask)


def extend(graphs: LoadedGraphs, cache: KVCache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache]:
    # tokens: (B, Q); attention_mask: (B, P+Q) including the new tokens -> logits (B, 1, V), cache of length P+Q
    return _after_past(graphs, "extend", cache, tokens, attention_mask)


def _after_past(graphs: LoadedGraphs, graph: str, cache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache]:
    if attention_mask.shape[1] != cache.length + tokens.shape[1]:
        raise ValueError(f"{graph} expects attention_mask of shape (B, {cache.length + tokens.shape[1]}), got {attention_mask.shape}")
    if isinstance(cache, StaticCache):
        if graph == "decode":
            return _static_decode(graphs, cache, tokens, attention_mask)
        return _static_write(graphs, cache, tokens, attention_mask)  # extend = prefill at write index P
    positions = extend_position_ids(attention_mask, tokens.shape[1])
    feeds = {INPUT_IDS: tokens, ATTENTION_MASK: attention_mask, POSITION_IDS: positions}
    return _run(graphs, graph, feeds, past=cache)


def _run(graphs: LoadedGraphs, graph: str, feeds: dict[str, np.ndarray], past: KVCache | None) -> tuple[np.ndarray, KVCache]:
    on_device = dict(zip(graphs.contract.past_names(), past.values)) if past is not None else {}
    logits, presents = run_graph(graphs, graph, feeds, on_device, graphs.contract.present_names())
    return logits, KVCache(presents, graphs.device)


def run_graph(graphs: LoadedGraphs, graph: str, host: dict[str, np.ndarray], on_device: dict[str, ort.OrtValue],
              outputs: list[str], aliased: list[tuple[str, str, ort.OrtValue]] = ()) -> tuple[np.ndarray, list[ort.OrtValue]]:
    """One run through IOBinding: int64 host inputs and device OrtValue inputs; logits to the host,
    `outputs` left on the device; `aliased` (input, output, buffer) static-cache buffers updated in place."""
    session = graphs.session(graph)
    binding = session.io_binding()
    arrays = {name: np.ascontiguousarray(array, dtype=np.int64) for name, array in host.items()}  # alive until run
    for name, array in arrays.items():
        binding.bind_cpu_input(name, array)
    for name, value in on_device.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output(LOGITS, "cpu")  # first: get_outputs() follows the binding order; sampling runs on the host
    for name in outputs:
        binding.bind_output(name, graphs.device.ort_type, graphs.device.index)
    for past, present, buffer in aliased:
        binding.bind_ortvalue_input(past, buffer)
        binding.bind_ortvalue_output(present, buffer)  # the same buffer: written in place
    session.run_with_iobinding(binding)
    logits, *rest = binding.get_outputs()
    return logits.numpy(), rest[: len(outputs)]


def aliased(graphs: LoadedGraphs, cache: StaticCache) -> list[tuple[str, str, ort.OrtValue]]:
    """(past name, present name, buffer) for every static buffer: bound as input and output both."""
    return list(zip(graphs.contract.past_names(), graphs.contract.present_names(), cache.values))


def new_static_cache(graphs: LoadedGraphs, batch: int) -> StaticCache:
    """A fresh cache; under cuda_graph the batch size's pooled one, rewound (its addresses were captured)."""
    if not graphs.cuda_graph:
        return StaticCache(graphs, batch)
    if batch not in graphs.pool:
        graphs.pool[batch] = StaticCache(graphs, batch)
    return graphs.pool[batch].truncated(0)


def check_room(cache: StaticCache, new: int) -> None:
    if cache.length + new > cache.capacity:
        raise ValueError(f"the static cache holds {cache.capacity} positions; {cache.length} are used and {new} more do not fit")


def _static_write(graphs: LoadedGraphs, cache: StaticCache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, StaticCache]:
    """The prefill graph writes Q tokens at write index `cache.length` (0 for a prompt)."""
    check_room(cache, tokens.shape[1])
    end = cache.length + tokens.shape[1]
    cache.mask[:, :end] = attention_mask
    feeds = {INPUT_IDS: tokens, ATTENTION_MASK: cache.mask, POSITION_IDS: extend_position_ids(attention_mask, tokens.shape[1]),
             WRITE_INDICES: np.full(tokens.shape[0], cache.length, dtype=np.int64)}
    logits, _ = run_graph(graphs, "prefill", feeds, {}, [], aliased(graphs, cache))
    cache.length = end
    return logits, cache


class _StaticDecode:
    """The decode step's binding for one StaticCache: built once, its inputs updated in place each step."""

    def __init__(self, graphs: LoadedGraphs, cache: StaticCache) -> None:
        contract, device = graphs.contract, graphs.device
        batch = cache.mask.shape[0]
        self.session = graphs.session("decode")
        self.binding = self.session.io_binding()

        def on_device(array: np.ndarray) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_numpy(array, device.ort_type, device.index)

        self.inputs = {
            INPUT_IDS: on_device(np.zeros((batch, 1), dtype=np.int64)),
            ATTENTION_MASK: on_device(cache.mask),
            POSITION_IDS: on_device(np.zeros((batch, 1), dtype=np.int64)),
            WRITE_INDICES: on_device(np.zeros(batch, dtype=np.int64)),
        }
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for past, present, value in aliased(graphs, cache):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((batch, 1, contract.vocab_size), np.dtype(contract.dtype).type,
                                                                device.ort_type, device.index)
        self.binding.bind_ortvalue_output(LOGITS, self.logits)
        self.run_options = ort.RunOptions()
        if graphs.cuda_graph:  # one captured graph per batch size (ids start at 1; -1 means "no capture")
            self.run_options.add_run_config_entry("gpu_graph_id", str(batch))

    def run(self, cache: StaticCache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.inputs[INPUT_IDS].update_inplace(np.ascontiguousarray(tokens, dtype=np.int64))
        self.inputs[ATTENTION_MASK].update_inplace(cache.mask)
        self.inputs[POSITION_IDS].update_inplace(np.ascontiguousarray(positions, dtype=np.int64))
        self.inputs[WRITE_INDICES].update_inplace(np.full(cache.mask.shape[0], cache.length, dtype=np.int64))
        self.session.run_with_iobinding(self.binding, self.run_options)
        return self.logits.numpy()


def _static_decode(graphs: LoadedGraphs, cache: StaticCache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, StaticCache]:
    check_room(cache, 1)
    cache.mask[:, : cache.length + 1] = attention_mask
    if cache._decode is None:
        cache._decode = _StaticDecode(graphs, cache)
    logits = cache._decode.run(cache, tokens, extend_position_ids(attention_mask, 1))
    cache.length += 1
    return logits, cache
