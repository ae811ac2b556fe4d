"""Graphs derived from another graph instead of traced again (tracing is most of an export's time).

Needs the `onnx` package (export extra).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kvgraph.graphs.contract import INPUT_IDS, GraphContract

EMPTY_PAST = "kvgraph.empty_past"


# The prefill of a dynamic cache is the extend step after an empty past (P = 0): the same nodes, so
# the same results. Every past.{i}.* input becomes one empty (B, Hkv, 0, D) tensor made from the batch
# size of input_ids:
#
#   input_ids ──Shape[0:1]──▶ B ──Concat(B, [Hkv, 0, D])──▶ ConstantOfShape ──▶ empty past (B, Hkv, 0, D)
#   empty past ──▶ every reader of past.{i}.key / past.{i}.value (Concat with the new K/V, ...)
def prefill_from_extend(extend: onnx.ModelProto, contract: GraphContract) -> onnx.ModelProto:
    """A prefill graph (no past inputs) from the extend graph of the same export; extend is left unchanged."""
    model = copy.deepcopy(extend)
    graph = model.graph
    pasts = set(contract.past_names())
    kept = [value for value in graph.input if value.name not in pasts]
    del graph.input[:]
    graph.input.extend(kept)
    kept = [value for value in graph.value_info if value.name not in pasts]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    empty = {name: f"{EMPTY_PAST}.{kind}" for name, (_, kind) in zip(contract.past_names(), contract.cache_slots())}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in pasts:
                node.input[i] = empty[name]
    for kind in sorted(set(empty.values())):
        _insert_empty_past(graph, kind, contract)
    graph.node.insert(0, helper.make_node("Shape", [INPUT_IDS], [f"{EMPTY_PAST}.batch"], start=0, end=1, name=f"{EMPTY_PAST}.batch"))
    return model


def _insert_empty_past(graph: onnx.GraphProto, name: str, contract: GraphContract) -> None:
    """name = zeros of shape (B, Hkv, 0, D) (Dv for values), B read from input_ids."""
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(contract.dtype))
    rest = numpy_helper.from_array(np.array(contract.cache_shape(name.rsplit(".", 1)[1], 0, 0)[1:], dtype=np.int64), f"{name}.rest")
    graph.initializer.append(rest)
    graph.node.insert(0, helper.make_node("ConstantOfShape", [f"{name}.shape"], [name], name=name,
                                          value=helper.make_tensor("zero", dtype, [1], [0])))
    graph.node.insert(0, helper.make_node("Concat", [f"{EMPTY_PAST}.batch", rest.name], [f"{name}.shape"], axis=0, name=f"{name}.shape"))
