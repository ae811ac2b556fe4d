"""weights.json, checked at every load, and the "mapped" weights policy built on it.

Under the "mapped" policy (session.WEIGHT_POLICIES) the weights file is memory-mapped once,
read-only, and every initializer of every graph is handed to its session as an OrtValue over that
map (`SessionOptions.add_initializer`). Prepacking is turned off for those sessions: a prepacked
weight is a per-session copy. weights.json, written by export, says which bytes each graph's
initializers read, so this needs neither the onnx package nor a protobuf parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kvgraph.graphs import KvgraphError
from kvgraph.graphs.manifest import WEIGHTS_FORMAT, WEIGHTS_VERSION
from kvgraph.graphs.safety import check_inside

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
           "int8": np.int8, "uint8": np.uint8}
_PACKED = {"int4": 0.5, "uint4": 0.5}  # bytes per element of types numpy cannot map (quantized exports): checked, not mapped


@dataclass(frozen=True)
class _Entry:
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]


class WeightsIndex:
    """weights.json read and checked: the weights file exists, has the stated size, and every tensor fits in it."""

    def __init__(self, directory: Path, index_name: str) -> None:
        path = check_inside(directory, _name(index_name, Path(directory) / "kvgraph.json"), str(Path(directory) / "kvgraph.json"))
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            _check_version(index, path)
            weights = check_inside(directory, _name(index["file"], path), str(path))
            tensors, graphs, size = index["tensors"], index["graphs"], int(index["size"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise KvgraphError(f"{path}: cannot read the weights index: {exc}") from exc
        if not weights.is_file():
            raise KvgraphError(f"{weights}: weights file missing")
        if weights.stat().st_size != size:
            raise KvgraphError(f"{weights}: {weights.stat().st_size} bytes, but {path.name} says {size} (truncated or replaced?)")
        self.path, self.weights, self.size, self.graphs = path, weights, size, graphs
        self.entries = [self._entry(i, entry) for i, entry in enumerate(tensors)]

    def _entry(self, i: int, entry) -> _Entry:
        try:
            item = _Entry(int(entry["offset"]), int(entry["length"]), str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
            width = _PACKED.get(item.dtype) or np.dtype(_DTYPES[item.dtype]).itemsize
        except (KeyError, TypeError, ValueError) as exc:
            raise KvgraphError(f"{self.path}: tensors[{i}] is malformed: {exc!r}") from exc
        count = int(np.prod(item.shape, dtype=np.int64))
        if item.offset < 0 or item.length != int(np.ceil(count * width)) or item.offset + item.length > self.size:
            raise KvgraphError(f"{self.path}: tensors[{i}] (offset {item.offset}, {item.length} bytes, shape {list(item.shape)}) "
                               f"does not fit the {self.size}-byte weights file")
        return item

    @property
    def mappable(self) -> bool:
        return all(entry.dtype in _DTYPES for entry in self.entries)


class SharedWeights:
    """model.onnx.data mapped once; `initializers(graph)` gives that graph's name -> OrtValue."""

    def __init__(self, index: WeightsIndex) -> None:
        self._map = np.memmap(index.weights, dtype=np.uint8, mode="r") if index.size else np.zeros(0, dtype=np.uint8)
        self._values = [self._value(entry) for entry in index.entries]
        self._graphs = index.graphs
        self.path = index.path

    def _value(self, entry: _Entry) -> ort.OrtValue:
        array = self._map[entry.offset: entry.offset + entry.length].view(_DTYPES[entry.dtype]).reshape(entry.shape)
        return ort.OrtValue.ortvalue_from_numpy(array)  # no copy: the OrtValue points into the map

    def initializers(self, graph: str) -> dict[str, ort.OrtValue]:
        names = self._graphs.get(graph)
        if not isinstance(names, dict):
            raise KvgraphError(f"{self.path}: no entry for graph {graph!r}")
        try:
            return {str(name): self._values[slot] for name, slot in names.items()}
        except (IndexError, TypeError) as exc:
            raise KvgraphError(f"{self.path}: graphs.{graph} points at a tensor that is not listed") from exc

    def add_to(self, options: ort.SessionOptions, graph: str) -> None:
        for name, value in self.initializers(graph).items():
            options.add_initializer(name, value)
        options.add_session_config_entry("session.disable_prepacking", "1")  # prepacked = a per-session copy


def _check_version(index, path: Path) -> None:
    """Refuse another format or a newer major version; an index without a version predates 1.0 and reads as 1.0."""
    if not isinstance(index, dict):
        raise KvgraphError(f"{path}: the weights index must be a JSON object")
    if index.get("format", WEIGHTS_FORMAT) != WEIGHTS_FORMAT:
        raise KvgraphError(f"{path}: field format is {index.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
    version = index.get("format_version", WEIGHTS_VERSION)
    major = str(version).split(".")[0]
    if not major.isdigit() or int(major) > int(WEIGHTS_VERSION.split(".")[0]):
        raise KvgraphError(f"{path}: format_version {version!r} is newer than this kvgraph reads ({WEIGHTS_VERSION}); upgrade kvgraph")


def _name(value, path: Path) -> str:
    if not isinstance(value, str) or Path(value).name != value:
        raise KvgraphError(f"{path}: a file name must be a plain name in the export directory, got {value!r}")
    return value
