"""Labelled numeric comparisons: max-abs-diff rows and the table printed from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Per-dtype tolerances: |actual - expected| <= atol + rtol * |expected|, elementwise.
TOLERANCES = {
    "float32": {"atol": 1e-4, "rtol": 0.0},  # SmolLM2-135M (30 layers) stays under 6e-5
    "float16": {"atol": 2e-2, "rtol": 2e-2},
}


@dataclass(frozen=True)
class DiffRow:
    graph: str  # "prefill" or "decode"
    step: int  # 0 for prefill, 1.. for decode steps
    tensor: str
    max_abs_diff: float
    ok: bool

    def to_json(self) -> dict:
        return asdict(self)


def compare(graph: str, step: int, tensor: str, actual: np.ndarray, expected: np.ndarray, dtype: str) -> DiffRow:
    """One labelled comparison; shape mismatches and NaNs count as failures."""
    tol = TOLERANCES[dtype]
    if actual.shape != expected.shape:
        return DiffRow(graph, step, f"{tensor} shape {actual.shape} != {expected.shape}", float("inf"), False)
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    diff = np.abs(a - e)
    max_diff = float(diff.max()) if diff.size else 0.0
    ok = bool(np.all(diff <= tol["atol"] + tol["rtol"] * np.abs(e))) and not np.isnan(diff).any()
    return DiffRow(graph, step, tensor, max_diff if not np.isnan(diff).any() else float("nan"), ok)


def format_table(rows: list[DiffRow]) -> str:
    """A readable table; failing rows are marked FAIL."""
    width = max([len(row.tensor) for row in rows] + [6])
    lines = [f"{'graph':8} {'step':>4}  {'tensor':{width}}  {'max|diff|':>10}  result"]
    for row in rows:
        result = "ok" if row.ok else "FAIL"
        lines.append(f"{row.graph:8} {row.step:>4}  {row.tensor:{width}}  {row.max_abs_diff:10.3e}  {result}")
    return "\n".join(lines)


def failures(rows: list[DiffRow]) -> list[DiffRow]:
    return [row for row in rows if not row.ok]


def compare_step(graph: str, step: int, names: list[str], actual: list[np.ndarray], expected: list[np.ndarray], attention_mask: np.ndarray, dtype: str) -> list[DiffRow]:
    """Compare one step's outputs (logits first, then cache tensors) by name.

    Cache tensors (B, Hkv, T, D) are compared only at columns where attention_mask (B, T) is 1:
    the contract leaves entries at padded columns unspecified.
    """
    rows = []
    for name, a, e in zip(names, actual, expected):
        if a.ndim == 4 and a.shape == e.shape and a.shape[2] == attention_mask.shape[1]:
            a, e = _real_columns(a, attention_mask), _real_columns(e, attention_mask)
        rows.append(compare(graph, step, name, a, e, dtype))
    return rows


def _real_columns(cache: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    # cache: (B, Hkv, T, D), attention_mask: (B, T) -> concatenation of every row's real columns
    return np.concatenate([cache[b][:, attention_mask[b] == 1, :].ravel() for b in range(cache.shape[0])])
