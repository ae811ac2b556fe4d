"""One copy of the weights for every session of an export.

Each onnxruntime session would otherwise load (and prepack) its own copy of model.onnx.data:
two sessions, twice the memory. Instead the weights file is memory-mapped once, read-only,
and every initializer of every graph is handed to its session as an OrtValue over that map
(`SessionOptions.add_initializer`). Prepacking is turned off for those sessions: a prepacked
weight is a per-session copy. weights.json, written by export, says which bytes each graph's
initializers read, so this needs neither the onnx package nor a protobuf parser.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..graphs import KvgraphError
from ..graphs.manifest import WEIGHTS_FORMAT, WEIGHTS_VERSION
from ..graphs.safety import check_inside

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class SharedWeights:
    """model.onnx.data mapped once; `initializers(graph)` gives that graph's name -> OrtValue."""

    def __init__(self, directory: Path, index_name: str) -> None:
        path = check_inside(directory, _name(index_name, Path(directory) / "kvgraph.json"), str(Path(directory) / "kvgraph.json"))
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            _check_version(index, path)
            weights = check_inside(directory, _name(index["file"], path), str(path))
            tensors, graphs, size = index["tensors"], index["graphs"], index["size"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise KvgraphError(f"{path}: cannot read the weights index: {exc}") from exc
        _check_size(weights, size, path)
        self._map = np.memmap(weights, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
        self._values = [self._value(i, entry, path) for i, entry in enumerate(tensors)]
        self._graphs = graphs
        self.path = path

    def _value(self, i: int, entry, path: Path) -> ort.OrtValue:
        try:
            offset, length, dtype, shape = int(entry["offset"]), int(entry["length"]), _DTYPES[entry["dtype"]], tuple(entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise KvgraphError(f"{path}: tensors[{i}] is malformed: {exc!r}") from exc
        count = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or length != count * np.dtype(dtype).itemsize or offset + length > self._map.size:
            raise KvgraphError(f"{path}: tensors[{i}] (offset {offset}, {length} bytes, shape {list(shape)}) "
                               f"does not fit the {self._map.size}-byte weights file")
        array = self._map[offset: offset + length].view(dtype).reshape(shape)
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


def check_weights_size(directory: Path, index_name: str) -> None:
    """The weights file is there and as long as the index says (sessions loading it themselves read it later)."""
    path = check_inside(directory, _name(index_name, Path(directory) / "kvgraph.json"), str(Path(directory) / "kvgraph.json"))
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        _check_version(index, path)
        weights, size = check_inside(directory, _name(index["file"], path), str(path)), int(index["size"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise KvgraphError(f"{path}: cannot read the weights index: {exc}") from exc
    _check_size(weights, size, path)


def _check_size(weights: Path, size: int, index: Path) -> None:
    if not weights.is_file():
        raise KvgraphError(f"{weights}: weights file missing")
    if weights.stat().st_size != size:
        raise KvgraphError(f"{weights}: {weights.stat().st_size} bytes, but {index.name} says {size} (truncated or replaced?)")


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
