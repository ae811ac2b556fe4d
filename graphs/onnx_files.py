"""Graph files on disk: contract shapes on the I/O, one shared weights file, embedded metadata.

Needs the `onnx` package. The graph rewrites are in graphs/rewrites/, one a module.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import onnx
from onnx import external_data_helper

from kvgraph.graphs.contract import TensorSpec
from kvgraph.graphs.manifest import WEIGHTS_FORMAT, WEIGHTS_VERSION
from kvgraph.graphs.weight_store import INLINE_LIMIT, WeightStore, content_key

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


class WeightsFile:
    """A weights file being written: each tensor once by content key, 64-byte aligned, in the order added. Safe to add
    to from a thread of its own (an export streams the weights it already knows while it traces)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.handle = open(self.path, "wb")
        self.slots: dict[str, int] = {}  # content key -> index into `tensors`
        self.tensors: list[dict] = []  # {"offset", "length", "dtype", "shape"} in file order
        self.lock = threading.Lock()

    def add(self, key: str, raw, data_type: int, dims) -> int:
        """The slot of `key`'s bytes, written now unless they are already there."""
        with self.lock:
            if key not in self.slots:
                self.handle.write(b"\0" * ((-self.handle.tell()) % ALIGNMENT))
                self.slots[key] = len(self.tensors)
                self.tensors.append({"offset": self.handle.tell(), "length": len(raw),
                                     "dtype": _DTYPE_NAMES.get(data_type, f"onnx:{data_type}"), "shape": list(dims)})
                self.handle.write(raw)
            return self.slots[key]

    def close(self) -> int:
        """Close the file; returns its size."""
        size = self.handle.tell()
        self.handle.close()
        return size


def write_graphs(models: dict[str, onnx.ModelProto], directory: Path, weights_name: str, index_name: str,
                 store: WeightStore | None = None, weights: WeightsFile | None = None) -> int:
    """Save each model as `<name>.onnx` in `directory`, all large initializers in one file.

    Initializers with identical contents (across and within graphs) are stored once and
    referenced by offset from every graph. `index_name` (JSON) lists every stored tensor and,
    per graph, which initializer names read it, so a runtime without the onnx package can map
    the weights once and hand the same memory to every session. `store` holds the bytes of the
    initializers taken out of the graphs while they were copied (graphs/weight_store.py).
    `weights`: the weights file (directory / weights_name) already opened, with what was written into it before.
    Returns the weights file's size.
    """
    directory, store = Path(directory), store or WeightStore()
    weights = weights or WeightsFile(directory / weights_name)
    graphs: dict[str, dict[str, int]] = {}  # graph -> initializer name -> index into `tensors`
    try:
        for name, model in models.items():
            graphs[name] = {}
            for tensor in model.graph.initializer:
                slot = _externalize(tensor, weights, weights_name, store)
                if slot is not None:
                    graphs[name][tensor.name] = slot
    finally:
        size = weights.close()
    for name, model in models.items():
        onnx.save_model(model, str(directory / f"{name}.onnx"))
    index = {"format": WEIGHTS_FORMAT, "format_version": WEIGHTS_VERSION, "file": weights_name, "size": size, "tensors": weights.tensors,
             "graphs": graphs}
    (directory / index_name).write_text(json.dumps(index, separators=(",", ":")) + "\n", encoding="utf-8")
    return size


def _externalize(tensor: onnx.TensorProto, weights: WeightsFile, location: str, store: WeightStore) -> int | None:
    """Point the tensor at its bytes in the weights file; returns its slot, or None if kept inline."""
    key = store.key(tensor)
    raw = None if key in weights.slots else store.raw(tensor)
    if raw is not None and len(raw) < INLINE_LIMIT:
        return None
    key = key or content_key(tensor.data_type, tensor.dims, raw)
    slot = weights.add(key, raw, tensor.data_type, tensor.dims)
    stored = weights.tensors[slot]
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.raw_data = b"\0"  # set_external_data insists on raw_data being present
    external_data_helper.set_external_data(tensor, location=location, offset=stored["offset"], length=stored["length"])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    return slot


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
