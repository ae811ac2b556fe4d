"""Attention over packed heads: Q, K, V and its output stay (B, S, H·D), and a dynamic cache's concatenation
happens inside the op."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kvgraph.graphs.rewrites.graph_edit import attr, drop_unused

_HEADS_PERM = [0, 2, 1, 3]  # (B, S, H, D) <-> (B, H, S, D)


# The exporter traces attention as transformers writes it: every projection is split into heads and
# transposed, rotated, its new keys and values concatenated after the cache, and the output transposed
# back. The standard Attention op (opset 23) takes the packed (B, S, H·D) tensors and the past itself,
# which per layer and step saves four Transposes, four Reshapes and the two Concats (about 8 % of an
# int4 SmolLM2 decode step; the results are bit-identical):
#
#   before:  x_q ─Reshape─Transpose─Rotary─┐
#            x_k ─Reshape─Transpose─Rotary─Concat(past.k)─┼─Attention─Transpose─Reshape─▶ y (B, S, H·D)
#            x_v ─Reshape─Transpose────────Concat(past.v)─┘      present.k, present.v ◀─ the Concats
#   after:   x_q ─Rotary(num_heads)─┐
#            x_k ─Rotary(num_heads)─┼─Attention(q_num_heads, kv_num_heads; past.k, past.v)─▶ y, present.k, present.v
#            x_v ───────────────────┘
#
# onnxruntime's Attention takes Q, K and V of one rank, so a layer whose K and V are 4-D elsewhere
# (a static cache's TensorScatter, cross-attention's cached K/V inputs) is left as it is.
def attend_packed_heads(model: onnx.ModelProto) -> int:
    """Rewrite every Attention node whose Q, K, V and output can stay packed, in place; returns how many."""
    graph = model.graph
    shapes = _shapes(model)
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    rewritten = 0
    for attention in [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        plan = _Plan(attention, producers, readers, outputs, shapes).made()
        if plan is not None:
            plan.apply(graph)
            rewritten += 1
    drop_unused(graph)
    return rewritten


class _Plan:
    """What one Attention node becomes, or None from made() when some part of it cannot stay packed."""

    def __init__(self, attention, producers, readers, outputs, shapes) -> None:
        self.attention, self.producers, self.readers, self.outputs, self.shapes = attention, producers, readers, outputs, shapes
        self.new_nodes: list[onnx.NodeProto] = []
        self.removed: list[onnx.NodeProto] = [attention]
        self.presents: list[str] = []  # the Concats' outputs, which the op makes instead
        self.flattened: tuple[str, int] | None = None  # (the (B·S, H·D) tensor read after the op, H·D)

    def made(self) -> _Plan | None:
        attention = self.attention
        if any(attention.input[4:]) or len([o for o in attention.output if o]) != 1:
            return None  # already given a past, or asked for its scores
        q = self._packed(attention.input[0])
        if q is None:
            return None
        self.q, self.q_heads = q
        kv = [self._packed_after_past(attention.input[slot]) for slot in (1, 2)]
        if None in kv or kv[0][2] != kv[1][2] or (kv[0][1] is None) != (kv[1][1] is None):
            return None
        (self.k, self.past_k, self.kv_heads), (self.v, self.past_v, _) = kv
        if self.past_k is not None and attr(attention, "is_causal", 0):
            return None  # the op's causal mask with a past is aligned differently from the traced one
        self.y = self._merged_output(attention.output[0])
        return None if self.y is None else self

    def _packed(self, name: str) -> tuple[str, int] | None:
        """(a packed (B, S, H·D) tensor holding what `name` holds as (B, H, S, D), its heads H), adding nodes as needed."""
        node = self.producers.get(name)
        if node is not None and node.op_type == "RotaryEmbedding" and len(self.readers.get(name, [])) == 1:
            found = self._split_heads(node.input[0])
            if found is None:
                return None
            packed, heads = found
            rotary = helper.make_node("RotaryEmbedding", [packed, *node.input[1:]], [f"{name}.packed"], name=f"{node.name}.packed")
            rotary.attribute.extend(a for a in node.attribute if a.name != "num_heads")
            rotary.attribute.append(helper.make_attribute("num_heads", heads))
            self.new_nodes.append(rotary)
            return rotary.output[0], heads
        return self._split_heads(name)

    def _split_heads(self, name: str) -> tuple[str, int] | None:
        """(x, H) when `name` is Transpose(Reshape(x (B, S, H·D) to (B, S, H, D)), (0, 2, 1, 3))."""
        transpose = self.producers.get(name)
        if transpose is None or transpose.op_type != "Transpose" or attr(transpose, "perm", None) != _HEADS_PERM:
            return None
        reshape = self.producers.get(transpose.input[0])
        if reshape is None or reshape.op_type != "Reshape":
            return None
        split, packed = self.shapes.get(reshape.output[0]), self.shapes.get(reshape.input[0])
        if split is None or packed is None or len(split) != 4 or len(packed) != 3:
            return None
        heads, width = split[2], split[3]
        if not isinstance(heads, int) or not isinstance(width, int) or packed[2] != heads * width:
            return None
        return reshape.input[0], heads

    def _packed_after_past(self, name: str) -> tuple[str, str | None, int] | None:
        """(packed new K or V, the past it follows or None, its heads): a dynamic cache's Concat(past, new) moves into the op."""
        concat = self.producers.get(name)
        if concat is not None and concat.op_type == "Concat" and len(concat.input) == 2 and attr(concat, "axis", 0) in (2, -2):
            if name not in self.outputs or len(self.readers.get(name, [])) != 1 or self.producers.get(concat.input[0]) is not None:
                return None  # the cache is read elsewhere too, or its past is computed, not fed
            found = self._packed(concat.input[1])
            if found is None:
                return None
            self.removed.append(concat)
            self.presents.append(name)
            return found[0], concat.input[0], found[1]
        found = self._packed(name)
        return None if found is None else (found[0], None, found[1])

    def _merged_output(self, name: str) -> str | None:
        """The tensor the traced graph makes of Attention's (B, H, S, D) output, when that is all it is read for: (B, S, H·D)
        is the op's packed output itself; (B·S, H·D) (GPT-2's Gemm reads that) a Reshape of it."""
        readers = self.readers.get(name, [])
        if len(readers) != 1 or readers[0].op_type != "Transpose" or attr(readers[0], "perm", None) != _HEADS_PERM:
            return None
        transpose = readers[0]
        after = self.readers.get(transpose.output[0], [])
        if len(after) != 1 or after[0].op_type != "Reshape" or transpose.output[0] in self.outputs:
            return None
        merged, heads = self.shapes.get(after[0].output[0]), self.shapes.get(name)
        if merged is None or len(merged) not in (2, 3) or heads is None or len(heads) != 4 or not isinstance(heads[1], int) \
                or not isinstance(heads[3], int) or merged[-1] != heads[1] * heads[3]:
            return None
        self.removed += [transpose, after[0]]
        if len(merged) == 3:
            return after[0].output[0]
        self.flattened = (after[0].output[0], heads[1] * heads[3])
        return f"{name}.packed"

    def apply(self, graph: onnx.GraphProto) -> None:
        attention = self.attention
        past = [self.past_k, self.past_v] if self.past_k is not None else []
        mask = attention.input[3] if len(attention.input) > 3 else ""
        inputs = [self.q, self.k, self.v, mask, *past] if past else [self.q, self.k, self.v, *([mask] if mask else [])]
        node = helper.make_node("Attention", inputs, [self.y, *self.presents], name=f"{attention.name}.packed")
        node.attribute.extend(attention.attribute)
        node.attribute.extend([helper.make_attribute("q_num_heads", self.q_heads), helper.make_attribute("kv_num_heads", self.kv_heads)])
        after = []
        if self.flattened is not None:
            flat, width = self.flattened
            graph.initializer.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{flat}.shape"))
            after.append(helper.make_node("Reshape", [self.y, f"{flat}.shape"], [flat], name=f"{flat}.packed"))
        for removed in self.removed[1:]:
            graph.node.remove(removed)
        at = list(graph.node).index(attention)  # where the op was: its inputs are made before, its readers after
        graph.node.remove(attention)
        for i, new in enumerate([*self.new_nodes, node, *after]):
            graph.node.insert(at + i, new)


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Every tensor's inferred dims (ints where known, else the symbol or None), from onnx's shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = inferred.graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.value_info, *graph.output] if v.type.tensor_type.HasField("shape")}
