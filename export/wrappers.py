"""Torch modules with the graph contract's flat signature, wrapping a Hugging Face causal LM.

    prefill(input_ids, attention_mask, position_ids)          -> (logits, present.0.key, ...)
    decode(input_ids, attention_mask, position_ids, *past)    -> (logits, present.0.key, ...)

The cache is a transformers DynamicCache built inside forward from the flat past tensors, so
the traced graph takes and returns plain tensors of layout (B, Hkv, S, D).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from .families import Family


class _CausalLMStep(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, family: Family, logits_to_keep: int) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.logits_to_keep = logits_to_keep  # 0 keeps every position

    def _run(self, input_ids, attention_mask, position_ids, cache: DynamicCache) -> tuple[torch.Tensor, ...]:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=self.logits_to_keep,
            **self.family.forward_kwargs,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]  # (B, Hkv, S, D) each
        return (out.logits, *presents)


class PrefillStep(_CausalLMStep):
    def forward(self, input_ids, attention_mask, position_ids):
        # input_ids, attention_mask, position_ids: (B, S) -> logits (B, 1 or S, V), presents (B, Hkv, S, D)
        return self._run(input_ids, attention_mask, position_ids, DynamicCache(config=self.model.config))


class DecodeStep(_CausalLMStep):
    def __init__(self, model: torch.nn.Module, family: Family) -> None:
        super().__init__(model, family, logits_to_keep=1)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        # input_ids, position_ids: (B, 1); attention_mask: (B, P+1); past: (B, Hkv, P, D) each
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        return self._run(input_ids, attention_mask, position_ids, cache)
