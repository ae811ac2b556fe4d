"""Graph rewrites for speed: attention over packed heads (export) and fused sibling projections (quantization).
Their numbers are proven by the parity suite and the quantized golden vectors; these tests pin what each rewrite
does to a graph and that it changes no result."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from tiny_models import tiny_model


def _ops(directory, graph: str) -> list[onnx.NodeProto]:
    model = onnx.load(str(directory / f"{graph}.onnx"), load_external_data=False)
    known = {"", *(i.name for i in model.graph.input), *(t.name for t in model.graph.initializer)}
    for node in model.graph.node:  # in topological order, as onnx's ReferenceEvaluator runs them
        assert set(node.input) <= known, (graph, node.name, sorted(set(node.input) - known))
        known.update(node.output)
    return list(model.graph.node)


def _packed(node: onnx.NodeProto) -> bool:
    return any(a.name == "q_num_heads" for a in node.attribute)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dynamic_cache_attention_reads_packed_heads_and_its_own_past(family, tmp_path):
    """Every Attention node of a dynamic export takes (B, S, H·D) tensors and the past; the split-heads Transposes
    and the cache Concats are gone (GPT-2's output Reshape to (B·S, H·D) stays as a Reshape)."""
    from kvgraph.export.api import export_model

    export_model(tiny_model(family), tmp_path)
    for graph in ("prefill", "decode", "extend"):
        nodes = _ops(tmp_path, graph)
        attention = [n for n in nodes if n.op_type == "Attention"]
        assert len(attention) == 2 and all(_packed(n) for n in attention), graph
        assert all(n.input[4].startswith("past.") or graph == "prefill" for n in attention), graph
        assert all(n.output[1].startswith("present.") and n.output[2].startswith("present.") for n in attention), graph
        assert not any(n.op_type == "Concat" and n.output[0].startswith("present.") for n in nodes), graph
        if family == "llama":
            assert not any(n.op_type == "Transpose" for n in nodes), graph


def test_a_static_cache_keeps_four_dimensional_attention(tmp_path):
    """onnxruntime's Attention takes Q, K and V of one rank, and a static cache's K and V are (B, Hkv, N, D)."""
    from kvgraph.export.api import export_model

    export_model(tiny_model("llama"), tmp_path, cache="static", max_length=32)
    attention = [n for n in _ops(tmp_path, "decode") if n.op_type == "Attention"]
    assert len(attention) == 2 and not any(_packed(n) for n in attention)


def _siblings(widths=(64, 16, 16), k=64, block=32, seed=0) -> onnx.ModelProto:
    """x (B, S, K) -> three DequantizeLinear -> MatMul products of widths N_i, int4 blocks along K."""
    rng = np.random.default_rng(seed)
    nodes, initializers, outputs = [], [], []
    for i, n in enumerate(widths):
        codes = helper.make_tensor(f"w{i}.q4", TensorProto.UINT4, [k, n], rng.integers(0, 16, k * n).tolist())
        scales = numpy_helper.from_array((rng.random((k // block, n)) * 0.1 + 0.01).astype(np.float32), f"w{i}.scales")
        zeros = helper.make_tensor(f"w{i}.zero_points", TensorProto.UINT4, [k // block, n], rng.integers(0, 16, k // block * n).tolist())
        initializers += [codes, scales, zeros]
        nodes += [helper.make_node("DequantizeLinear", [codes.name, scales.name, zeros.name], [f"w{i}"], axis=0, block_size=block),
                  helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"])]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["B", "S", n]))
    graph = helper.make_graph(nodes, "siblings", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_sibling_projections_fuse_into_one_product_with_the_same_results(tmp_path):
    from kvgraph.graphs.rewrites.fused_projections import fuse_sibling_projections

    model = _siblings()
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_sibling_projections(fused) == 1
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["DequantizeLinear", "MatMul", "Split"] and len(fused.graph.initializer) == 4  # codes, scales, zeros, widths
    onnx.checker.check_model(fused, full_check=True)
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)}
    before, after = ReferenceEvaluator(model).run(None, x), ReferenceEvaluator(fused).run(None, x)
    assert all(np.array_equal(b, a) for b, a in zip(before, after))  # the same columns, exactly
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    runs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, x) for m in (model, fused)]
    assert all(np.allclose(b, a, rtol=1e-5, atol=1e-5) for b, a in zip(*runs))
    assert [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node].count("MatMulNBits") == 1


def test_projections_of_other_widths_or_inputs_are_not_fused():
    from kvgraph.graphs.rewrites.fused_projections import fuse_sibling_projections

    model = _siblings()
    block = next(a for a in model.graph.node[2].attribute if a.name == "block_size")
    block.i = 16  # the second matrix in blocks of 16: another layout (never run)
    assert fuse_sibling_projections(model) == 1  # the first and third only
    assert [n.op_type for n in model.graph.node].count("MatMul") == 2
    alone = _siblings(widths=(64,))
    assert fuse_sibling_projections(alone) == 0
