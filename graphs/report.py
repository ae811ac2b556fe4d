"""Labelled numeric comparisons: max-abs-diff rows and the table printed from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# The one tolerance table, per dtype: |actual - expected| <= atol + rtol * |expected| + scale * max|expected|,
# elementwise. TOLERANCES: the exported graphs in onnxruntime against PyTorch eager. SmolLM2-135M
# (30 layers) stays under 6e-5. A matmul's rounding error grows with the size of its whole output, not
# of each element: the untied lm_head of t5-v1_1 (logits up to |82|) differs by 1.6e-4 on a logit
# near 0, hence the `scale` term (8e-4 there; a wrong cache, mask or position moves logits by 0.1 and more).
TOLERANCES = {
    "float32": {"atol": 1e-4, "rtol": 0.0, "scale": 1e-5},
    "float16": {"atol": 2e-2, "rtol": 2e-2},
}
# VECTOR_TOLERANCES: another runtime against golden vectors (onnxruntime's). Another implementation
# of the same ops sums in another order: over SmolLM2's 30 layers onnx's ReferenceEvaluator differs
# from onnxruntime by up to 1.7e-4 in the logits, large or near zero alike; a wrong cache, mask or
# position moves them by 0.1 and more.
VECTOR_TOLERANCES = {
    "float32": {"atol": 5e-4, "rtol": 0.0},
    "float16": {"atol": 2e-2, "rtol": 2e-2},
}


def excess(actual: np.ndarray, expected: np.ndarray, tolerance: dict) -> np.ndarray:
    """How far each element is beyond atol + rtol * |expected| + scale * max|expected| (> 0 fails; NaN counts as +inf)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    largest = float(np.abs(e).max()) if e.size else 0.0
    over = np.abs(a - e) - (tolerance["atol"] + tolerance["rtol"] * np.abs(e) + tolerance.get("scale", 0.0) * largest)
    return np.where(np.isnan(over), np.inf, over)


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
    if actual.shape != expected.shape:
        return DiffRow(graph, step, f"{tensor} shape {actual.shape} != {expected.shape}", float("inf"), False)
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    ok = not diff.size or float(excess(actual, expected, TOLERANCES[dtype]).max()) <= 0
    return DiffRow(graph, step, tensor, max_diff if not np.isnan(diff).any() else float("nan"), ok)


def format_table(rows: list[DiffRow]) -> str:
    """A readable table; failing rows are marked FAIL."""
    width = max([len(row.tensor) for row in rows] + [6])
    lines = [f"{'graph':8} {'step':>4}  {'tensor':{width}}  {'max|diff|':>10}  result"]
    for row in rows:
        result = "ok" if row.ok else "FAIL"
        lines.append(f"{row.graph:8} {row.step:>4}  {row.tensor:{width}}  {row.max_abs_diff:10.3e}  {result}")
    return "\n".join(lines)


def graph_summaries(rows: list[DiffRow], tolerance: dict) -> list[str]:
    """One line per graph: its worst |diff| (tensor, step), the tolerance, ok or how many rows FAIL."""
    limit = ", ".join(f"{key} {value:g}" for key, value in tolerance.items() if value)
    lines = []
    for graph in dict.fromkeys(row.graph for row in rows):
        mine = [row for row in rows if row.graph == graph]
        worst = max(mine, key=lambda row: row.max_abs_diff if row.max_abs_diff == row.max_abs_diff else float("inf"))
        bad = failures(mine)
        result = "ok" if not bad else f"FAIL ({len(bad)} of {len(mine)} tensors)"
        lines.append(f"{graph:8} worst |diff| {worst.max_abs_diff:.2e} ({worst.tensor}, step {worst.step}) "
                     f"over {len(mine)} tensors, tolerance {limit}: {result}")
    return lines


def failures(rows: list[DiffRow]) -> list[DiffRow]:
    return [row for row in rows if not row.ok]


def compare_step(graph: str, step: int, names: list[str], actual: list[np.ndarray], expected: list[np.ndarray], attention_mask: np.ndarray,
                 dtype: str, held: dict[str, int] | None = None) -> list[DiffRow]:
    """Compare one step's outputs (logits first, then cache tensors) by name.

    Cache tensors (B, Hkv, T, D) are compared only at columns where attention_mask (B, T) is 1:
    the contract leaves entries at padded columns unspecified. `held` names the tensors that keep only
    their last W columns (a static cache's rings): those are compared there.
    """
    rows = []
    for name, a, e in zip(names, actual, expected):
        if a.ndim == 4 and a.shape == e.shape and a.shape[2] == attention_mask.shape[1]:
            window = (held or {}).get(name, a.shape[2])
            a, e, mask = a[:, :, -window:], e[:, :, -window:], attention_mask[:, -window:]
            a, e = _real_columns(a, mask), _real_columns(e, mask)
        rows.append(compare(graph, step, name, a, e, dtype))
    return rows


def _real_columns(cache: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    # cache: (B, Hkv, T, D), attention_mask: (B, T) -> concatenation of every row's real columns
    return np.concatenate([cache[b][:, attention_mask[b] == 1, :].ravel() for b in range(cache.shape[0])])
