"""Linear weights laid out as the graph stores them, so that optimizing the graph copies no weight.

`nn.Linear` keeps W as (out, in) and computes x @ W.T. The traced graph reads `Transpose(W)` and the optimizer folds
that into a new (in, out) constant: for a while the model's W and the graph's W.T are both in memory, twice the
linear weights. Laid out transposed before tracing, W is a view of (in, out) storage, the folded transpose is a view of
that same storage, and the graph's weights are the model's own memory:

    before:  W (out, in) storage ──Transpose (folded: a copy)──▶ W.T (in, out)             2 × the weights at the peak
    after:   W.T (in, out) storage ◀── W: a (out, in) view ──Transpose (folded: a view)──▶ the same storage

A checkpoint loaded memory-mapped keeps its file's pages resident once read; the relaid weight's old pages are
unmapped from the process (they stay in the file), so the model holds each weight once. Layout only: every value and
every result of the model is unchanged. A tied embedding's matrix stays as it is (the
input embedding gathers its rows). One weight is relaid at a time, so the change costs one matrix of memory at most.

With a scratch directory (a quantized export, which never needs all the float weights at once), the relaid weights
live in a file there instead of in the process's own memory: each one's pages are dropped once written, and come back
from the file (the page cache) when a later phase reads them, so the float weights never count in full.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from kvgraph.graphs.rewrites.graph_edit import transposed_copy
from kvgraph.export import memory


def linear_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights of the model's nn.Linear layers, each once, without those an embedding shares (tied)."""
    embedded = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    weights: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 2 and id(weight) not in embedded:
            weights.setdefault(id(weight), weight)
    return list(weights.values())


@contextlib.contextmanager
def transposed_storage(model: torch.nn.Module, restore: bool, scratch: Path | None = None):
    """Lay every linear weight out as (in, out) storage for the duration; `restore` lays them back on exit (a model
    the caller passed in comes back as it was, strides included). `scratch`: a directory for the file that holds them."""
    weights = linear_weights(model)
    place = _FilePlacer(scratch, weights) if scratch is not None else _MemoryPlacer(weights)
    with torch.no_grad():
        for weight in weights:
            before = weight.data
            memory.populate(before.data_ptr(), before.numel() * before.element_size())  # one call, not a fault a page
            weight.data = place(before).t()
            memory.drop_file_pages(before.data_ptr(), before.numel() * before.element_size())
    try:
        yield weights
    finally:
        if restore:
            with torch.no_grad():
                for weight in weights:
                    weight.data = weight.data.contiguous()


_SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bits as integers: numpy has no bfloat16


class _Placer:
    """Writes each weight's transposed copy (graphs' banded, threaded copy: about twice torch's speed on a large matrix)
    into one block of memory, weight after weight."""

    def __init__(self, block: np.ndarray) -> None:
        self.block, self.offset = block, 0

    def __call__(self, matrix: torch.Tensor) -> torch.Tensor:
        size = matrix.numel() * matrix.element_size()
        rows, cols = matrix.shape
        bits = matrix.view(_SAME_SIZE[matrix.element_size()]).numpy()
        out = self.block[self.offset: self.offset + size].view(bits.dtype).reshape(cols, rows)
        self.offset += size
        transposed_copy(bits, out=out)
        self.placed(out)
        return torch.from_numpy(out).view(matrix.dtype)

    def placed(self, out: np.ndarray) -> None:
        pass


class _MemoryPlacer(_Placer):
    """The process's own memory, in huge pages where the kernel gives them: 4 GB of weights is a million page faults in
    4 KB pages, which cost more than the copy."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__(memory.huge_page_block(sum(w.numel() * w.element_size() for w in weights)))


class _FilePlacer(_Placer):
    """One shared file mapping (scratch/layout.bin); each weight's pages are dropped once written."""

    def __init__(self, scratch: Path, weights: list[torch.Tensor]) -> None:
        sizes = [w.numel() * w.element_size() for w in weights]
        super().__init__(np.memmap(Path(scratch) / "layout.bin", dtype=np.uint8, mode="w+", shape=(max(1, sum(sizes)),)))

    def placed(self, out: np.ndarray) -> None:
        memory.drop_file_pages(out.ctypes.data, out.nbytes)
