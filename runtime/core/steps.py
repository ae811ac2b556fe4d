"""The steps of generation over onnxruntime, with the cache kept as OrtValues on the device.

    prefill(graphs, input_ids, attention_mask)            -> (logits, cache)
    decode_one(graphs, cache, tokens, attention_mask)     -> (logits, cache)
    extend(graphs, cache, tokens, attention_mask)         -> (logits, cache)   (several new tokens)
    run_step(graphs, cache, role, tokens, mask, other)    -> (logits, cache, kept outputs)   any of them

Which graph runs and what it is fed (ids, masks, positions, write indices) comes from the contract's
step adapter (graphs/modes.py). What differs at run time between cache modes is only where the K/V
live, and that is the cache object:

- KVCache (dynamic): each step's presents stay on the device and are bound as the next step's
  pasts as they are, with no numpy round trip of K/V.
- StaticCache: (B, Hkv, N, D) buffers bound as both past and present, so TensorScatter writes the
  new positions in place; the decode step's binding is built once and reused every step (all its
  inputs are OrtValues on the device, as CUDA graph capture requires).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from kvgraph.graphs.contract import INPUT_IDS, LOGITS
from kvgraph.graphs.reorder import BEAM_INDEX, reordered_names
from kvgraph.runtime.core.session import Device, LoadedGraphs

Kept = dict[str, ort.OrtValue]  # outputs besides logits and the cache (seq2seq prefill: cross K/V)


@dataclass
class KVCache:
    """past.{i}.key / past.{i}.value of every layer, in contract order, each (B, Hkv, P, D)."""

    values: list[ort.OrtValue]
    device: Device

    @property
    def length(self) -> int:
        return self.values[0].shape()[2] if self.values else 0

    def reusable(self, length: int) -> int:
        """How many of the first `length` positions stay usable after rewinding to them: all."""
        return length

    def truncated(self, length: int) -> KVCache:
        """The first `length` positions only (a copy), e.g. to rewind a conversation."""
        if length == self.length:
            return self
        kept = [np.ascontiguousarray(v.numpy()[:, :, :length]) for v in self.values]
        return KVCache([ort.OrtValue.ortvalue_from_numpy(a, self.device.ort_type, self.device.index) for a in kept], self.device)

    def run(self, graphs: LoadedGraphs, role: str, host: dict[str, np.ndarray], other: Kept) -> tuple[np.ndarray, KVCache, Kept]:
        contract, graph = graphs.contract, graphs.graph_for(role)
        names = graphs.steps.device_outputs(graph)
        values = self.values or self._empty(graphs, graph, host[INPUT_IDS].shape[0])
        on_device = {**dict(zip(contract.past_names(), values)), **other}
        logits, values = run_graph(graphs, graph, host, on_device, names)
        outputs = dict(zip(names, values))
        presents = [outputs.pop(name) for name in contract.present_names()]
        return logits, KVCache(presents, self.device), outputs


    def reordered(self, graphs: LoadedGraphs, index: np.ndarray) -> KVCache:
        """Row r := row index[r] of every tensor (beam search), on the device."""
        return KVCache(reorder_rows(graphs, self.values, index), self.device)

    def _empty(self, graphs: LoadedGraphs, graph: str, batch: int) -> list[ort.OrtValue]:
        """A prompt's past when its graph takes one (one-session: extend after nothing): (B, Hkv, 0, D) each."""
        inputs, _ = graphs.contract.graph_io(graph)
        if not any(spec.name == graphs.contract.past_names()[0] for spec in inputs):
            return []
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(graphs.contract.cache_shape(kind, batch, 0), dtype=graphs.contract.dtype),
                                                 self.device.ort_type, self.device.index) for _, kind in graphs.contract.cache_slots()]


class StaticCache:
    """Fixed (B, Hkv, N, D) buffers on the device; `length` positions are written."""

    def __init__(self, graphs: LoadedGraphs, batch: int) -> None:
        contract, device = graphs.contract, graphs.device
        # zeros, not uninitialized memory: the attention reads every position (masked ones too),
        # and a NaN left in freed memory would turn the masked scores into NaN
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=contract.dtype), device.ort_type, device.index)
                       for shape in graphs.steps.cache.buffer_shapes(contract, batch)]  # (B, Hkv, N, D) each
        self.device = device
        self.batch = batch
        self.length = 0
        self.rings = bool(contract.ring_windows)
        self._decode: BoundDecode | None = None
        self._spare: list[ort.OrtValue] | None = None  # beam search: the second buffer set a reorder writes into
        self._spare_decode: BoundDecode | None = None

    def reusable(self, length: int) -> int:
        """How many of the first `length` positions stay usable after rewinding to them. A ring of W has
        written position p over p - W: after a rewind of k positions the next query needs p - W + 1 ... p - 1
        again, intact only for k <= 1; a longer rewind of a cache with rings starts over (0)."""
        return length if not self.rings or self.length - length <= 1 else 0

    def truncated(self, length: int) -> StaticCache:
        """Keep the first `length` positions: the rest is overwritten by later steps (no copy)."""
        self.length = min(self.length, length)
        return self

    def reordered(self, graphs: LoadedGraphs, index: np.ndarray) -> StaticCache:
        """Row r := row index[r] of every buffer (beam search): written into a second buffer set on the
        device, which becomes the cache (the first is kept for the next reorder)."""
        if self._spare is None:
            self._spare = [ort.OrtValue.ortvalue_from_numpy(np.zeros(v.shape(), dtype=graphs.contract.dtype), self.device.ort_type,
                                                            self.device.index) for v in self.values]
        reorder_rows(graphs, self.values, index, self._spare)
        self.values, self._spare = self._spare, self.values
        self._decode, self._spare_decode = self._spare_decode, self._decode  # each buffer set keeps its own binding
        return self

    def aliased(self, graphs: LoadedGraphs) -> list[tuple[str, str, ort.OrtValue]]:
        """(past name, present name, buffer) for every buffer: bound as input and output both."""
        return list(zip(graphs.contract.past_names(), graphs.contract.present_names(), self.values))

    def run(self, graphs: LoadedGraphs, role: str, host: dict[str, np.ndarray], other: Kept) -> tuple[np.ndarray, StaticCache, Kept]:
        graph = graphs.graph_for(role)
        names = graphs.steps.device_outputs(graph)
        if role == "decode" and not names:
            if self._decode is None:
                self._decode = BoundDecode(graphs, graph, self, host, other)
            logits, kept = self._decode.run(host), {}
        else:
            logits, values = run_graph(graphs, graph, host, other, names, self.aliased(graphs))
            kept = dict(zip(names, values))
        self.length += host[INPUT_IDS].shape[1]
        return logits, self, kept


