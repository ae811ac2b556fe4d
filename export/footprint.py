"""Will the export fit? Its peak memory estimated before any weight is loaded, from the parameter count and dtype.

The factor is measured (benchmarks/export_scale.py): the export's peak is reached while the graphs are optimized,
when the model's weights and the transposed copy of a tied embedding are both in memory (the linear layers' weights
are relaid in place, export/layout.py).
"""

from __future__ import annotations

import torch

from kvgraph.graphs import KvgraphError
from kvgraph.export import memory

PEAK_OVER_WEIGHTS = 1.6  # peak RSS over the weights' bytes, above the interpreter (measured 1.27x on Llama-3.2-1B's shape)
BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def parameter_bytes(config, auto_class, dtype: torch.dtype) -> int:
    """The weights' bytes in `dtype`, counted on a model built on the meta device (no memory; tied weights once)."""
    with torch.device("meta"):
        model = auto_class.from_config(config)
    return sum(p.numel() for p in model.parameters()) * BYTES.get(dtype, 4)


def check_fits(weights: int, description: str, dtype: torch.dtype) -> None:
    """Refuse, in one line, an export whose estimated peak exceeds what this machine has available."""
    available, resident = memory.available(), memory.resident()
    if available is None or resident is None:
        return  # not Linux: no estimate to compare with
    need = int(PEAK_OVER_WEIGHTS * weights)
    if need <= available:
        return
    half = "" if BYTES.get(dtype, 4) == 2 else f"; --dtype float16 halves it (about {memory.size_text(need // 2)})"
    raise KvgraphError(f"{description}: exporting needs about {memory.size_text(resident + need)} of memory ({memory.size_text(weights)} "
                       f"of weights, about {PEAK_OVER_WEIGHTS:g}x that at the peak) and this machine has "
                       f"{memory.size_text(resident + available)}{half}; nothing was written")
