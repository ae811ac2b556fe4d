"""Logits at every new position: the last-position Slice bypassed (the verify graph; a text's scores)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from kvgraph.graphs.contract import GraphContract
from kvgraph.graphs.rewrites.graph_edit import drop_unused, rename_input


# Scoring a text needs the next-token logits of every position, while prefill returns the last
# position's only (the traced model slices its hidden states before the lm_head):
#
#   before:  h (B, S, H) ──Slice(starts -1, axes 1)──▶ (B, 1, H) ──MatMul(lm_head)──…──▶ logits (B, 1, V)
#   after:   h (B, S, H) ─────────────────────────────────────────▶ MatMul(lm_head)──…──▶ logits (B, S, V)
def logits_at_every_position(model: onnx.ModelProto, logits: str = "logits") -> None:
    """Bypass the last-position Slice on the way to `logits`, in place (for scoring; never written to an export)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.external_data and len(t.dims) <= 1}
    name, node = logits, producers.get(logits)
    while node is not None and not _last_position_slice(node, constants):
        name, node = node.input[0], producers.get(node.input[0])
    if node is None:
        raise ValueError(f"{logits} is not computed from a last-position Slice: this graph cannot score every position")
    if node.output[0] == logits:  # the Slice makes the output itself (the lm_head ran on every position): it passes all
        node.op_type, node.name = "Identity", f"{node.name}/every_position"
        del node.input[1:]
        del node.attribute[:]
    else:
        rename_input(graph, node.output[0], node.input[0])
    drop_unused(graph)
    output = next(o for o in graph.output if o.name == logits)
    output.type.tensor_type.shape.dim[1].dim_param = "sequence"


def keep_every_position(model: onnx.ModelProto, contract: GraphContract, graph: str) -> None:
    """`graph` of an export with `contract`, in place, with logits at every new position (the verify graph; a text's
    scores). A prefill exported with all_logits has them already and is left as it is."""
    if not (contract.all_logits and graph == "prefill"):
        logits_at_every_position(model)


def _last_position_slice(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    if node.op_type != "Slice" or len(node.input) < 4:
        return False
    starts, axes = constants.get(node.input[1]), constants.get(node.input[3])
    return starts is not None and axes is not None and starts.tolist() == [-1] and axes.tolist() == [1]
