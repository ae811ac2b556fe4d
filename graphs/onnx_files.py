"""Graph files on disk: contract shapes on the I/O, one shared weights file, embedded metadata.

Needs the `onnx` package. The runtime uses only read_io, on the headers it checks before loading.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from .contract import GraphContract, TensorSpec
from .manifest import WEIGHTS_FORMAT, WEIGHTS_VERSION

INLINE_LIMIT = 1024  # initializers smaller than this (bytes) stay inside the graph file
ALIGNMENT = 64  # byte alignment of each tensor in the weights file

_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "uint4",
}


def read_io(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's declared inputs and outputs as TensorSpecs (symbolic dims by name)."""
    return [_spec(value) for value in model.graph.input], [_spec(value) for value in model.graph.output]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dims = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim)
    return TensorSpec(value.name, _DTYPE_NAMES.get(tensor.elem_type, f"onnx:{tensor.elem_type}"), dims)


def apply_shapes(model: onnx.ModelProto, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Write the contract's symbolic dim names onto the graph's inputs and outputs, in place."""
    for values, specs in ((model.graph.input, inputs), (model.graph.output, outputs)):
        by_name = {spec.name: spec for spec in specs}
        for value in values:
            spec = by_name.get(value.name)
            if spec is None or len(value.type.tensor_type.shape.dim) != len(spec.shape):
                continue  # left for io_mismatches to report
            for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape):
                if isinstance(want, str):
                    dim.dim_param = want
                else:
                    dim.dim_value = want


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


# Tied embeddings: the exporter folds `lm_head.weight.T` into a second initializer, so the
# embedding would be stored twice. Replace the folded copy with a Transpose of the original:
#
#   before:  W (V, H) ──Gather──▶ embeddings        W_T (H, V) ──MatMul──▶ logits
#   after:   W (V, H) ──Gather──▶ embeddings
#            W ──Transpose(perm=1,0)──▶ W_T ──MatMul──▶ logits
def untie_transposed_copies(model: onnx.ModelProto) -> list[str]:
    """Replace each 2-D initializer that equals another's transpose by a Transpose node.

    Returns the names of the initializers replaced.
    """
    matrices = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] != t.dims[1]]
    replaced: dict[str, str] = {}
    for tensor, source in _transposed_pairs(matrices, matrices):
        if tensor.name not in replaced and tensor.name not in replaced.values() and source.name not in replaced:
            replaced[tensor.name] = source.name
    for copy_name, source_name in replaced.items():
        node = onnx.helper.make_node("Transpose", [source_name], [copy_name], perm=[1, 0], name=f"untie/{copy_name}")
        model.graph.node.insert(0, node)
    kept = [t for t in model.graph.initializer if t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return sorted(replaced)


def _transposed_pairs(tensors: list[onnx.TensorProto], candidates: list[onnx.TensorProto]):
    """(tensor, candidate) pairs, in `tensors` order, where candidate.T equals tensor.

    Matrices are first matched on their first row and column (a transpose swaps them), so only
    likely twins are compared whole: comparing every same-shape pair took seconds per graph.
    """
    by_edges: dict[tuple, list[onnx.TensorProto]] = {}
    for other in candidates:
        by_edges.setdefault(_edges(other, transposed=True), []).append(other)
    for tensor in tensors:
        for other in by_edges.get(_edges(tensor), []):
            if other is not tensor and np.array_equal(numpy_helper.to_array(other).T, numpy_helper.to_array(tensor)):
                yield tensor, other


def _edges(tensor: onnx.TensorProto, transposed: bool = False) -> tuple:
    """(dtype, shape, first row, first column) of the matrix, or of its transpose."""
    array = numpy_helper.to_array(tensor)
    array = array.T if transposed else array
    return tensor.data_type, array.shape, array[0].tobytes(), array[:, 0].tobytes()


# A tied embedding is then read two ways: Gather(W) for the input embedding, Transpose(W) for
# the logits. onnxruntime folds that Transpose into a new (H, V) constant in every session,
# a second copy of the largest matrix. Store the (H, V) orientation instead and gather columns:
#
#   before:  W (V, H) ──Gather(axis 0)──▶ emb (B, S, H)       W ──Transpose──▶ W_T ──MatMul──▶ logits
#   after:   W_T (H, V) ──Gather(axis 1)──▶ (H, B, S) ──Transpose(1, 2, 0)──▶ emb (B, S, H)
#            W_T ──MatMul──▶ logits
def store_embedding_transposed(model: onnx.ModelProto) -> list[str]:
    """Remove each Transpose(perm 1, 0) of a 2-D initializer whose other side is only gathered, in place.

    Either the Transpose's output is only gathered (gather columns of the initializer instead),
    or the initializer itself is only gathered besides (store it transposed). Gathers whose index
    rank is unknown are left alone, and so is their Transpose. Returns the initializers involved.
    """
    graph = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info] if v.type.tensor_type.HasField("shape")}
    initializers = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    done = []
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in initializers]:
        if list(_attr(node, "perm", [1, 0])) != [1, 0]:
            continue
        tensor = initializers[node.input[0]]
        output_users = _gathers_only(graph, node.output[0], ranks)
        source_users = _gathers_only(graph, tensor.name, ranks, besides=node)
        if output_users is not None:  # W (H, V) feeds MatMul; its transpose feeds the embedding Gather
            columns_of = tensor.name
            for gather in output_users:
                _gather_columns(graph, gather, columns_of, ranks[gather.input[1]])
        elif source_users is not None:  # W (V, H) feeds the embedding Gather; its transpose feeds MatMul
            transposed = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(tensor).T), f"{tensor.name}.T")
            graph.initializer.append(transposed)
            _rename_input(graph, node.output[0], transposed.name)
            for gather in source_users:
                _gather_columns(graph, gather, transposed.name, ranks[gather.input[1]])
            graph.initializer.remove(tensor)
        else:
            continue
        graph.node.remove(node)
        done.append(tensor.name)
    return done


# Encoder-decoders tie one matrix three ways: the encoder's embedding, the decoder's embedding
# and the lm_head. After store_embedding_transposed the decoder graphs hold W_T (H, V), while the
# encoder graph, which only gathers, still holds W (V, H): two contents, stored twice. Give every
# gather-only graph the orientation another graph already stores:
#
#   encoder before:  W (V, H) ──Gather(axis 0)──▶ emb
#   encoder after:   W_T (H, V) ──Gather(axis 1)──Transpose──▶ emb      (W_T as in prefill/decode)
def share_embeddings_across_graphs(models: dict[str, onnx.ModelProto]) -> list[str]:
    """Store a gathered (V, H) matrix as (H, V) where another graph holds that transpose; returns "graph:name" rewritten."""
    stored = [t for model in models.values() for t in model.graph.initializer if len(t.dims) == 2]
    done = []
    for name, model in models.items():
        graph = model.graph
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info] if v.type.tensor_type.HasField("shape")}
        for tensor in [t for t in graph.initializer if len(t.dims) == 2 and t.dims[0] != t.dims[1]]:
            users = _gathers_only(graph, tensor.name, ranks)
            twin = next((other for _, other in _transposed_pairs([tensor], stored)), None) if users else None
            if twin is None:
                continue
            transposed = onnx.TensorProto()
            transposed.CopyFrom(twin)
            transposed.name = f"{tensor.name}.T"
            graph.initializer.append(transposed)
            for gather in users:
                _gather_columns(graph, gather, transposed.name, ranks[gather.input[1]])
            graph.initializer.remove(tensor)
            done.append(f"{name}:{tensor.name}")
    return done


# BART, mBART, Marian and Pegasus add a `final_logits_bias` buffer (1, V) to the logits; in their
# checkpoints (and at random init) it is all zeros: V floats stored and added every step for nothing.
#
#   before:  x (B, 1, V) ──Add(zeros (1, V))──▶ logits        after:  x (B, 1, V) ──Identity──▶ logits
def drop_zero_additions(model: onnx.ModelProto) -> list[str]:
    """Replace Add(x, zeros) by Identity(x) where the zeros cannot broadcast x to a larger shape; returns the zeros' names."""
    graph = model.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info] if v.type.tensor_type.HasField("shape")}
    initializers = {t.name: t for t in graph.initializer}
    dropped = []
    for node in [n for n in graph.node if n.op_type == "Add" and len(n.input) == 2]:
        for zeros, other in (node.input, reversed(node.input)):
            tensor = initializers.get(zeros)
            if tensor is None or not _cannot_grow(list(tensor.dims), shapes.get(other)) or numpy_helper.to_array(tensor).any():
                continue
            node.op_type, node.input[:] = "Identity", [other]
            dropped.append(zeros)
            break
    _drop_unused(graph)
    return dropped


