"""A tied lm_head folded into a second, transposed initializer becomes a Transpose of the first."""

from __future__ import annotations

import onnx

from kvgraph.graphs.rewrites.graph_edit import transposed_pairs
from kvgraph.graphs.weight_store import INLINE, Tensors


# Tied embeddings: the exporter folds `lm_head.weight.T` into a second initializer, so the
# embedding would be stored twice. Replace the folded copy with a Transpose of the original:
#
#   before:  W (V, H) ──Gather──▶ embeddings        W_T (H, V) ──MatMul──▶ logits
#   after:   W (V, H) ──Gather──▶ embeddings
#            W ──Transpose(perm=1,0)──▶ W_T ──MatMul──▶ logits
def untie_transposed_copies(model: onnx.ModelProto, values: Tensors = INLINE) -> list[str]:
    """Replace each 2-D initializer that equals another's transpose by a Transpose node.

    Returns the names of the initializers replaced.
    """
    matrices = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] != t.dims[1]]
    replaced: dict[str, str] = {}
    for tensor, source in transposed_pairs(matrices, matrices, values):
        if tensor.name not in replaced and tensor.name not in replaced.values() and source.name not in replaced:
            replaced[tensor.name] = source.name
    for copy_name, source_name in replaced.items():
        node = onnx.helper.make_node("Transpose", [source_name], [copy_name], perm=[1, 0], name=f"untie/{copy_name}")
        model.graph.node.insert(0, node)
    kept = [t for t in model.graph.initializer if t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return sorted(replaced)
