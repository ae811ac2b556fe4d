"""The linear weights written into the weights file while the graphs are traced and optimized.

Once laid out (export/layout.py), a linear weight's (in, out) storage holds exactly the bytes the graphs will store
for it, so nothing has to wait for the graphs to write them. A thread hashes and writes each one while tracing and
optimizing keep the cores busy; writing 5 GB is bound by the disk, not the CPU:

    layout ─▶ trace ─▶ optimize ─▶ write (the rest: embeddings, norms, the graphs)
              └─ stream: hash + write each linear weight ─┘ joined before write

The graphs' own pass over their initializers finds those bytes already there, by the same content key, and does not
hash them again (WeightStore.known). Layout only: the file holds each tensor once, as before.
"""

from __future__ import annotations

import threading
from pathlib import Path

import onnx
import torch

from kvgraph.graphs.onnx_files import WeightsFile
from kvgraph.graphs.weight_store import WeightStore, content_key

_ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}


class WeightStream:
    """Writes `weights` ((in, out) storages: the transposes of the laid-out linear weights) into `path` from a thread."""

    def __init__(self, path: Path, weights: list[torch.Tensor], store: WeightStore) -> None:
        self.file = WeightsFile(path)
        self.store = store
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=([w.detach().t() for w in weights if w.dtype in _ONNX_TYPES],),
                                       name="kvgraph-weight-stream", daemon=True)
        self.thread.start()

    def _run(self, storages: list[torch.Tensor]) -> None:
        try:
            for storage in storages:
                self._write(storage)
        except BaseException as exc:  # raised again by join(), in the exporting thread
            self.error = exc

    def _write(self, storage: torch.Tensor) -> None:
        if not storage.is_contiguous():
            return  # not laid out as the graph stores it: the write phase takes it
        data_type = _ONNX_TYPES[storage.dtype]
        raw = storage.view(torch.uint8).numpy().reshape(-1)
        key = content_key(data_type, tuple(storage.shape), raw)
        self.store.known[(raw.ctypes.data, raw.nbytes, data_type, tuple(storage.shape))] = key
        self.file.add(key, raw, data_type, tuple(storage.shape))

    def join(self) -> WeightsFile:
        """Wait for the thread; the open file, with what it wrote. The stream lets go of the store (whose blobs are
        views of the weights: held here, they would outlive the weights' release before validation)."""
        self.thread.join()
        self.store = None
        if self.error is not None:
            raise self.error
        return self.file

    def __enter__(self) -> "WeightStream":
        return self

    def __exit__(self, *exc_info) -> None:
        """Whatever happened, the thread is done and the file closed before the staging directory can go."""
        self.thread.join()
        if not self.file.handle.closed:
            self.file.handle.close()
