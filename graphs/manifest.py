"""kvgraph.json: the versioned manifest that describes an export directory.

A reader accepts any manifest with the same major format version and refuses a newer major.
The graphs' I/O lists are derived from the contract and stored for other runtimes; on load
they must agree with what the contract derives, or the manifest is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvgraph.graphs import conventions
from kvgraph.graphs.contract import GraphContract, TensorSpec
from kvgraph.graphs.errors import ManifestError
from kvgraph.graphs.safety import check_inside

MANIFEST_NAME = "kvgraph.json"
FORMAT_VERSION = "1.4"  # 1.1: contract.cache / contract.max_length (static cache); 1.0 files read as dynamic
# 1.2: model.attention_windows (informational: the graphs apply the windows themselves), contract.value_head_dim, contract.ring_windows
# 1.3: quantization (weight-only int4/int8 exports: the scheme, the tensors, the quality report); absent or null: float weights
# 1.4: contract.verify and graphs.verify (verify.onnx: extend with logits at every new position); absent: false, no verify graph
METADATA_KEY = "kvgraph.manifest"  # key of the manifest JSON in each graph's metadata_props
WEIGHTS_FILE = "model.onnx.data"
WEIGHTS_INDEX = "weights.json"  # which bytes of WEIGHTS_FILE each graph's initializers read
WEIGHTS_FORMAT = "kvgraph-weights"  # weights.json's own format field (written by onnx_files, read by runtime/core/weights.py)
WEIGHTS_VERSION = "1.0"  # a reader accepts the same major version (and files without one, written before 1.0)


def graph_file(graph: str) -> str:
    """prefill -> prefill.onnx, decode -> decode.onnx, extend -> extend.onnx"""
    return f"{graph}.onnx"


@dataclass(frozen=True)
class ModelInfo:
    family: str  # the transformers model_type, e.g. "llama"
    architecture: str  # e.g. "LlamaForCausalLM"
    source: str  # local path, hub id, or "<in-memory LlamaForCausalLM>"
    max_positions: int | None
    parameter_bytes: int
    # Per decoder layer: the sliding window W it attends within (the last W cache positions), or None
    # for a layer that attends to everything. The window is applied inside the graphs, by their
    # masks: a runtime feeds the same inputs either way (format 1.2; older files: unknown, None).
    attention_windows: list[int | None] | None = None

    def __post_init__(self) -> None:
        windows = self.attention_windows
        if windows is not None and (not isinstance(windows, list) or not all(
                w is None or (isinstance(w, int) and not isinstance(w, bool) and w > 0) for w in windows)):
            raise ValueError(f"attention_windows must be a list of positive integers or nulls, got {windows!r}")


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    decoder_start_token_id: int | None = None  # encoder-decoder: the decoder's first input

    @property
    def feed_pad_id(self) -> int:
        """The id fed for padding and for finished rows: pad_token_id, else the first eos id, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0


@dataclass(frozen=True)
class Manifest:
    contract: GraphContract
    model: ModelInfo
    special_tokens: SpecialTokens
    opset: int
    ir_version: int
    versions: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # role -> file name
    validation: dict[str, Any] | None = None
    format_version: str = FORMAT_VERSION
    quantization: dict[str, Any] | None = None  # graphs/quantization.py's scheme, tensors and quality report

    # -- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        graphs = {
            name: {
                "file": graph_file(name),
                "inputs": [spec.to_json() for spec in inputs],
                "outputs": [spec.to_json() for spec in outputs],
            }
            for name, (inputs, outputs) in self.contract.graphs().items()
        }
        return {
            "format": "kvgraph",
            "format_version": self.format_version,
            "model": asdict(self.model),
            "contract": asdict(self.contract),
            "special_tokens": {**asdict(self.special_tokens), "eos_token_ids": list(self.special_tokens.eos_token_ids)},
            "conventions": conventions.describe(self.contract.static, self.contract.seq2seq),
            "opset": self.opset,
            "ir_version": self.ir_version,
            "graphs": graphs,
            "files": dict(self.files),
            "versions": dict(self.versions),
            "validation": self.validation,
            "quantization": self.quantization,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.dumps(), encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, data: Any, origin: str = MANIFEST_NAME) -> Manifest:
        reader = _Reader(data, origin)
        reader.check_version()
        contract = reader.build(GraphContract, "contract")
        for name, kind in _MODEL_FIELDS.items():
            reader.get(kind, "model", name)
        manifest = cls(
            contract=contract,
            model=reader.build(ModelInfo, "model"),
            special_tokens=_special_tokens(reader),
            opset=reader.get(int, "opset"),
            ir_version=reader.get(int, "ir_version"),
            versions=reader.get(dict, "versions"),
            files=_files(reader),
            validation=reader.get((dict, type(None)), "validation"),
            format_version=reader.get(str, "format_version"),
            quantization=reader.optional((dict, type(None)), "quantization"),
        )
        reader.check_graphs(contract)
        return manifest

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not Path(directory).is_dir():
            raise ManifestError(f"{directory}: not a directory (expected a kvgraph export directory)")
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest here; is {directory} a kvgraph export directory?")
        check_inside(Path(directory), MANIFEST_NAME, str(directory))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: cannot read the manifest: {exc}") from exc
        return cls.from_json(data, origin=str(path))