def _cannot_grow(dims: list[int], other: list[int | None] | None) -> bool:
    """Broadcasting a tensor of `dims` against one of shape `other` leaves `other`'s shape as it is."""
    if other is None or len(dims) > len(other):
        return False
    return all(d == 1 or d == o for d, o in zip(reversed(dims), reversed(other)))


def _gathers_only(graph: onnx.GraphProto, name: str, ranks: dict[str, int], besides=None) -> list[onnx.NodeProto] | None:
    """The nodes reading `name` if all are Gather(data=name, axis 0) with indices of known rank, else None."""
    users = [n for n in graph.node if name in n.input and n is not besides]
    if any(o.name == name for o in graph.output) or not users:
        return None
    ok = all(n.op_type == "Gather" and n.input[0] == name and _attr(n, "axis", 0) == 0 and n.input[1] in ranks for n in users)
    return users if ok else None


def _gather_columns(graph: onnx.GraphProto, gather: onnx.NodeProto, matrix: str, rank: int) -> None:
    """Gather(M (V, H), idx, axis 0) -> Transpose(Gather(matrix (H, V), idx, axis 1)), same output."""
    columns = f"{gather.output[0]}.columns"  # (H, *idx)
    at = list(graph.node).index(gather)
    graph.node.insert(at + 1, onnx.helper.make_node("Transpose", [columns], [gather.output[0]], perm=[*range(1, rank + 1), 0],
                                                    name=f"{gather.name}/to_rows"))
    graph.node.insert(at + 1, onnx.helper.make_node("Gather", [matrix, gather.input[1]], [columns], axis=1, name=gather.name))
    graph.node.remove(gather)


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for output in graph.output:
        if output.name == old:
            raise ValueError(f"{old} is a graph output; cannot replace it with the initializer {new}")


