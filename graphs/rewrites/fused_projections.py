"""Quantized projections that read one activation, multiplied as one matrix: q, k and v; gate and up."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kvgraph.graphs.rewrites.graph_edit import attr, drop_unused
from kvgraph.graphs.weight_store import INLINE, Tensors


# Sibling products MatMul(x, DequantizeLinear(W_i)) read one x with the same block layout and integer type. One
# matrix of their columns side by side gives the same numbers (a column of the product depends on its own column
# of W only) in one kernel call: onnxruntime's 4-bit kernel has a cost per call that SmolLM2's narrow k and v
# (576 x 192) pay more for than for their bytes. Fusing q, k, v and gate, up made an int4 decode step
# 5-10 % faster (SmolLM2, 2 threads).
#
#   before:  x ─MatMul(DQ(Wq))─▶ q      x ─MatMul(DQ(Wk))─▶ k      x ─MatMul(DQ(Wv))─▶ v
#   after:   x ─MatMul(DQ([Wq | Wk | Wv]))─Split(Nq, Nk, Nv, axis -1)─▶ q, k, v
#
# The blocks run along K (axis 0), so the integers, scales and zero points are each put side by side on axis 1.
def fuse_sibling_projections(model: onnx.ModelProto, values: Tensors = INLINE, made: dict | None = None) -> int:
    """Fuse every group of two or more sibling quantized MatMuls, in place; returns the number of groups.

    made: fused initializers by their parts' names, shared by the graphs of one export so each is made once."""
    graph = model.graph
    made = {} if made is None else made
    fused = 0
    for group in _groups(graph):
        _fuse(graph, group, values, made)
        fused += 1
    drop_unused(graph)  # the separate matrices' initializers
    return fused


def _groups(graph: onnx.GraphProto) -> list[list[tuple[onnx.NodeProto, onnx.NodeProto]]]:
    """[(MatMul, its DequantizeLinear)] groups of two or more, in graph order, that read one x and fuse."""
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    by_key: dict[tuple, list] = {}
    for node in graph.node:
        dequantize = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or readers[dequantize.output[0]] != 1 \
                or attr(dequantize, "axis", 1) != 0 or not all(name in initializers for name in dequantize.input):
            continue
        codes = initializers[dequantize.input[0]]
        if len(codes.dims) != 2:
            continue
        key = (node.input[0], codes.data_type, codes.dims[0], attr(dequantize, "block_size", 0), len(dequantize.input))
        by_key.setdefault(key, []).append((node, dequantize))
    return [group for group in by_key.values() if len(group) > 1]


def _fuse(graph: onnx.GraphProto, group: list, values: Tensors, made: dict) -> None:
    initializers = {t.name: t for t in graph.initializer}
    parts = [[initializers[name] for name in dequantize.input] for _, dequantize in group]
    first, dequantize = group[0]
    names = [f"{name}.fused" for name in dequantize.input]
    key = tuple(tuple(values.key(t) or t.name for t in member) for member in parts)
    if key not in made:
        made[key] = [values.tensor(np.concatenate([values.array(member[j]) for member in parts], axis=1), names[j])
                     for j in range(len(names))]
    for tensor, name in zip(made[key], names):
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = name
        graph.initializer.append(copy)
    widths = numpy_helper.from_array(np.array([member[0].dims[1] for member in parts], np.int64), f"{names[0]}.widths")
    graph.initializer.append(widths)
    product = f"{names[0]}.product"
    nodes = [helper.make_node("DequantizeLinear", names, [f"{names[0]}.dequantized"], name=f"{names[0]}/dequantize"),
             helper.make_node("MatMul", [first.input[0], f"{names[0]}.dequantized"], [product], name=f"{names[0]}/matmul"),
             helper.make_node("Split", [product, widths.name], [matmul.output[0] for matmul, _ in group], axis=-1,
                              name=f"{names[0]}/split")]
    nodes[0].attribute.extend(dequantize.attribute)
    at = list(graph.node).index(dequantize)
    for matmul, member in group:
        graph.node.remove(matmul)
        graph.node.remove(member)
    for i, node in enumerate(nodes):
        graph.node.insert(at + i, node)
