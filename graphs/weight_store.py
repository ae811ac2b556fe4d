"""The weights held once while an export's graphs are made, copied and rewritten.

A traced graph carries every initializer's bytes. Its copies (decode and verify are copies of extend, prefill is
derived from it) would each carry them again, and a ModelProto keeps the memory of bytes it once held even after
they are cleared. So the bytes live in the store, and graphs carry an external-data reference in their place:

    initializer W (4 MB of floats)   ──▶   W (external_data location "kvgraph-weight-store/<key>")
                                           store.blobs[key] = W's bytes, once however many graphs refer to it

A blob is whatever buffer the bytes already were (a model parameter's memory, a folded constant): putting it in
the store copies nothing. Copies and structural rewrites move references; rewrites that read or make values go
through `array` / `tensor`; write_graphs reads the bytes back when it writes the weights file. The placeholder
location is never written to disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

LOCATION = "kvgraph-weight-store"  # prefix of a stored tensor's placeholder location: "kvgraph-weight-store/<key>"
PACKED = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1}  # two values a byte
INLINE_LIMIT = 1024  # initializers smaller than this (bytes) stay inside the graph file


class Tensors(Protocol):
    """How a rewrite reads an initializer's values and makes a new initializer."""

    def array(self, tensor: onnx.TensorProto) -> np.ndarray: ...

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto: ...

    def key(self, tensor: onnx.TensorProto) -> str | None: ...  # a content key known without reading the values, or None


class InlineTensors:
    """Initializers that carry their own bytes (onnx's numpy_helper)."""

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        return numpy_helper.to_array(tensor)

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(np.ascontiguousarray(array), name)

    def key(self, tensor: onnx.TensorProto) -> None:
        return None


INLINE = InlineTensors()


class WeightStore:
    """Bytes of large initializers by content key (dtype, dims, sha256): identical tensors are held once."""

    def __init__(self, source: str | Path | None = None) -> None:
        self.blobs: dict[str, np.ndarray] = {}  # key -> the bytes, as a flat uint8 array (a view where possible)
        self.source = None if source is None else Path(source)  # graphs loaded without their weights: the directory holding them
        # (address, bytes, data type, shape) -> content key, of memory already hashed (and unchanged since): not hashed again
        self.known: dict[tuple, str] = {}

    def put(self, array: np.ndarray, data_type: int) -> str:
        """Hold `array`'s bytes (no copy if it is contiguous); returns its key."""
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        key = self.known.get((raw.ctypes.data, raw.nbytes, data_type, tuple(array.shape))) or content_key(data_type, array.shape, raw)
        self.blobs.setdefault(key, raw)
        return key

    def key(self, tensor: onnx.TensorProto) -> str | None:
        """The content key of a stored tensor, None for one that carries its own bytes."""
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return None
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        return location[len(LOCATION) + 1:] if location.startswith(LOCATION + "/") else None

    def raw(self, tensor: onnx.TensorProto) -> np.ndarray | bytes:
        """The tensor's little-endian bytes (len() is their count), from the store, the source's weights file (read now,
        not kept) or the tensor itself."""
        key = self.key(tensor)
        if key is not None:
            return self.blobs[key]
        if self.source is not None and tensor.data_location == onnx.TensorProto.EXTERNAL:
            return self._read(tensor)
        return raw_bytes(tensor)

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's values; for a stored one a read-only view of the stored bytes."""
        key = self.key(tensor)
        if key is None and not (self.source is not None and tensor.data_location == onnx.TensorProto.EXTERNAL):
            return numpy_helper.to_array(tensor)
        raw = self.blobs[key] if key is not None else self._read(tensor)
        if tensor.data_type in PACKED:  # two values a byte: onnx unpacks them (a copy)
            packed = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, raw_data=bytes(raw))
            return numpy_helper.to_array(packed)
        return raw.view(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tuple(tensor.dims))

    def _read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """An external tensor's bytes read from the source directory's file, one tensor at a time (no mapping of the
        whole file: memory holds the tensors being worked on, not the weights)."""
        info = {entry.key: entry.value for entry in tensor.external_data}
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        with open(self.source / info["location"], "rb") as handle:
            handle.seek(offset)
            data = np.frombuffer(handle.read(length), dtype=np.uint8)
        if len(data) != length:
            raise ValueError(f"{self.source / info['location']}: {tensor.name} needs {length} bytes at {offset}, the file ends first")
        return data

    def release_unreferenced(self, models: dict[str, onnx.ModelProto]) -> int:
        """Forget the bytes no graph refers to any more (the float weights a rewrite replaced); returns how many."""
        used = {self.key(t) for model in models.values() for t in model.graph.initializer}
        unused = [key for key in self.blobs if key not in used]
        for key in unused:
            del self.blobs[key]
        return len(unused)

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """A new initializer of `array`'s values, its bytes in the store (4-bit types packed two to a byte, as ONNX stores them)."""
        proto = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        if array.nbytes < INLINE_LIMIT:  # small: inside the graph file, as write_graphs keeps it
            return numpy_helper.from_array(np.ascontiguousarray(array), name)
        if proto.data_type in PACKED:
            raw = np.frombuffer(numpy_helper.from_array(array, name).raw_data, dtype=np.uint8)
            key = content_key(proto.data_type, array.shape, raw)
            self.blobs.setdefault(key, raw)
            refer(proto, key, len(raw))
            return proto
        refer(proto, self.put(array, proto.data_type), array.nbytes)
        return proto