_MODEL_FIELDS = {"family": str, "architecture": str, "source": str, "max_positions": (int, type(None)), "parameter_bytes": int}


def _files(reader: _Reader) -> dict[str, str]:
    files = reader.get(dict, "files")
    for role, name in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ManifestError(f"{reader.origin}: files.{role} must be a plain file name in the export directory, got {name!r}")
    return files


def _special_tokens(reader: _Reader) -> SpecialTokens:
    tokens = reader.get(dict, "special_tokens")
    eos = reader.get(list, "special_tokens", "eos_token_ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
        raise ManifestError(f"{reader.origin}: special_tokens.eos_token_ids must be a list of integers, got {eos!r}")
    for key in ("bos_token_id", "pad_token_id", "decoder_start_token_id"):
        if tokens.get(key) is not None and (not isinstance(tokens.get(key), int) or isinstance(tokens.get(key), bool)):
            raise ManifestError(f"{reader.origin}: special_tokens.{key} must be an integer or null")
    return SpecialTokens(tokens.get("bos_token_id"), tuple(eos), tokens.get("pad_token_id"), tokens.get("decoder_start_token_id"))


class _Reader:
    """Reads typed fields out of manifest JSON, naming the file and field on any error."""

    def __init__(self, data: Any, origin: str) -> None:
        if not isinstance(data, dict):
            raise ManifestError(f"{origin}: the manifest must be a JSON object, got {type(data).__name__}")
        self.data = data
        self.origin = origin

    def get(self, kind: type | tuple[type, ...], *path: str) -> Any:
        node: Any = self.data
        for depth, key in enumerate(path):
            if not isinstance(node, dict) or key not in node:
                raise ManifestError(f"{self.origin}: missing field {'.'.join(path[: depth + 1])}")
            node = node[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(node, kinds) or (isinstance(node, bool) and bool not in kinds):
            raise ManifestError(f"{self.origin}: field {'.'.join(path)} has the wrong type ({type(node).__name__})")
        return node

    def optional(self, kind: type | tuple[type, ...], key: str) -> Any:
        """A top-level field that older formats do not have: None when absent."""
        return self.get(kind, key) if key in self.data else None

    def build(self, cls: type, key: str) -> Any:
        fields = self.get(dict, key)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{self.origin}: field {key} is invalid: {exc}") from exc

    def check_version(self) -> None:
        version = self.get(str, "format_version")
        major = version.split(".")[0]
        if not major.isdigit():
            raise ManifestError(f"{self.origin}: format_version {version!r} is not of the form MAJOR.MINOR")
        if int(major) > int(FORMAT_VERSION.split(".")[0]):
            raise ManifestError(
                f"{self.origin}: format_version {version} is newer than this kvgraph reads ({FORMAT_VERSION}); "
                "upgrade kvgraph"
            )

    def check_graphs(self, contract: GraphContract) -> None:
        for name, (inputs, outputs) in contract.graphs().items():
            for role, specs in (("inputs", inputs), ("outputs", outputs)):
                stored = self.get(list, "graphs", name, role)
                try:
                    stored_specs = [TensorSpec.from_json(item) for item in stored]
                except (KeyError, TypeError) as exc:
                    raise ManifestError(f"{self.origin}: graphs.{name}.{role} is malformed: {exc}") from exc
                if stored_specs != specs:
                    raise ManifestError(
                        f"{self.origin}: graphs.{name}.{role} disagrees with the contract fields "
                        f"(layers={contract.num_layers}, kv_heads={contract.num_kv_heads}, head_dim={contract.head_dim})"
                    )
