"""The static cache's write: ONNX `TensorScatter` (opset 24), reached from torch through a custom op.

torch has no op that lowers to TensorScatter, and the exporter's fusions (Attention, RMSNormalization,
RotaryEmbedding) happen only at opset 23. So while exporting, `tensor_scatter` emits a
`kvgraph.TensorScatter` node (torch.onnx.ops.symbolic), and `to_standard_tensor_scatter` then renames it to
the standard op and lifts the graph to opset 24, where the fused ops keep their meaning.

    cache (B, Hkv, N, D), update (B, Hkv, Q, D), write_indices (B,) -> cache with
    cache[b, :, write_indices[b] : write_indices[b] + Q] = update[b]
"""

from __future__ import annotations

import onnx
import torch

DOMAIN = "kvgraph"
SCATTER_OPSET = 24  # TensorScatter's first opset

def tensor_scatter(cache: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor, circular: bool = False) -> torch.Tensor:
    """cache (B, Hkv, N, D), update (B, Hkv, Q, D), write_indices (B,) -> the updated cache (a new tensor).

    circular: positions wrap around N (a ring buffer; Q <= N)."""
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::TensorScatter", [cache, update, write_indices], {"axis": -2, "mode": "circular" if circular else "linear"},
            dtype=cache.dtype, shape=cache.shape, version=1,
        )
    positions = write_indices[:, None] + torch.arange(update.shape[2], device=update.device)  # (B, Q)
    if circular:
        positions = positions % cache.shape[2]
    index = positions[:, None, :, None].expand(update.shape)  # (B, Hkv, Q, D)
    return cache.scatter(2, index, update)


def to_standard_tensor_scatter(model: onnx.ModelProto) -> int:
    """Rename kvgraph.TensorScatter nodes to the standard op and set the default opset to 24, in place.

    Returns how many nodes were renamed; a graph without any is left as it is.
    """
    renamed = 0
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == "TensorScatter":
            node.domain = ""
            renamed += 1
    if not renamed:
        return 0
    imports = [entry for entry in model.opset_import if entry.domain not in ("", DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", SCATTER_OPSET), *imports])
    for function in model.functions:  # the exporter does not emit functions here; stay consistent if it ever does
        for entry in function.opset_import:
            if entry.domain == "":
                entry.version = SCATTER_OPSET
    return renamed
