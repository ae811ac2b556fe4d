"""Custom torch.onnx translations for what the stock exporter refuses but the model means plainly.

PyTorch's scaled_dot_product_attention broadcasts a single K/V head over all query heads (Falcon's
multi-query attention calls it that way, without enable_gqa); torch.onnx's translation asserts
equal head counts unless enable_gqa is set. One K/V head broadcast is exactly grouped-query
attention with one group, so the call is translated as such: one ONNX Attention op that reads the
single K/V head (no copies per query head).
"""

from __future__ import annotations

from typing import Callable

import torch

try:  # torch's own translation; kvgraph pins torch, and without it the stock table is used unchanged
    from torch.onnx._internal.exporter._torchlib.ops.nn import aten_scaled_dot_product_attention_23 as _stock_sdpa
except ImportError:  # pragma: no cover - another torch release
    _stock_sdpa = None


def _sdpa_broadcasting_kv_heads(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # query: (B, H, Q, D); key, value: (B, Hkv, S, D) with Hkv == H, or Hkv == 1 broadcast over H
    broadcast = key.shape[1] == 1 and query.shape[1] != 1
    return _stock_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa or broadcast)


def custom_translations() -> dict[Callable, Callable]:
    if _stock_sdpa is None:
        return {}
    return {torch.ops.aten.scaled_dot_product_attention.default: _sdpa_broadcasting_kv_heads}
