"""Weight-only quantization of an export's graphs (int4 / int8), in standard ONNX.

The numbers come from onnxruntime.quantization's round-to-nearest block quantizer kernels, the
ones its MatMulNBits quantizer runs. Its own QDQ output covers 4-bit MatMul only (no 8-bit, no
Gather), so the rewrite into standard nodes is written here:

    MatMul(x, W (K, N)):
        W.q (K, N) int4|uint4|int8|uint8 ─┐
        W.scales (K/bs, N) ───────────────┼─ DequantizeLinear(axis 0, block_size bs) ─▶ MatMul(x, ·)
        W.zero_points (K/bs, N), if asym ─┘

onnxruntime fuses each DequantizeLinear → MatMul pair into its MatMulNBits kernel when it loads
the graph (checked by tests/test_quantize.py). A matrix that is gathered (the embedding, tied
to the lm_head or not) cannot be int4: standard Gather does not read int4. It is quantized to
`embedding_bits` (8) and gathered before it is dequantized, so a step dequantizes a few rows:

    Gather(W (H, V), ids, axis 1):
        W.q (H, V) int8 ──Gather(axis 1)──▶ (H, *ids) ─┐
        W.scales ─────────Gather(axis 1)──▶ ───────────┼─ DequantizeLinear(block axis) ─▶ (H, *ids)
        W.zero_points ────Gather(axis 1)──▶ ───────────┘

Every MatMul reading the matrix gets its own DequantizeLinear (onnxruntime fuses a pair only when
the DequantizeLinear has one consumer). Identical matrices in several graphs are quantized once
and give identical initializers, which the weights file then stores once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from kvgraph.graphs.block_rounding import Blocks, BlockRounding
from kvgraph.graphs.errors import KvgraphError
from kvgraph.graphs.rewrites.fused_projections import fuse_sibling_projections
from kvgraph.graphs.rewrites.graph_edit import attr
from kvgraph.graphs.weight_store import INLINE, SharedNames, Tensors

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # powers of two from 16: what onnxruntime's MatMulNBits kernel takes
EMBEDDING_BITS = 8  # standard Gather reads int8, not int4 (llama.cpp's Q4_1 files keep token_embd at Q8_0 too)
QUANTIZED_OPSET = 21  # blocked DequantizeLinear (block_size) and int4 types
# bits -> (min top-1 agreement, max perplexity ratio) a quantized export must reach against its float export
# to be published, unless the user says otherwise (--min-top1 / --max-ppl-ratio)
THRESHOLDS = {8: (0.90, 1.05), 4: (0.75, 1.25)}
ROUNDINGS = ("search", "gptq", "nearest")
MIXES = ("auto", "none")
MIX_ROOM = 0.14  # mix auto without --budget-mb: the 8-bit matrices may add this share to the all-int4 size
_FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class QuantScheme:
    """What a quantized export holds; recorded in the manifest's `quantization`."""

    bits: int
    block_size: int = 32
    symmetric: bool = False
    embedding_bits: int = EMBEDDING_BITS
    float_min: bool = False  # each block w = scale * code + minimum, the minimum a float (llama.cpp's Q4_1 / k-quant form)
    rounding: str = "search"  # "search": each block's grid searched; "gptq": searched grids and GPTQ's error compensation;
    # "nearest": plain min/max rounding (graphs/block_rounding.py)
    mix: str = "auto"  # int4 only: "auto" keeps the matrices that cost most KL at 8 bits within budget_mb; "none": all int4
    budget_mb: float | None = None  # mix auto: MB the quantized matrices may take (None: MIX_ROOM over all-int4)
    awq: bool = False  # activation-aware scales folded into the norms and projections before each matrix (graphs/awq_folds.py)

    def check(self) -> None:
        if self.bits not in BITS:
            raise KvgraphError(f"unsupported bit width {self.bits}; choose one of {list(BITS)}")
        if self.float_min and self.symmetric:
            raise KvgraphError("--float-min and --symmetric exclude each other: a block with a float minimum is asymmetric")
        if self.block_size not in BLOCK_SIZES:
            raise KvgraphError(f"unsupported block size {self.block_size}; choose one of {list(BLOCK_SIZES)}")
        if self.rounding not in ROUNDINGS:
            raise KvgraphError(f"unknown --rounding {self.rounding!r}; choose one of {list(ROUNDINGS)}")
        if self.mix not in MIXES:
            raise KvgraphError(f"unknown --mix {self.mix!r}; choose one of {list(MIXES)}")
        if self.budget_mb is not None and (self.bits != 4 or self.mix != "auto" or not self.budget_mb > 0):
            raise KvgraphError("--budget-mb takes a positive size and applies to int4 with --mix auto"
                               f" (got {self.budget_mb} MB, int{self.bits}, --mix {self.mix})")

    @property
    def mixed(self) -> bool:
        return self.bits == 4 and self.mix == "auto"

    @property
    def searched(self) -> bool:
        """Whether the rounding needs calibration (search and gptq do; a symmetric grid is min/max)."""
        return self.rounding in ("search", "gptq") and not self.symmetric

    @property
    def rounding_name(self) -> str:
        return self.rounding if self.searched else "nearest"

    @property
    def name(self) -> str:
        form = "float minimum" if self.float_min else "symmetric" if self.symmetric else "asymmetric"
        how = {"search": "searched", "gptq": "GPTQ"}.get(self.rounding_name, "nearest")
        mix = ", mixed with int8" if self.mixed else ""
        return f"int{self.bits}, block {self.block_size}, {form}, {how}{mix}{', AWQ' if self.awq else ''}"


