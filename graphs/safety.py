"""Checks on export directories that may come from anyone, made before onnxruntime opens a file.

An ONNX graph names its external data by a path relative to the graph file; onnxruntime opens
whatever that path reaches. A hostile graph could point at `../../home/user/.ssh/id_rsa` or
`/etc/shadow` (read as weights, maybe echoed in logits), or the export could hold a symlink that
leads out of the directory. Every file a graph reads must be a regular file inside the directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from kvgraph.graphs.errors import KvgraphError


def check_inside(directory: Path, name: str, referrer: str) -> Path:
    """`directory / name` if it is a plain, non-escaping path whose real location stays inside `directory`."""
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")) or "\\" in name:
        raise KvgraphError(f"{referrer}: refers to {name!r}, outside the export directory {directory}; refusing to open it")
    full = Path(directory) / path
    real, root = full.resolve(), Path(directory).resolve()
    if real != root and root not in real.parents:
        raise KvgraphError(f"{full}: is a link to {real}, outside the export directory {root}; refusing to open it")
    return full


def check_graph_file(directory: Path, file_name: str):
    """Refuse a graph that is a link out of `directory`, is not ONNX, or whose external data lies outside.

    Returns the graph's header (the ModelProto without its external weights)."""
    import onnx
    from google.protobuf.message import DecodeError

    path = check_inside(directory, file_name, str(Path(directory) / "kvgraph.json"))
    if not path.is_file():
        raise KvgraphError(f"{path}: graph file missing")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise KvgraphError(f"{path}: not a readable ONNX graph (truncated or corrupted?): {str(exc).splitlines()[0][:200]}") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise KvgraphError(f"{path}: not a readable ONNX graph (no nodes; truncated or corrupted?)")
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        if not location:
            raise KvgraphError(f"{path}: tensor {tensor.name!r} is external but names no location")
        target = check_inside(directory, location, f"{path}: tensor {tensor.name!r}")
        if not target.is_file():
            raise KvgraphError(f"{path}: tensor {tensor.name!r} reads {location!r}, which is missing")
    return model


def _tensors(model) -> Iterator:
    """Every TensorProto of a model: initializers, sparse ones, and tensors in node attributes, subgraphs and functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph) -> Iterator:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node) -> Iterator:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        for sparse in [*([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []), *attribute.sparse_tensors]:
            yield from (sparse.values, sparse.indices)
        for graph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
            yield from _graph_tensors(graph)
