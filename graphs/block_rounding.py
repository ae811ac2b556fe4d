"""How a float matrix becomes blocks of integer codes: round to nearest, a searched grid, or GPTQ.

Every form is blocks of `bs` weights along the matrix's axis 0 (its input dimension K), each block one scale and one
offset per output column:

    nearest   min/max of the block over 2^bits - 1 steps (onnxruntime's own block quantizer kernels)
    search    the grid with the least (importance-weighted) squared error among 11 (llama.cpp's make_qkx2_quants)
    gptq      the searched grid, and each row's rounding error compensated on the rows not yet rounded, through the
              inverse Hessian of the layer's calibration inputs (Frantar et al. 2022, "GPTQ: Accurate Post-Training
              Quantization for Generative Pre-trained Transformers", Algorithm 1, lazy batches, groups = blocks)

The result is always integer codes, a scale and an integer zero point (or a float minimum): standard DequantizeLinear.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

_TYPES = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}


@dataclass(frozen=True)
class Blocks:
    """A matrix quantized in blocks of `block` along its axis 0: q (K, N), scales and zero points (K/bs, N)."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    minimums: np.ndarray | None = None  # float_min: (K/bs, N) floats added to each block's scale * code

    @property
    def nbytes(self) -> int:
        bits = 4 if self.q.dtype in (ml_dtypes.int4, ml_dtypes.uint4) else 8
        zero = 0 if self.zero_points is None else self.zero_points.size * bits // 8
        return self.q.size * bits // 8 + self.scales.nbytes + zero + (0 if self.minimums is None else self.minimums.nbytes)


