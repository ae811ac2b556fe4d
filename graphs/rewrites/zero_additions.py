"""Adds of an all-zero constant (final_logits_bias) become Identity."""

from __future__ import annotations

import onnx

from kvgraph.graphs.rewrites.graph_edit import drop_unused
from kvgraph.graphs.weight_store import INLINE, Tensors


# BART, mBART, Marian and Pegasus add a `final_logits_bias` buffer (1, V) to the logits; in their
# checkpoints (and at random init) it is all zeros: V floats stored and added every step for nothing.
#
#   before:  x (B, 1, V) ──Add(zeros (1, V))──▶ logits        after:  x (B, 1, V) ──Identity──▶ logits
def drop_zero_additions(model: onnx.ModelProto, values: Tensors = INLINE) -> list[str]:
    """Replace Add(x, zeros) by Identity(x) where the zeros cannot broadcast x to a larger shape; returns the zeros' names."""
    graph = model.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info] if v.type.tensor_type.HasField("shape")}
    initializers = {t.name: t for t in graph.initializer}
    dropped = []
    for node in [n for n in graph.node if n.op_type == "Add" and len(n.input) == 2]:
        for zeros, other in (node.input, reversed(node.input)):
            tensor = initializers.get(zeros)
            if tensor is None or not _cannot_grow(list(tensor.dims), shapes.get(other)) or values.array(tensor).any():
                continue
            node.op_type, node.input[:] = "Identity", [other]
            dropped.append(zeros)
            break
    drop_unused(graph)
    return dropped


def _cannot_grow(dims: list[int], other: list[int | None] | None) -> bool:
    """Broadcasting a tensor of `dims` against one of shape `other` leaves `other`'s shape as it is."""
    if other is None or len(dims) > len(other):
        return False
    return all(d == 1 or d == o for d, o in zip(reversed(dims), reversed(other)))
