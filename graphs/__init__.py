"""The graph contract shared by export, runtime and tests: names, shapes, manifest, checks.

Importing this package needs only numpy; `kvgraph.graphs.onnx_files` (graph rewrites and the
shared weights file) needs the `onnx` package from the export extra.
"""

from kvgraph.graphs.contract import GraphContract, TensorSpec, io_mismatches
from kvgraph.graphs.errors import KvgraphError, ManifestError, ValidationError
from kvgraph.graphs.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, ModelInfo, SpecialTokens

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "GraphContract",
    "KvgraphError",
    "Manifest",
    "ManifestError",
    "ModelInfo",
    "SpecialTokens",
    "TensorSpec",
    "ValidationError",
    "io_mismatches",
]