def thresholds(bits: int, min_top1: float | None, max_ppl_ratio: float | None) -> tuple[float, float]:
    """(min top-1, max perplexity ratio): the user's, else the defaults for the bit width; checked."""
    default_top1, default_ratio = THRESHOLDS.get(bits, THRESHOLDS[4])
    top1 = default_top1 if min_top1 is None else min_top1
    ratio = default_ratio if max_ppl_ratio is None else max_ppl_ratio
    if not 0 <= top1 <= 1:
        raise KvgraphError(f"--min-top1 must be a fraction between 0 and 1, got {top1}")
    if not ratio >= 1:
        raise KvgraphError(f"--max-ppl-ratio must be at least 1, got {ratio}")
    return top1, ratio


@dataclass
class QuantReport:
    """Which tensors were quantized, at how many bits, and the bytes before and after."""

    matmul: list[str] = field(default_factory=list)  # initializer names (the first graph that holds each)
    gathered: list[str] = field(default_factory=list)  # quantized at embedding_bits
    kept: list[str] = field(default_factory=list)  # float matrices left as they are, with the reason
    bits: dict[str, int] = field(default_factory=dict)  # every quantized matrix's bits
    float_bytes: int = 0  # of the matrices quantized
    quantized_bytes: int = 0  # their integers, scales and zero points

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_block(block: int, length: int, name: str, dims: list[int], graph_name: str) -> None:
    """Refuse a block size that does not divide a quantized matrix's input dimension, naming the matrix."""
    if length % block:
        fits = [b for b in BLOCK_SIZES if length % b == 0]
        raise KvgraphError(f"block size {block} does not divide the input dimension {length} of "
                           f"{name} {dims} in {graph_name}.onnx; block sizes that do: {fits or 'none'}")


def matmul_weights(graph: onnx.GraphProto) -> dict[str, str]:
    """{weight: its activation} for each MatMul(x, W) whose W is a 2-D float initializer (the first MatMul reading W)."""
    floats = {t.name for t in graph.initializer if t.data_type in _FLOATS and len(t.dims) == 2}
    found: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in floats:
            found.setdefault(node.input[1], node.input[0])
    return found


def gathered_weights(graph: onnx.GraphProto) -> set[str]:
    """The initializers some Gather reads (quantized at embedding_bits, never mixed)."""
    return {n.input[0] for n in graph.node if n.op_type == "Gather"}


def expose(model: onnx.ModelProto, activations: list[str], weights: list[str]) -> None:
    """In place: `activations` become graph outputs and the initializers `weights` graph inputs (so a session can be fed
    other values for them: a sensitivity measurement runs one session for every variant)."""
    graph = model.graph
    by_name = {t.name: t for t in graph.initializer}
    known = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    for name in activations:
        if name not in {o.name for o in graph.output}:
            info = known.get(name)
            graph.output.append(info if info is not None else helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None))
    for name in weights:
        tensor = by_name[name]
        graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        graph.initializer.remove(tensor)


