"""torch + transformers -> the prefill and decode ONNX graphs of kvgraph's contract.

Attributes load lazily, so `kvgraph --help` and the export CLI's argument parsing work
without importing torch.
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {"export_model": ".api", "ExportResult": ".api", "TraceError": ".trace"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kvgraph.export' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name], __name__), name)
