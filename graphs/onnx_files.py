"""Graph files on disk: contract shapes on the I/O, one shared weights file, embedded metadata.

Needs the `onnx` package (export extra). Runtime code does not import this module.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from .contract import TensorSpec

INLINE_LIMIT = 1024  # initializers smaller than this (bytes) stay inside the graph file
ALIGNMENT = 64  # byte alignment of each tensor in the weights file

_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
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
    by_shape: dict[tuple[int, int], list[onnx.TensorProto]] = {}
    for tensor in matrices:
        by_shape.setdefault(tuple(tensor.dims), []).append(tensor)
    replaced: dict[str, str] = {}
    for tensor in matrices:
        if tensor.name in replaced or tensor.name in replaced.values():
            continue
        source = _transposed_twin(tensor, by_shape.get((tensor.dims[1], tensor.dims[0]), []), replaced)
        if source is not None:
            replaced[tensor.name] = source.name
    for copy_name, source_name in replaced.items():
        node = onnx.helper.make_node("Transpose", [source_name], [copy_name], perm=[1, 0], name=f"untie/{copy_name}")
        model.graph.node.insert(0, node)
    kept = [t for t in model.graph.initializer if t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return sorted(replaced)


def _transposed_twin(tensor, candidates, replaced) -> onnx.TensorProto | None:
    if not candidates:
        return None
    array = numpy_helper.to_array(tensor)
    for other in candidates:
        if other.name in replaced or other.data_type != tensor.data_type:
            continue
        if np.array_equal(numpy_helper.to_array(other).T, array):
            return other
    return None


def write_graphs(models: dict[str, onnx.ModelProto], directory: Path, weights_name: str) -> int:
    """Save each model as `<name>.onnx` in `directory`, all large initializers in one file.

    Initializers with identical contents (across and within graphs) are stored once and
    referenced by offset from every graph. Returns the size of the weights file in bytes.
    """
    directory = Path(directory)
    offsets: dict[str, tuple[int, int]] = {}  # content key -> (offset, length)
    with open(directory / weights_name, "wb") as data:
        for model in models.values():
            for tensor in model.graph.initializer:
                _externalize(tensor, data, offsets, weights_name)
        size = data.tell()
    for name, model in models.items():
        onnx.save_model(model, str(directory / f"{name}.onnx"))
    return size


def _externalize(tensor: onnx.TensorProto, data, offsets: dict, location: str) -> None:
    raw = numpy_helper.to_array(tensor).tobytes()
    if len(raw) < INLINE_LIMIT:
        return
    key = f"{tensor.data_type}:{tuple(tensor.dims)}:{hashlib.sha256(raw).hexdigest()}"
    if key not in offsets:
        padding = (-data.tell()) % ALIGNMENT
        data.write(b"\0" * padding)
        offsets[key] = (data.tell(), len(raw))
        data.write(raw)
    offset, length = offsets[key]
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    tensor.raw_data = raw  # set_external_data insists on raw_data being present
    external_data_helper.set_external_data(tensor, location=location, offset=offset, length=length)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


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
