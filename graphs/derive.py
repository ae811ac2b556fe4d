"""Graphs derived from another graph instead of traced again (tracing is most of an export's time).

Needs the `onnx` package (export extra).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .contract import INPUT_IDS, GraphContract

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
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in pasts:
                node.input[i] = EMPTY_PAST
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(contract.dtype))
    rest = numpy_helper.from_array(np.array([contract.num_kv_heads, 0, contract.head_dim], dtype=np.int64), f"{EMPTY_PAST}.rest")
    graph.initializer.append(rest)
    graph.node.insert(0, helper.make_node("ConstantOfShape", [f"{EMPTY_PAST}.shape"], [EMPTY_PAST], name=EMPTY_PAST,
                                          value=helper.make_tensor("zero", dtype, [1], [0])))
    graph.node.insert(0, helper.make_node("Concat", [f"{EMPTY_PAST}.batch", rest.name], [f"{EMPTY_PAST}.shape"], axis=0,
                                          name=f"{EMPTY_PAST}.shape"))
    graph.node.insert(0, helper.make_node("Shape", [INPUT_IDS], [f"{EMPTY_PAST}.batch"], start=0, end=1, name=f"{EMPTY_PAST}.batch"))
    return model