def quantize_blocks(matrix: np.ndarray, bits: int, block: int, symmetric: bool) -> Blocks:
    """Round-to-nearest blocks along axis 0 of a (K, N) float matrix, by onnxruntime's kernels."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = matrix.shape  # (K, N)
    blocks = rows // block
    per_byte = 8 // bits
    packed = np.zeros((cols, blocks, block // per_byte), dtype=np.uint8)  # (N, K/bs, bytes per block)
    scales = np.zeros((cols, blocks), dtype=matrix.dtype)
    zero = np.zeros((cols, -(-blocks // per_byte)), dtype=np.uint8)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(packed, np.ascontiguousarray(matrix), scales, zero, block, cols, rows, symmetric)
    q = _unpack(packed.reshape(cols, -1), bits, rows).astype(np.int16)  # (N, K), unsigned
    if symmetric:  # the kernel's symmetric codes are offset by 2^(bits-1); the signed type stores them centred
        signed = _TYPES[(bits, True)]
        return Blocks(np.ascontiguousarray((q - (1 << (bits - 1))).T).astype(signed), np.ascontiguousarray(scales.T), None)
    points = _unpack(zero, bits, blocks)
    unsigned = _TYPES[(bits, False)]
    return Blocks(np.ascontiguousarray(q.T).astype(unsigned), np.ascontiguousarray(scales.T),
                   np.ascontiguousarray(points.T).astype(unsigned))


def float_min_blocks(matrix: np.ndarray, bits: int, block: int) -> Blocks:
    """Blocks along axis 0 of a (K, N) float matrix as w = scale * code + minimum, code in 0 .. 2^bits - 1 and scale the
    block's range over that many steps (llama.cpp's Q4_1 rounding). Stored as signed codes centred on 0 (code - 2^(bits-1))
    with the minimum moved by 2^(bits-1) scales, so the integer part is the symmetric DequantizeLinear that onnxruntime
    fuses into its 4-bit kernel, and the minimum is a float per block."""
    rows, cols = matrix.shape
    x = matrix.astype(np.float32).reshape(rows // block, block, cols)
    low, high = x.min(axis=1), x.max(axis=1)  # (K/bs, N)
    levels = (1 << bits) - 1
    scale = (high - low) / levels
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.round((x - low[:, None]) / safe[:, None]), 0, levels)
    centre = 1 << (bits - 1)
    q = (codes - centre).reshape(rows, cols).astype(_TYPES[(bits, True)])
    return Blocks(q, scale.astype(matrix.dtype), None, (low + centre * scale).astype(matrix.dtype))


# The search over each block's grid (llama.cpp's make_qkx2_quants, the k-quants' search): the block's range is
# divided into levels - 1 + t steps for t in SEARCH_STEPS (t = 1: plain min/max rounding, always a candidate), the
# block rounded onto each grid, the grid's scale and offset then fitted by weighted least squares to the codes
# chosen, and the candidate with the least weighted squared error kept. The weights are each input channel's mean
# squared activation on calibration text when given (llama.cpp's importance matrix), else 1.
SEARCH_STEPS = np.linspace(-1.0, 1.0, 11)


def searched_blocks(matrix: np.ndarray, bits: int, block: int, float_min: bool, importance: np.ndarray | None = None) -> Blocks:
    """Blocks along axis 0 of a (K, N) float matrix, each block's scale and offset searched to minimise its weighted
    squared error. float_min: w = scale * code + minimum (signed codes centred, as float_min_blocks); else the
    asymmetric integer-zero-point form of quantize_blocks (w = scale * (code - zero point)), standard DequantizeLinear.
    importance: (K,) weights of the input channels (None: all 1)."""
    scale, offset = searched_grid(matrix, bits, block, float_min, importance)
    codes = grid_codes(matrix, scale, offset, bits, block)
    return grid_blocks(codes, scale, offset, bits, float_min, matrix.dtype)


def searched_grid(matrix: np.ndarray, bits: int, block: int, float_min: bool,
                  importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), each (K/bs, N): the searched grid of every block (w = scale * code + offset; without float_min
    the offset is -scale * an integer zero point)."""
    rows, cols = matrix.shape
    x = matrix.astype(np.float32).reshape(rows // block, block, cols).transpose(0, 2, 1)  # (K/bs, N, bs)
    w = np.ones((1, 1, block), np.float32) if importance is None else \
        np.maximum(importance.astype(np.float32), 1e-12).reshape(rows // block, 1, block)
    levels = (1 << bits) - 1
    low, high = x.min(axis=-1), x.max(axis=-1)
    span = np.where(high > low, high - low, 1.0)
    best = None
    for t in SEARCH_STEPS:
        codes = np.clip(np.round((x - low[..., None]) * ((levels + t) / span)[..., None]), 0, levels)
        scale, offset = _fit(x, w, codes)
        if not float_min:  # the offset must sit on the grid: offset = -scale * zero point, zero point an integer code
            scale = np.where(scale > 0, scale, span / levels)
            zero = np.clip(np.round(-offset / scale), 0, levels)
            codes = np.clip(np.round(x / scale[..., None]) + zero[..., None], 0, levels)
            scale = _fit_scale(x, w, codes - zero[..., None], scale)
            offset = -scale * zero
        error = (w * (scale[..., None] * codes + offset[..., None] - x) ** 2).sum(axis=-1)
        if best is None:
            best = [error, scale, offset]
        else:
            better = error < best[0]
            best = [np.where(better, new, old) for new, old in zip((error, scale, offset), best)]
    _, scale, offset = best
    return scale.astype(matrix.dtype), offset.astype(np.float32)


def grid_codes(matrix: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int, block: int) -> np.ndarray:
    """The (K, N) codes, 0 .. 2^bits - 1, nearest to each weight on its block's grid."""
    step = np.repeat(np.where(scale > 0, scale, 1.0).astype(np.float32), block, axis=0)
    return np.clip(np.round((matrix.astype(np.float32) - np.repeat(offset, block, axis=0)) / step), 0, (1 << bits) - 1)


def grid_blocks(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int, float_min: bool, dtype) -> Blocks:
    """The stored form of (K, N) codes on a grid (scale, offset): centred signed codes and float minimums (float_min),
    else unsigned codes and integer zero points."""
    if float_min:
        centre = 1 << (bits - 1)
        return Blocks((codes - centre).astype(_TYPES[(bits, True)]), scale, None, (offset + centre * scale).astype(dtype))
    zero = np.round(-offset / np.where(scale > 0, scale, 1.0))
    unsigned = _TYPES[(bits, False)]
    return Blocks(codes.astype(unsigned), scale, zero.astype(unsigned))


def _fit(x: np.ndarray, w: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) minimising sum w (scale * codes + offset - x)^2 over the last axis (a flat block: offset = mean)."""
    sw, sl, sll = (np.broadcast_to(w, x.shape)).sum(-1), (w * codes).sum(-1), (w * codes * codes).sum(-1)
    sx, slx = (w * x).sum(-1), (w * codes * x).sum(-1)
    det = sw * sll - sl * sl
    flat = det <= 1e-20
    safe = np.where(flat, 1.0, det)
    scale = np.where(flat, 0.0, (sw * slx - sl * sx) / safe)
    offset = np.where(flat, sx / sw, (sll * sx - sl * slx) / safe)
    return scale, offset


def _fit_scale(x: np.ndarray, w: np.ndarray, centred: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The scale minimising sum w (scale * centred - x)^2 (centred = code - zero point), else `fallback`."""
    den = (w * centred * centred).sum(-1)
    return np.where(den > 0, (w * centred * x).sum(-1) / np.where(den > 0, den, 1.0), fallback)


def dequantize_float_min(blocks: Blocks, block: int) -> np.ndarray:
    """The float matrix a float-minimum block computes (for tests and reports)."""
    q = blocks.q.astype(np.float32)
    scale, low = (np.repeat(a.astype(np.float32), block, axis=0) for a in (blocks.scales, blocks.minimums))
    return (q * scale + low).astype(blocks.scales.dtype)


def _unpack(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """(rows, bytes) of packed codes, low nibble first for 4 bits -> (rows, length) uint8."""
    if bits == 8:
        return packed[:, :length]
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)[:, :length]


def dequantize(blocks: Blocks, block: int) -> np.ndarray:
    """The float matrix the graph computes from the blocks (for tests and reports)."""
    q = blocks.q.astype(np.float32)
    zero = 0.0 if blocks.zero_points is None else np.repeat(blocks.zero_points.astype(np.float32), block, axis=0)
    return ((q - zero) * np.repeat(blocks.scales.astype(np.float32), block, axis=0)).astype(blocks.scales.dtype)


def block_bytes(rows: int, cols: int, bits: int, block: int, float_min: bool, scale_size: int = 4) -> int:
    """Bytes of a (rows, cols) matrix quantized in blocks along its rows: codes, scales, zero points or minimums."""
    blocks = rows // block * cols
    return rows * cols * bits // 8 + scale_size * blocks + (scale_size * blocks if float_min else blocks * bits // 8)




GPTQ_DAMP = 0.01  # the paper's dampening: this share of the Hessian's mean diagonal added to its diagonal
GPTQ_LAZY = 128  # rows rounded between two updates of the rest of the matrix (the paper's lazy batch)


def gptq_blocks(matrix: np.ndarray, bits: int, block: int, float_min: bool, gram: np.ndarray) -> Blocks:
    """GPTQ's rounding of a (K, N) matrix of MatMul(x, W): the rows (input channels) rounded in order, each block's grid
    searched when its first row is reached (on the rows as compensated so far), each row's error spread over the rows
    not yet rounded by the inverse Hessian's Cholesky factor. gram: (K, K) mean of x^T x over the calibration tokens."""
    rows, cols = matrix.shape
    w = matrix.astype(np.float32)  # a copy: compensated in place
    upper, dead = _inverse_hessian_factor(gram)
    w[dead] = 0.0  # channels calibration never drives: nothing to preserve
    diagonal = np.diag(gram).astype(np.float32)
    levels = (1 << bits) - 1
    codes = np.empty((rows, cols), np.float32)
    scales = np.empty((rows // block, cols), matrix.dtype)
    offsets = np.empty((rows // block, cols), np.float32)
    lazy = max(GPTQ_LAZY, block)
    for start in range(0, rows, lazy):
        stop = min(start + lazy, rows)
        errors = np.empty((stop - start, cols), np.float32)
        for r in range(start, stop):
            if r % block == 0:
                g = r // block
                scale, offset = searched_grid(w[r: r + block], bits, block, float_min, diagonal[r: r + block])
                scales[g], offsets[g] = scale[0], offset[0]
                scale32, offset32 = scales[g].astype(np.float32), offsets[g]  # as stored (fp16 scales round)
                step = np.where(scale32 > 0, scale32, 1.0)
            codes[r] = np.clip(np.round((w[r] - offset32) / step), 0, levels)
            error = (w[r] - (scale32 * codes[r] + offset32)) / upper[r, r]
            w[r + 1: stop] -= np.outer(upper[r, r + 1: stop], error)
            errors[r - start] = error
        w[stop:] -= upper[start:stop, stop:].T @ errors
    return grid_blocks(codes, scales, offsets, bits, float_min, matrix.dtype)


def _inverse_hessian_factor(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): the upper Cholesky factor of the dampened Hessian's inverse (H^-1 = U^T U), and the channels whose
    Hessian diagonal is zero (given a unit diagonal, as the paper does)."""
    h = gram.astype(np.float64)  # a copy
    dead = np.diag(h) <= 0
    h[np.flatnonzero(dead), np.flatnonzero(dead)] = 1.0
    h[np.diag_indices_from(h)] += GPTQ_DAMP * np.mean(np.diag(h))
    inverse = np.linalg.inv(h)
    return np.linalg.cholesky((inverse + inverse.T) / 2).T.astype(np.float32), dead


class BlockRounding:
    """Which rounding a quantization uses, with what calibration gave it; the blocks of each (name, bits, form)
    computed once (mixed precision measures a matrix's int4 blocks, then the export stores the same ones)."""

    def __init__(self, rounding: str, symmetric: bool, block: int, importance: dict[str, np.ndarray] | None = None,
                 inputs: dict[str, np.ndarray] | None = None) -> None:
        """importance: {matrix: (K,) mean squared input}; inputs: {matrix: (T, K) calibration inputs} (gptq)."""
        self.rounding, self.symmetric, self.block = rounding, symmetric, block
        self.importance, self.inputs = importance or {}, inputs or {}
        self._memo: dict[tuple, Blocks] = {}
        self._gram: tuple[int, np.ndarray] | None = None  # q, k and v share one input: its gram made once

    def blocks(self, name: str, matrix: np.ndarray, bits: int, float_min: bool) -> Blocks:
        """`matrix` (K, N), blocks along K; name: its initializer (what calibration measured)."""
        key = (name, bits, float_min, matrix.shape)
        if key not in self._memo:
            self._memo[key] = self._round(name, matrix, bits, float_min)
        return self._memo[key]

    def forget(self, name: str) -> None:
        """Drop the memo of a matrix once stored (its blocks are then held by the export)."""
        for key in [k for k in self._memo if k[0] == name]:
            del self._memo[key]

    def dequantized(self, name: str, matrix: np.ndarray, bits: int, float_min: bool) -> np.ndarray:
        """The (K, N) float matrix `matrix`'s blocks compute."""
        blocks = self.blocks(name, matrix, bits, float_min)
        return dequantize_float_min(blocks, self.block) if float_min else dequantize(blocks, self.block)

    def _round(self, name: str, matrix: np.ndarray, bits: int, float_min: bool) -> Blocks:
        importance = self._fitting(self.importance.get(name), matrix)
        inputs = self._fitting(self.inputs.get(name), matrix, axis=-1)
        if self.rounding == "gptq" and inputs is not None and not self.symmetric:
            return gptq_blocks(matrix, bits, self.block, float_min, self._gram_of(inputs))
        if self.rounding in ("search", "gptq") and not self.symmetric:
            return searched_blocks(matrix, bits, self.block, float_min, importance)
        if float_min:
            return float_min_blocks(matrix, bits, self.block)
        return quantize_blocks(matrix, bits, self.block, self.symmetric)

    @staticmethod
    def _fitting(evidence: np.ndarray | None, matrix: np.ndarray, axis: int = 0) -> np.ndarray | None:
        """Calibration's evidence for a matrix if it describes its input dimension (a transposed gather does not)."""
        return evidence if evidence is not None and evidence.shape[axis] == matrix.shape[0] else None

    def _gram_of(self, inputs: np.ndarray) -> np.ndarray:
        if self._gram is None or self._gram[0] != id(inputs):
            x = inputs.astype(np.float64)
            self._gram = (id(inputs), x.T @ x / len(x))
        return self._gram[1]
