"""The beam reorder graph: every cache tensor's rows in a new order, on the cache's own device.

Beam search keeps k rows per prompt and, after each step, continues from the best k candidates,
which may descend from any of the rows. Their caches must follow: row r of the next step's past is
row beam_idx[r] of this one. One Gather per cache tensor does it, so a CUDA cache never goes
through host memory. The graph is part of the contract (graphs/README.md), made from it at load
time, not stored in the export:

    inputs   beam_idx (R,) int64; past.{i}.key / past.{i}.value (B, Hkv, L, D) as the contract names them
    outputs  reordered.{i}.key / reordered.{i}.value (R, Hkv, L, D) = Gather(past, beam_idx, axis=0)

L is whatever the cache holds (P positions, or a static cache's N). Encoder-decoder cross K/V need
no reordering: a prompt's k rows share one source, so a reorder within a prompt leaves them as they are.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from kvgraph.graphs.contract import GraphContract

BEAM_INDEX = "beam_idx"
REORDER_OPSET = 21


def reordered_names(contract: GraphContract) -> list[str]:
    return [name.replace("past.", "reordered.", 1) for name in contract.past_names()]


def reorder_model(contract: GraphContract) -> onnx.ModelProto:
    """The reorder graph of one contract (dtype and cache tensor names)."""
    dtype = TensorProto.FLOAT16 if contract.dtype == "float16" else TensorProto.FLOAT
    dims = ["rows_in", "heads", "positions", "head_dim"]
    inputs = [helper.make_tensor_value_info(BEAM_INDEX, TensorProto.INT64, ["rows"])]
    outputs, nodes = [], []
    for past, out in zip(contract.past_names(), reordered_names(contract)):
        inputs.append(helper.make_tensor_value_info(past, dtype, dims))
        outputs.append(helper.make_tensor_value_info(out, dtype, ["rows", *dims[1:]]))
        nodes.append(helper.make_node("Gather", [past, BEAM_INDEX], [out], axis=0))
    graph = helper.make_graph(nodes, "kvgraph_beam_reorder", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", REORDER_OPSET)], producer_name="kvgraph")
    onnx.checker.check_model(model)
    return model
