"""Torch modules with the graph contract's flat signature, wrapping a Hugging Face causal LM.

    prefill(input_ids, attention_mask, position_ids)          -> (logits, present.0.key, ...)
    decode(input_ids, attention_mask, position_ids, *past)    -> (logits, present.0.key, ...)
    static(input_ids, attention_mask, position_ids, write_indices, *buffers) -> (logits, buffer.0.key, ...)

The cache is a transformers Cache built inside forward from the flat past tensors, so the
traced graph takes and returns plain tensors of layout (B, Hkv, S, D) (or (B, Hkv, N, D) buffers).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvgraph.export.config import attention_layout, text_config
from kvgraph.export.hf_cache import cache_keyword, returned_cache
from kvgraph.export.families import Family
from kvgraph.export.scatter import tensor_scatter


class _CausalLMStep(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, family: Family, logits_to_keep: int) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.logits_to_keep = logits_to_keep  # 0 keeps every position
        self.cache_keyword = cache_keyword(model)

    def _run(self, input_ids, attention_mask, position_ids, cache: DynamicCache) -> tuple[torch.Tensor, ...]:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=self.logits_to_keep,
            **{self.cache_keyword: cache},
            **self.family.forward_kwargs,
        )
        presents = []
        for layer in returned_cache(out).layers:
            presents += [layer.keys, layer.values]  # (B, Hkv, S, D) each
        return (out.logits, *presents)


class PrefillStep(_CausalLMStep):
    def forward(self, input_ids, attention_mask, position_ids):
        # input_ids, attention_mask, position_ids: (B, S) -> logits (B, 1 or S, V), presents (B, Hkv, S, D)
        return self._run(input_ids, attention_mask, position_ids, DynamicCache())  # full layers: windows are masks


class DecodeStep(_CausalLMStep):
    def __init__(self, model: torch.nn.Module, family: Family, logits_to_keep: int = 1) -> None:
        super().__init__(model, family, logits_to_keep)  # 0: every new position (the verify graph's reference)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        # input_ids, position_ids: (B, 1); attention_mask: (B, P+1); past: (B, Hkv, P, D) each
        cache = DynamicCache()  # full layers, also for sliding-window ones: the window is in the mask, the contract keeps P
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        return self._run(input_ids, attention_mask, position_ids, cache)


class ScatterLayer(DynamicLayer):
    """One layer of a static cache: fixed (B, Hkv, N, D) buffers, new K/V written at write_indices."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_indices: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.write_indices = keys, values, write_indices
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states, value_states: (B, Hkv, Q, D) -> the whole buffers, attended under the mask
        self.keys = tensor_scatter(self.keys, key_states, self.write_indices)
        self.values = tensor_scatter(self.values, value_states, self.write_indices)
        return self.keys, self.values


class RingLayer(ScatterLayer):
    """A sliding-window layer of a static cache: (B, Hkv, W, D) rings, position p at slot p mod W.

    The step attends over [ring as it was (W), new keys (Q)] under ring_mask; the ring then takes the
    last min(Q, W) new keys, circularly (ONNX TensorScatter, mode "circular").
    """

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states, value_states: (B, Hkv, Q, D) -> (B, Hkv, W + Q, D) to attend over
        attended = torch.cat([self.keys, key_states], dim=2), torch.cat([self.values, value_states], dim=2)
        window = self.keys.shape[2]
        keys, values = key_states[:, :, -window:], value_states[:, :, -window:]  # what the ring keeps of this step
        start = self.write_indices + (key_states.shape[2] - keys.shape[2])  # (B,)
        self.keys = tensor_scatter(self.keys, keys, start, circular=True)
        self.values = tensor_scatter(self.values, values, start, circular=True)
        return attended


