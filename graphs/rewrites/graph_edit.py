"""Small edits every rewrite makes: read an attribute, rename a tensor's readers, drop what nothing reads, find
matrices stored twice as each other's transpose."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx

from kvgraph.graphs.weight_store import INLINE, Tensors


def attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for output in graph.output:
        if output.name == old:
            raise ValueError(f"{old} is a graph output; cannot replace it with the initializer {new}")


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (repeatedly), then unread initializers."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(out in read for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    unread = [t for t in graph.initializer if t.name not in read]
    for tensor in unread:
        graph.initializer.remove(tensor)



def transposed_pairs(tensors: list[onnx.TensorProto], candidates: list[onnx.TensorProto], values: Tensors = INLINE):
    """(tensor, candidate) pairs, in `tensors` order, where candidate.T equals tensor.

    Matrices are first matched on their first row and column (a transpose swaps them), so only
    likely twins are compared whole: comparing every same-shape pair took seconds per graph.
    """
    by_edges: dict[tuple, list[onnx.TensorProto]] = {}
    for other in candidates:
        by_edges.setdefault(edges(other, transposed=True, values=values), []).append(other)
    for tensor in tensors:
        for other in by_edges.get(edges(tensor, values=values), []):
            if other is not tensor and np.array_equal(values.array(other).T, values.array(tensor)):
                yield tensor, other


def edges(tensor: onnx.TensorProto, transposed: bool = False, values: Tensors = INLINE) -> tuple:
    """(dtype, shape, first row, first column) of the matrix, or of its transpose."""
    array = values.array(tensor)
    array = array.T if transposed else array
    return tensor.data_type, array.shape, array[0].tobytes(), array[:, 0].tobytes()


def transposed_copy(matrix: np.ndarray, rows: int = 64, threads: int = 2, out: np.ndarray | None = None) -> np.ndarray:
    """A C-ordered copy of the 2-D `matrix.T` (into `out` when given), copied a band of rows at a time by `threads`
    threads (numpy releases the GIL while it copies). 5x as fast as numpy's strided copy of a large matrix: about 1 GB/s here."""
    out = np.empty(matrix.shape[::-1], matrix.dtype) if out is None else out

    def copy(start: int, stop: int) -> None:
        for row in range(start, stop, rows):
            out[:, row:min(row + rows, stop)] = matrix[row:min(row + rows, stop)].T

    count = matrix.shape[0]
    bounds = [count * part // threads // rows * rows for part in range(threads)] + [count]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, bounds[:-1], bounds[1:]))
    return out
