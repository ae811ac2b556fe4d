"""Where activation-aware scaling (AWQ) can be folded into a graph without a new node.

AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration") multiplies
each input row k of the matrices reading an activation x by s_k before quantizing them, and divides x by s_k, so the
float product is unchanged and the channels that carry large activations get finer steps. x / s costs nothing when
what makes x can be divided instead:

    RMSNormalization(h, γ)        -> RMSNormalization(h, γ / s)           (LayerNormalization: γ / s and β / s)
    Mul(h, γ), γ a (K,) constant  -> Mul(h, γ / s)
    Mul(a, MatMul(y, U))          -> Mul(a, MatMul(y, U / s along U's columns))   (the MLP's up projection)

    x ──┬─ MatMul(·, diag(s) Wq) ─▶        each reader's rows scaled by s, then quantized
        ├─ MatMul(·, diag(s) Wk) ─▶
        └─ MatMul(·, diag(s) Wv) ─▶

A fold is found only where every reader of x is a MatMul on a 2-D float constant and every divided constant has
no other reader, so the graph computes the same function in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from kvgraph.graphs.block_rounding import dequantize, quantize_blocks

AWQ_GRID = 20  # exponents 0, 1/20, ..., 19/20 tried (the paper's grid); 0 is no scaling, so calibration never loses
NORMS = {"RMSNormalization": (1,), "LayerNormalization": (1, 2), "SimplifiedLayerNormalization": (1,)}  # scale (and bias) inputs


@dataclass(frozen=True)
class Fold:
    """One activation's fold: the matrices whose rows take s, and the constants divided by s (name, axis)."""

    activation: str
    matrices: tuple[str, ...]
    divided: tuple[tuple[str, int], ...]  # (initializer, axis of s): 0 for a (K,) scale or bias, 1 for U's columns


def awq_folds(graph: onnx.GraphProto) -> list[Fold]:
    """Every fold the graph allows, in node order."""
    constants = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    found: list[Fold] = []
    seen: set[str] = set()
    for node in graph.node:
        x = node.input[0] if node.op_type == "MatMul" else None
        if x is None or x in seen:
            continue
        seen.add(x)
        matrices = _matrices(readers.get(x, []), constants, readers)
        divided = _divided(producer.get(x), constants, producer, readers) if matrices else None
        if matrices and divided:
            found.append(Fold(x, matrices, divided))
    return found


def _matrices(users: list[onnx.NodeProto], constants: dict, readers: dict) -> tuple[str, ...] | None:
    """The weights of x's readers, if all are MatMul(x, W) with W a 2-D constant read by MatMuls only."""
    names = []
    for user in users:
        if user.op_type != "MatMul" or len(user.input) < 2 or user.input[1] not in constants or user.input[0] == user.input[1]:
            return None
        weight = constants[user.input[1]]
        if len(weight.dims) != 2 or any(r.op_type != "MatMul" or list(r.input).index(weight.name) != 1 for r in readers[weight.name]):
            return None
        names.append(weight.name)
    return tuple(dict.fromkeys(names)) or None


def _divided(node: onnx.NodeProto | None, constants: dict, producer: dict, readers: dict) -> tuple[tuple[str, int], ...] | None:
    """The constants that divide x by s for the node making x, or None where none can."""
    if node is None:
        return None
    only_here = lambda name: name in constants and len(readers.get(name, [])) == 1
    if node.op_type in NORMS:
        inputs = [node.input[i] for i in NORMS[node.op_type] if i < len(node.input) and node.input[i]]
        ok = all(only_here(n) and len(constants[n].dims) == 1 for n in inputs) and node.input[1] in inputs
        return tuple((n, 0) for n in inputs) if ok else None
    if node.op_type != "Mul":
        return None
    for i, other in ((0, 1), (1, 0)):
        name = node.input[i]
        if only_here(name) and len(constants[name].dims) == 1:
            return ((name, 0),)
        up = producer.get(name)
        if (up is not None and up.op_type == "MatMul" and len(readers.get(name, [])) == 1 and only_here(up.input[1])
                and len(constants[up.input[1]].dims) == 2 and node.input[other] not in constants):
            return ((up.input[1], 1),)
    return None


def awq_scale(x: np.ndarray, matrices: list[np.ndarray], bits: int, block: int) -> np.ndarray:
    """s (K,) = mean|x|^a, normalised to a geometric mean of 1, with the exponent a of the grid that minimises
    sum ||x W - (x / s) Q(diag(s) W)||^2 over the matrices reading x (Q: round-to-nearest blocks). x: (tokens, K)."""
    mean = np.maximum(np.abs(x).mean(axis=0), 1e-8)
    references = [x @ w for w in matrices]
    best, chosen = np.inf, np.ones_like(mean)
    for a in np.arange(AWQ_GRID) / AWQ_GRID:
        s = mean ** a
        s = np.clip(s / np.sqrt(s.max() * s.min()), 1e-4, 1e4).astype(np.float32)
        scaled = x / s
        error = sum(float(np.square(scaled @ dequantize(quantize_blocks(s[:, None] * w, bits, block, False), block) - r).sum())
                    for w, r in zip(matrices, references))
        if error < best:
            best, chosen = error, s
    return chosen


def apply_fold(fold: Fold, s: np.ndarray, values: dict[str, np.ndarray]) -> None:
    """In place on {name: float array}: the fold's matrices' rows times s, its divided constants over s."""
    for name in fold.matrices:
        values[name] = (s[:, None] * values[name]).astype(values[name].dtype)
    for name, axis in fold.divided:
        divisor = s if axis == 0 else s[None, :]
        values[name] = (values[name] / divisor).astype(values[name].dtype)
