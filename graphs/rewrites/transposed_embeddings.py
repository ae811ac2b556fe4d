"""A tied embedding stored once, in the (H, V) orientation the lm_head reads, within a graph and across graphs."""

from __future__ import annotations

import onnx

from kvgraph.graphs.rewrites.graph_edit import attr, rename_input, transposed_copy, transposed_pairs
from kvgraph.graphs.weight_store import INLINE, Tensors


# A tied embedding is then read two ways: Gather(W) for the input embedding, Transpose(W) for
# the logits. onnxruntime folds that Transpose into a new (H, V) constant in every session,
# a second copy of the largest matrix. Store the (H, V) orientation instead and gather columns:
#
#   before:  W (V, H) ──Gather(axis 0)──▶ emb (B, S, H)       W ──Transpose──▶ W_T ──MatMul──▶ logits
#   after:   W_T (H, V) ──Gather(axis 1)──▶ (H, B, S) ──Transpose(1, 2, 0)──▶ emb (B, S, H)
#            W_T ──MatMul──▶ logits
def store_embedding_transposed(model: onnx.ModelProto, values: Tensors = INLINE) -> list[str]:
    """Remove each Transpose(perm 1, 0) of a 2-D initializer whose other side is only gathered, in place.

    Either the Transpose's output is only gathered (gather columns of the initializer instead),
    or the initializer itself is only gathered besides (store it transposed). Gathers whose index
    rank is unknown are left alone, and so is their Transpose. Returns the initializers involved.
    """
    graph = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info] if v.type.tensor_type.HasField("shape")}
    initializers = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    done = []
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in initializers]:
        if list(attr(node, "perm", [1, 0])) != [1, 0]:
            continue
        tensor = initializers[node.input[0]]
        output_users = _gathers_only(graph, node.output[0], ranks)
        source_users = _gathers_only(graph, tensor.name, ranks, besides=node)
        if output_users is not None:  # W (H, V) feeds MatMul; its transpose feeds the embedding Gather
            columns_of = tensor.name
            for gather in output_users:
                _gather_columns(graph, gather, columns_of, ranks[gather.input[1]])
        elif source_users is not None:  # W (V, H) feeds the embedding Gather; its transpose feeds MatMul
            transposed = values.tensor(transposed_copy(values.array(tensor)), f"{tensor.name}.T")
            graph.initializer.append(transposed)
            rename_input(graph, node.output[0], transposed.name)
            for gather in source_users:
                _gather_columns(graph, gather, transposed.name, ranks[gather.input[1]])
            graph.initializer.remove(tensor)
        else:
            continue
        graph.node.remove(node)
        done.append(tensor.name)
    return done


# Encoder-decoders tie one matrix three ways: the encoder's embedding, the decoder's embedding
# and the lm_head. After store_embedding_transposed the decoder graphs hold W_T (H, V), while the
# encoder graph, which only gathers, still holds W (V, H): two contents, stored twice. Give every
# gather-only graph the orientation another graph already stores:
#
#   encoder before:  W (V, H) ──Gather(axis 0)──▶ emb
#   encoder after:   W_T (H, V) ──Gather(axis 1)──Transpose──▶ emb      (W_T as in prefill/decode)
def share_embeddings_across_graphs(models: dict[str, onnx.ModelProto], values: Tensors = INLINE) -> list[str]:
    """Store a gathered (V, H) matrix as (H, V) where another graph holds that transpose; returns "graph:name" rewritten.
    values: how initializers are read (a WeightStore where the graphs' bytes are in one)."""
    stored = [t for model in models.values() for t in model.graph.initializer if len(t.dims) == 2]
    done = []
    for name, model in models.items():
        graph = model.graph
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info] if v.type.tensor_type.HasField("shape")}
        for tensor in [t for t in graph.initializer if len(t.dims) == 2 and t.dims[0] != t.dims[1]]:
            users = _gathers_only(graph, tensor.name, ranks)
            twin = next((other for _, other in transposed_pairs([tensor], stored, values)), None) if users else None
            if twin is None:
                continue
            transposed = onnx.TensorProto()
            transposed.CopyFrom(twin)
            transposed.name = f"{tensor.name}.T"
            graph.initializer.append(transposed)
            for gather in users:
                _gather_columns(graph, gather, transposed.name, ranks[gather.input[1]])
            graph.initializer.remove(tensor)
            done.append(f"{name}:{tensor.name}")
    return done



def _gathers_only(graph: onnx.GraphProto, name: str, ranks: dict[str, int], besides=None) -> list[onnx.NodeProto] | None:
    """The nodes reading `name` if all are Gather(data=name, axis 0) with indices of known rank, else None."""
    users = [n for n in graph.node if name in n.input and n is not besides]
    if any(o.name == name for o in graph.output) or not users:
        return None
    ok = all(n.op_type == "Gather" and n.input[0] == name and attr(n, "axis", 0) == 0 and n.input[1] in ranks for n in users)
    return users if ok else None


def _gather_columns(graph: onnx.GraphProto, gather: onnx.NodeProto, matrix: str, rank: int) -> None:
    """Gather(M (V, H), idx, axis 0) -> Transpose(Gather(matrix (H, V), idx, axis 1)), same output."""
    columns = f"{gather.output[0]}.columns"  # (H, *idx)
    at = list(graph.node).index(gather)
    graph.node.insert(at + 1, onnx.helper.make_node("Transpose", [columns], [gather.output[0]], perm=[*range(1, rank + 1), 0],
                                                    name=f"{gather.name}/to_rows"))
    graph.node.insert(at + 1, onnx.helper.make_node("Gather", [matrix, gather.input[1]], [columns], axis=1, name=gather.name))
    graph.node.remove(gather)