def choose_bits(costs: dict[str, float], extra_bytes: dict[str, int], room: int) -> dict[str, int]:
    """Mixed precision: the matrices to keep at 8 bits, most KL saved per extra byte first, while their extra bytes
    fit in `room`. costs: what quantizing each matrix alone to 4 bits costs in KL; extra_bytes: int8 over int4."""
    chosen: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: costs[n] / max(extra_bytes[n], 1), reverse=True):
        if costs[name] > 0 and extra_bytes[name] <= room:
            chosen[name] = 8
            room -= extra_bytes[name]
    return chosen


class Quantizer:
    """Rewrites graphs in place; one instance for all graphs of an export, so shared weights quantize once."""

    def __init__(self, scheme: QuantScheme, values: Tensors = INLINE, rounding: BlockRounding | None = None,
                 bits_of: dict[str, int] | None = None, replaced: dict[str, np.ndarray] | None = None) -> None:
        """values: how initializers are read and made (a WeightStore: graphs loaded without their weights read them
        tensor by tensor, and the quantized tensors are held once for every graph).
        rounding: how blocks are chosen, with calibration's evidence (default: the scheme's, without calibration);
        bits_of: matrices quantized at other than scheme.bits (mixed precision);
        replaced: float values stored in place of the export's (AWQ's scaled matrices and divided norms)."""
        scheme.check()
        self.scheme, self.values = scheme, values
        self.rounding = rounding or BlockRounding(scheme.rounding_name, scheme.symmetric, scheme.block_size)
        self.bits_of, self.replaced = bits_of or {}, replaced or {}
        self.report = QuantReport()
        self.names = SharedNames(values)  # bits_of, replaced, the rounding's evidence and the report use these names
        self._shared: dict[str, str] = {}  # the graph being rewritten: local name -> shared name
        self._done: dict[tuple, list[onnx.TensorProto]] = {}
        self._floats: dict[str, onnx.TensorProto] = {}  # replaced float constants, by name
        self._fused: dict = {}  # sibling matrices side by side, made once for every graph

    def quantize(self, models: dict[str, onnx.ModelProto]) -> QuantReport:
        for name, model in models.items():
            self._graph(name, model)
        return self.report

    def _graph(self, graph_name: str, model: onnx.ModelProto) -> None:
        graph = model.graph
        if any(n.op_type == "DequantizeLinear" for n in graph.node):
            raise KvgraphError(f"{graph_name}.onnx is already quantized (it has DequantizeLinear nodes); quantize the float export")
        users: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in set(node.input):
                users.setdefault(name, []).append(node)
        self._shared = shared = self.names.graph(graph_name, graph)
        for tensor in [t for t in graph.initializer if shared.get(t.name) in self.replaced and len(t.dims) != 2]:
            name = shared[tensor.name]
            if name not in self._floats:  # AWQ's divided norm scales: float, in place, made once for every graph
                self._floats[name] = self.values.tensor(self.replaced[name], tensor.name)
            graph.initializer.remove(tensor)
            graph.initializer.append(_named(self._floats[name], tensor.name))
        for tensor in [t for t in graph.initializer if t.data_type in _FLOATS and len(t.dims) == 2]:
            plan = self._plan(graph_name, tensor, users.get(tensor.name, []))
            if plan is not None:
                self._rewrite(graph, tensor, *plan)
        fuse_sibling_projections(model, self.values, self._fused)  # q, k, v (gate, up) of one width: one product
        _set_opset(model)

    def _plan(self, graph_name: str, tensor: onnx.TensorProto, readers: list[onnx.NodeProto]) -> tuple[int, int, list] | None:
        """(bits, axis holding the blocks, readers) for a matrix every reader of which is a MatMul weight or a Gather, else None."""
        matmuls = [n for n in readers if n.op_type == "MatMul" and list(n.input).index(tensor.name) == 1]
        gathers = [n for n in readers if n.op_type == "Gather" and n.input[0] == tensor.name]
        others = sorted({f"{n.op_type} ({n.name})" for n in readers if n not in matmuls and n not in gathers})
        if not readers or others:
            if matmuls or gathers:
                self.report.kept.append(f"{tensor.name}: also read by {', '.join(others)}")
            return None
        axes = {0} if matmuls else set()
        axes |= {1 - attr(n, "axis", 0) for n in gathers}  # blocks run along the gathered rows' features
        if len(axes) != 1:
            self.report.kept.append(f"{tensor.name}: gathered and multiplied along different axes")
            return None
        axis = axes.pop()
        length = tensor.dims[axis]
        if not matmuls and length % self.scheme.block_size:  # a small table (T5's relative position buckets) stays float
            self.report.kept.append(f"{tensor.name}: a gathered table of {length} features, fewer than a block or not a whole number of them")
            return None
        check_block(self.scheme.block_size, length, tensor.name, list(tensor.dims), graph_name)
        return (self.scheme.embedding_bits if gathers else self.bits_of.get(self._shared[tensor.name], self.scheme.bits)), axis, readers

    def _parts(self, tensor: onnx.TensorProto, bits: int, axis: int, gathered: bool) -> list[onnx.TensorProto]:
        """The quantized initializers of `tensor` (codes, scales, zero points), made once per content: a matrix every
        graph holds is read and quantized once, and only references to its stored parts are kept."""
        float_min = self.scheme.float_min and not gathered  # a gathered matrix keeps the plain form: standard Gather reads it
        name = self._shared[tensor.name]  # one per stored tensor, whatever each graph calls it
        key = (bits, axis, float_min, name)
        if key not in self._done:
            array = self.replaced.get(name)
            array = self.values.array(tensor) if array is None else array
            oriented = array if axis == 0 else array.T
            blocks = self.rounding.blocks(name, oriented, bits, float_min)
            self.rounding.forget(name)
            if axis == 1:
                blocks = Blocks(*(None if a is None else np.ascontiguousarray(a.T) for a in (blocks.q, blocks.scales, blocks.zero_points)))
            named = [(f"{tensor.name}.q{bits}", blocks.q), (f"{tensor.name}.scales", blocks.scales),
                     (f"{tensor.name}.zero_points", blocks.zero_points), (f"{tensor.name}.minimums", blocks.minimums)]
            names, arrays = zip(*[(name, a) for name, a in named if a is not None])
            self._done[key] = [self.values.tensor(a, part) for part, a in zip(names, arrays)]
            (self.report.gathered if gathered else self.report.matmul).append(name)
            self.report.bits[name] = bits
            self.report.float_bytes += array.nbytes
            self.report.quantized_bytes += blocks.nbytes
        return [_renamed(part, tensor.name) for part in self._done[key]]

    def _rewrite(self, graph: onnx.GraphProto, tensor: onnx.TensorProto, bits: int, axis: int, readers: list) -> None:
        initializers = self._parts(tensor, bits, axis, any(node.op_type == "Gather" for node in readers))
        graph.initializer.extend(initializers)
        minimums = next((part.name for part in initializers if part.name.endswith(".minimums")), None)
        parts = [part.name for part in initializers if part.name != minimums]
        matmuls = [node for node in readers if node.op_type == "MatMul"]
        gathers = len(readers) > len(matmuls)
        rows = _twins(graph, parts, "rows") if matmuls and gathers else parts  # a tied matrix: the Gathers read their own twins
        for i, node in enumerate(readers):
            if node.op_type == "MatMul":
                _dequantize_for_matmul(graph, node, tensor.name, parts, axis, self.scheme.block_size, i)
                if minimums is not None:
                    self._add_minimums(graph, node, minimums, tensor, i)
            else:
                _gather_then_dequantize(graph, node, rows, axis, self.scheme.block_size)
        graph.initializer.remove(tensor)

    def _add_minimums(self, graph: onnx.GraphProto, matmul: onnx.NodeProto, minimums: str, tensor: onnx.TensorProto, i: int) -> None:
        """MatMul(x, W) = MatMul(x, DQ(codes, scales)) + MatMul(MatMul(x, S), minimums): x's sums over each block of
        inputs (S, a (K, K/bs) matrix of ones and zeros shared by every matrix of that width) times each block's minimum."""
        rows, block = tensor.dims[0], self.scheme.block_size
        sums_name = f"kvgraph.block_sums.{rows}x{block}"
        if not any(t.name == sums_name for t in graph.initializer):
            sums = np.kron(np.eye(rows // block, dtype=_FLOATS[tensor.data_type]), np.ones((block, 1), dtype=_FLOATS[tensor.data_type]))
            graph.initializer.append(self.values.tensor(sums, sums_name))
        out = matmul.output[0]
        base, offset = f"{out}/codes", f"{out}/minimums"
        matmul.output[0] = base
        # q, k and v (gate and up) read one x: one block sum, placed before the first of them (nodes stay in order)
        sums = next((n for n in graph.node if n.op_type == "MatMul" and list(n.input) == [matmul.input[0], sums_name]), None)
        if sums is None:
            sums = helper.make_node("MatMul", [matmul.input[0], sums_name], [f"{out}/block_sums"], name=f"{matmul.name}/block_sums.{i}")
        elif list(graph.node).index(sums) < list(graph.node).index(matmul):
            sums = None  # already ahead of this MatMul
        if sums is not None:
            if sums in graph.node:
                graph.node.remove(sums)
            graph.node.insert(list(graph.node).index(matmul), sums)
        sums_out = next(n.output[0] for n in graph.node if n.op_type == "MatMul" and list(n.input) == [matmul.input[0], sums_name])
        nodes = [helper.make_node("MatMul", [sums_out, minimums], [offset], name=f"{matmul.name}/minimums.{i}"),
                 helper.make_node("Add", [base, offset], [out], name=f"{matmul.name}/add_minimums.{i}")]
        at = list(graph.node).index(matmul) + 1
        for k, node in enumerate(nodes):
            graph.node.insert(at + k, node)


def _renamed(part: onnx.TensorProto, name: str) -> onnx.TensorProto:
    """A copy of a quantized part named after `name` (the same content may sit under another name in another graph)."""
    return _named(part, name + part.name[part.name.rindex("."):])


def _named(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def _dequantize_for_matmul(graph: onnx.GraphProto, matmul: onnx.NodeProto, name: str, parts: list[str], axis: int, block: int, i: int) -> None:
    dequantized = f"{name}.dequantized.{i}"
    node = helper.make_node("DequantizeLinear", parts, [dequantized], axis=axis, block_size=block, name=f"{matmul.name}/dequantize")
    graph.node.insert(list(graph.node).index(matmul), node)
    matmul.input[1] = dequantized


def _gather_then_dequantize(graph: onnx.GraphProto, gather: onnx.NodeProto, parts: list[str], axis: int, block: int) -> None:
    """Gather(W, ids) -> DequantizeLinear(Gather(W.q, ids), Gather(W.scales, ids), ...): the same rows, dequantized."""
    at = list(graph.node).index(gather)
    gather_axis = attr(gather, "axis", 0)
    roles = ("q", "scales", "zero_points")[: len(parts)]
    rows = [f"{gather.output[0]}.{role}" for role in roles]
    nodes = [helper.make_node("Gather", [part, gather.input[1]], [row], axis=gather_axis, name=f"{gather.name}/{role}")
             for part, row, role in zip(parts, rows, roles)]
    # the gathered rows keep W's block axis: axis 0 of (H, *ids) for a column gather, the last of (*ids, H) for a row gather
    block_axis = 0 if axis == 0 else -1
    nodes.append(helper.make_node("DequantizeLinear", rows, [gather.output[0]], axis=block_axis, block_size=block,
                                  name=f"{gather.name}/dequantize"))
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)


def _twins(graph: onnx.GraphProto, parts: list[str], suffix: str) -> list[str]:
    """Second initializers with the same contents (the weights file stores them once): onnxruntime fuses a
    DequantizeLinear into MatMulNBits only when nothing else reads its integers."""
    stored = {t.name: t for t in graph.initializer}
    names = []
    for part in parts:
        twin = onnx.TensorProto()
        twin.CopyFrom(stored[part])
        twin.name = f"{part}.{suffix}"
        graph.initializer.append(twin)
        names.append(twin.name)
    return names


def _set_opset(model: onnx.ModelProto) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < QUANTIZED_OPSET:
            opset.version = QUANTIZED_OPSET