# Grouped-query attention, as traced from transformers' repeat_kv, copies every cached key and
# value n_rep times per step before the Attention op (Hkv -> H heads). The standard Attention op
# takes Hkv heads itself (query head h reads key/value head h // n_rep), so the copy can go:
#
#   before:  present (B, Hkv, L, D) ─Unsqueeze(2)─Expand(B, Hkv, n_rep, L, D)─Reshape(B, H, L, D)─▶ Attention
#   after:   present (B, Hkv, L, D) ──────────────────────────────────────────────────────────────▶ Attention
def attend_grouped_heads_directly(model: onnx.ModelProto) -> int:
    """Feed Attention's K and V from before repeat_kv's Unsqueeze/Expand/Reshape, in place.

    Returns the number of inputs rewired; the orphaned nodes are removed.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) <= 1 and not t.external_data}
    rewired = 0
    for attention in [n for n in graph.node if n.op_type == "Attention"]:
        for slot in (1, 2):  # K, V
            reshape = producers.get(attention.input[slot])
            expand = producers.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
            unsqueeze = producers.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
            if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.input) < 2:
                continue
            axes = constants.get(unsqueeze.input[1])
            if axes is None or axes.reshape(-1).tolist() != [2]:
                continue
            attention.input[slot] = unsqueeze.input[0]
            rewired += 1
    _drop_unused(graph)
    return rewired


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
    _rename_input(graph, node.output[0], node.input[0])
    _drop_unused(graph)
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


def _drop_unused(graph: onnx.GraphProto) -> None:
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


def write_graphs(models: dict[str, onnx.ModelProto], directory: Path, weights_name: str, index_name: str) -> int:
    """Save each model as `<name>.onnx` in `directory`, all large initializers in one file.

    Initializers with identical contents (across and within graphs) are stored once and
    referenced by offset from every graph. `index_name` (JSON) lists every stored tensor and,
    per graph, which initializer names read it, so a runtime without the onnx package can map
    the weights once and hand the same memory to every session. Returns the weights file's size.
    """
    directory = Path(directory)
    slots: dict[str, int] = {}  # content key -> index into `tensors`
    tensors: list[dict] = []  # {"offset", "length", "dtype", "shape"} in file order
    graphs: dict[str, dict[str, int]] = {}  # graph -> initializer name -> index into `tensors`
    with open(directory / weights_name, "wb") as data:
        for name, model in models.items():
            graphs[name] = {}
            for tensor in model.graph.initializer:
                slot = _externalize(tensor, data, slots, tensors, weights_name)
                if slot is not None:
                    graphs[name][tensor.name] = slot
        size = data.tell()
    for name, model in models.items():
        onnx.save_model(model, str(directory / f"{name}.onnx"))
    index = {"format": WEIGHTS_FORMAT, "format_version": WEIGHTS_VERSION, "file": weights_name, "size": size, "tensors": tensors,
             "graphs": graphs}
    (directory / index_name).write_text(json.dumps(index, separators=(",", ":")) + "\n", encoding="utf-8")
    return size


def _externalize(tensor: onnx.TensorProto, data, slots: dict[str, int], tensors: list[dict], location: str) -> int | None:
    """Point the tensor at its bytes in the weights file; returns its slot, or None if kept inline."""
    # raw_data is already the little-endian bytes the file stores; converting it through numpy cost seconds
    raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    if len(raw) < INLINE_LIMIT:
        return None
    key = f"{tensor.data_type}:{tuple(tensor.dims)}:{hashlib.sha256(raw).hexdigest()}"
    if key not in slots:
        data.write(b"\0" * ((-data.tell()) % ALIGNMENT))
        slots[key] = len(tensors)
        tensors.append({"offset": data.tell(), "length": len(raw), "dtype": _DTYPE_NAMES.get(tensor.data_type, f"onnx:{tensor.data_type}"),
                        "shape": list(tensor.dims)})
        data.write(raw)
    stored = tensors[slots[key]]
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    if not tensor.HasField("raw_data"):
        tensor.raw_data = raw  # set_external_data insists on raw_data being present
    external_data_helper.set_external_data(tensor, location=location, offset=stored["offset"], length=stored["length"])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    return slots[key]


def embed_metadata(path: Path, entries: dict[str, str]) -> None:
    """Set metadata_props entries on a saved graph file (its weights file is left untouched)."""
    model = onnx.load_model(str(path), load_external_data=False)
    keep = [prop for prop in model.metadata_props if prop.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path))


def read_metadata(path: Path) -> dict[str, str]:
    model = onnx.load_model(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}
