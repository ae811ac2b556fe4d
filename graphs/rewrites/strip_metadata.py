"""The exporter's debug metadata off every node: stack traces with machine paths make exports differ."""

from __future__ import annotations

import onnx


def strip_exporter_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with machine paths, FX text).

    It is most of a small graph's bytes and makes exports differ between machines.
    """
    graph = model.graph
    for item in [*graph.node, *graph.value_info, *graph.input, *graph.output, *graph.initializer]:
        keep = [p for p in item.metadata_props if not p.key.startswith("pkg.torch.")]
        del item.metadata_props[:]
        item.metadata_props.extend(keep)
    keep = [p for p in graph.metadata_props if not p.key.startswith("pkg.torch.")]
    del graph.metadata_props[:]
    graph.metadata_props.extend(keep)