def location(key: str) -> str:
    return f"{LOCATION}/{key}"


def raw_bytes(tensor: onnx.TensorProto) -> bytes:
    # raw_data is already the little-endian bytes a weights file stores; converting it through numpy cost seconds
    return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()


def content_key(data_type: int, dims, raw) -> str:
    return f"{data_type}:{tuple(dims)}:{hashlib.sha256(raw).hexdigest()}"


def refer(tensor: onnx.TensorProto, key: str, length: int) -> None:
    """Make `tensor` a reference to the stored bytes of `key` (its values cleared)."""
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.raw_data = b"\0"  # set_external_data insists on raw_data being present
    external_data_helper.set_external_data(tensor, location=location(key), offset=0, length=length)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # the initializers SharedNames names


class SharedNames:
    """One name for each stored tensor across an export's graphs. Graph-local names repeat (val_73 is one matrix in the
    encoder and another in the decoder) and one tensor has other names in other graphs, so a tensor is known by where
    its bytes are, and named by the first graph that holds it: its own name, or `graph/name` when another tensor took
    that one. Calibration and the quantizer name graphs in the contract's order, so what one measures the other finds."""

    def __init__(self, values: Tensors | None = None) -> None:
        self.values = values or INLINE
        self._by_place: dict[Any, str] = {}
        self._taken: set[str] = set()

    def graph(self, graph_name: str, graph: onnx.GraphProto) -> dict[str, str]:
        """{local name: shared name} of every float initializer of `graph`, in its order."""
        return {t.name: self._name(graph_name, t) for t in graph.initializer if t.data_type in FLOATS}

    def _name(self, graph_name: str, tensor: onnx.TensorProto) -> str:
        place = self.values.key(tensor) or _external_place(tensor)
        if place is None:  # bytes of its own: its content is its place
            array = self.values.array(tensor)
            place = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        if place not in self._by_place:
            name = tensor.name if tensor.name not in self._taken else f"{graph_name}/{tensor.name}"
            self._taken.add(name)
            self._by_place[place] = name
        return self._by_place[place]


def _external_place(tensor: onnx.TensorProto) -> tuple | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {entry.key: entry.value for entry in tensor.external_data}
    return info.get("location"), int(info.get("offset", 0)), int(info.get("length", 0))