class StaticStep(_CausalLMStep):
    """Q tokens written into fixed-size buffers at each row's write index (prefill: 0; decode: P)."""

    def forward(self, input_ids, attention_mask, position_ids, write_indices, *buffers):
        # input_ids, position_ids: (B, Q); attention_mask: (B, N); write_indices: (B,); buffers: (B, Hkv, N, D)
        length = attention_mask.shape[1]  # N; a ring layer's buffers are shorter (W)
        layers = [(RingLayer if buffers[2 * i].shape[2] < length else ScatterLayer)(buffers[2 * i], buffers[2 * i + 1], write_indices)
                  for i in range(len(buffers) // 2)]
        windows, by_type = attention_layout(text_config(self.model.config), len(layers))
        window = max((w for w in windows if w is not None), default=None)  # the sliding layers' W
        full = static_mask(attention_mask, write_indices, input_ids.shape[1], self.model.config, buffers[0].dtype)
        if window is None:
            sliding = full  # no layer slides: one mask
        elif any(isinstance(layer, RingLayer) for layer in layers):
            sliding = ring_mask(attention_mask, write_indices, input_ids.shape[1], window, self.model.config, buffers[0].dtype)
        else:
            sliding = static_mask(attention_mask, write_indices, input_ids.shape[1], self.model.config, buffers[0].dtype, window)
        if by_type:  # as the model's own forward builds them: one mask per layer type
            mask = {"full_attention": full, "sliding_attention": sliding}
        else:  # every layer attends alike
            mask = sliding if all(w is not None for w in windows) else full
        with self.family.static_step(self.model, attention_mask):
            return self._run(input_ids, mask, position_ids, Cache(layers=layers))


def ring_mask(attention_mask, write_indices, new: int, window: int, config, dtype) -> torch.Tensor:
    """(B, N) padding mask -> (B, 1, Q, W + Q) mask over [ring slots as they were, new keys] of a RingLayer.

    Slot s holds the latest position j_s < w_b with j_s = s (mod W) (none while j_s < 0); new key t
    is position w_b + t. Query q (position w_b + q) sees key position p when p <= w_b + q,
    p > w_b + q - W and the padding mask is 1 at p; and always itself.
    """
    last = write_indices[:, None] - 1  # (B, 1): the last position written before this step
    slots = torch.arange(window, device=attention_mask.device)  # (W,)
    held = last - torch.remainder(last - slots, window)  # (B, W): position in each slot, < 0 when none
    query = write_indices[:, None] + torch.arange(new, device=attention_mask.device)  # (B, Q)
    key = torch.cat([held, query], dim=1)  # (B, W + Q)
    real = torch.gather(attention_mask, 1, key.clamp(min=0)).bool() & (key >= 0)  # (B, W + Q)
    seen = (key[:, None, :] <= query[:, :, None]) & (key[:, None, :] > query[:, :, None] - window) & real[:, None, :]  # (B, Q, W + Q)
    itself = torch.arange(window + new, device=attention_mask.device)[None, :] == (window + torch.arange(new, device=attention_mask.device))[:, None]
    allowed = (seen | itself[None])[:, None]  # (B, 1, Q, W + Q)
    if config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def static_mask(attention_mask, write_indices, new: int, config, dtype, window: int | None = None) -> torch.Tensor:
    """(B, N) padding mask -> (B, 1, Q, N) attention mask over the buffer.

    Query q of row b sits at buffer position w_b + q: it sees the real tokens at positions <= its
    own (and, in a layer with a sliding window W, > its own - W, counted in buffer positions as
    transformers counts cache positions), never the unwritten rest of the buffer. A padded query
    also sees itself, so no row of the softmax is empty (its output is unspecified and masked
    wherever it is used).
    """
    length = attention_mask.shape[1]
    query = write_indices[:, None] + torch.arange(new, device=attention_mask.device)  # (B, Q)
    key = torch.arange(length, device=attention_mask.device)  # (N,)
    causal = key[None, None, :] <= query[:, :, None]  # (B, Q, N)
    if window is not None:
        causal = causal & (key[None, None, :] > query[:, :, None] - window)
    allowed = (causal & attention_mask[:, None, :].bool()) | (key[None, None, :] == query[:, :, None])
    allowed = allowed[:, None]  # (B, 1, Q, N)
    if config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)  # additive, for eager