def new_cache(graphs: LoadedGraphs, batch: int) -> KVCache | StaticCache:
    """An empty cache of the export's mode; under cuda_graph the batch size's pooled buffers, rewound."""
    if not graphs.steps.cache.aliased:
        return KVCache([], graphs.device)
    if not graphs.cuda_graph:
        return StaticCache(graphs, batch)
    if batch not in graphs.pool:  # replays reuse the captured addresses: one set of buffers per batch size
        graphs.pool[batch] = StaticCache(graphs, batch)
    return graphs.pool[batch].truncated(0)


def run_step(graphs: LoadedGraphs, cache, role: str, tokens: np.ndarray, mask: np.ndarray,
             other: Kept | None = None) -> tuple[np.ndarray, KVCache | StaticCache, Kept]:
    # tokens (B, Q); mask: the decoder's (B, P + Q) or an encoder-decoder's source mask (B, Se)
    host = graphs.steps.host_feeds(role, tokens, mask, cache.length)
    return cache.run(graphs, role, host, other or {})


def prefill(graphs: LoadedGraphs, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache | StaticCache]:
    # input_ids, attention_mask: (B, S) int64 -> logits (B, 1, V) (or (B, S, V)), cache of length S
    logits, cache, _ = run_step(graphs, new_cache(graphs, input_ids.shape[0]), "prefill", input_ids, attention_mask)
    return logits, cache


def decode_one(graphs: LoadedGraphs, cache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache | StaticCache]:
    # tokens: (B, 1); attention_mask: (B, P+1) including the new token -> logits (B, 1, V), cache of length P+1
    logits, cache, _ = run_step(graphs, cache, "decode", tokens, attention_mask)
    return logits, cache


def extend(graphs: LoadedGraphs, cache, tokens: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, KVCache | StaticCache]:
    # tokens: (B, Q); attention_mask: (B, P+Q) including the new tokens -> logits (B, 1, V), cache of length P+Q
    logits, cache, _ = run_step(graphs, cache, "extend", tokens, attention_mask)
    return logits, cache


def reorder_rows(graphs: LoadedGraphs, values: list[ort.OrtValue], index: np.ndarray,
                 into: list[ort.OrtValue] | None = None) -> list[ort.OrtValue]:
    """Every cache tensor's rows picked by index (R,), by the reorder graph on the cache's device; written
    into `into` (same shapes) when given, else into new device tensors."""
    session, device = graphs.reorder_session, graphs.device
    binding = session.io_binding()
    index = np.ascontiguousarray(index, dtype=np.int64)
    binding.bind_cpu_input(BEAM_INDEX, index)
    for name, value in zip(graphs.contract.past_names(), values):
        binding.bind_ortvalue_input(name, value)
    for position, name in enumerate(reordered_names(graphs.contract)):
        if into is None:
            binding.bind_output(name, device.ort_type, device.index)
        else:
            binding.bind_ortvalue_output(name, into[position])
    session.run_with_iobinding(binding)
    return into if into is not None else binding.get_outputs()


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


class BoundDecode:
    """The decode step's binding for one StaticCache: built once, its host inputs updated in place each step."""

    def __init__(self, graphs: LoadedGraphs, graph: str, cache: StaticCache, host: dict[str, np.ndarray], other: Kept) -> None:
        contract, device = graphs.contract, graphs.device
        self.session = graphs.session(graph)  # decode, or under one-session prefill at Q = 1
        self.binding = self.session.io_binding()
        self.inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.int64), device.ort_type, device.index)
                       for name, array in host.items()}
        for name, value in {**self.inputs, **other}.items():  # other: seq2seq cross K/V, the same every step
            self.binding.bind_ortvalue_input(name, value)
        for past, present, value in cache.aliased(graphs):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((cache.batch, 1, contract.vocab_size), np.dtype(contract.dtype).type,
                                                                device.ort_type, device.index)
        self.binding.bind_ortvalue_output(LOGITS, self.logits)
        self.run_options = ort.RunOptions()
        if graphs.cuda_graph:  # one captured graph per batch size (ids start at 1; -1 means "no capture")
            self.run_options.add_run_config_entry("gpu_graph_id", str(cache.batch))

    def run(self, host: dict[str, np.ndarray]) -> np.ndarray:
        for name, array in host.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(array, dtype=np.int64))
        self.session.run_with_iobinding(self.binding, self.run_options)
        return self.logits.numpy()
