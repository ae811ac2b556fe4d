"""Grouped-query attention without repeat_kv's copies: the Attention op reads the Hkv cached heads itself."""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from kvgraph.graphs.rewrites.graph_edit import drop_unused


# Grouped-query attention, as traced from transformers' repeat_kv, copies every cached key and
# value n_rep times per step before the Attention op (Hkv -> H heads). The standard Attention op
# takes Hkv heads itself (query head h reads key/value head h // n_rep), so the copy can go:
#
#   before:  present (B, Hkv, L, D) ─Unsqueeze(2)─Expand(B, Hkv, n_rep, L, D)─Reshape(B, H, L, D)─▶ Attention
#   after:   present (B, Hkv, L, D) ──────────────────────────────────────────────────────────────▶ Attention
def attend_grouped_heads_directly(model: onnx.ModelProto) -> int:
    """Feed Attention's K and V from before repeat_kv's Unsqueeze/Expand/Reshape, in place.

    Returns the number of inputs rewired; the orphaned nodes are removed.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) <= 1 and not t.external_data}
    rewired = 0
    for attention in [n for n in graph.node if n.op_type == "Attention"]:
        for slot in (1, 2):  # K, V
            reshape = producers.get(attention.input[slot])
            expand = producers.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
            unsqueeze = producers.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
            if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.input) < 2:
                continue
            axes = constants.get(unsqueeze.input[1])
            if axes is None or axes.reshape(-1).tolist() != [2]:
                continue
            attention.input[slot] = unsqueeze.input[0]
            rewired += 1
    drop_unused(graph)
    return rewired
