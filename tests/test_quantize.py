"""Weight-only quantized exports (int4 / int8): standard ops, fusion, one copy of the weights, the quality
report and its gate, golden vectors in three runtimes, and bad input.

The tiny model stands for SmolLM2-135M: llama layout, 49,152-token vocabulary, tied embedding/lm_head,
grouped KV heads. Its tied matrix is most of its bytes, as the real one's is 21 %.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from kvgraph.graphs import KvgraphError, Manifest
from kvgraph.graphs.block_rounding import dequantize, dequantize_float_min, float_min_blocks, gptq_blocks, quantize_blocks, searched_blocks
from kvgraph.graphs.quantization import QuantScheme, choose_bits
from kvgraph.runtime import Generator
from kvgraph.runtime.commands.main import main
from kvgraph.runtime.tools.quantize_export import quantize_export
from kvgraph.runtime.tools.step_trace import replay
from kvgraph.runtime.tools.golden_vectors import first_mismatch, read_vectors
from kvgraph.runtime.tools.golden_runs import check_vectors, make_vectors

SMOLLM2_LIKE = dict(vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M: 49152 tied, GQA
ANY_QUALITY = dict(min_top1=0.0, max_ppl_ratio=1e9)  # random-init logits are nearly flat: top-1 agreement means little there


def smollm2_like_model():
    """The tiny SmolLM2-like model, its norms made distinct as a trained checkpoint's are."""
    from tiny_models import distinct_norms, tiny_model

    return distinct_norms(tiny_model("llama", **SMOLLM2_LIKE))


@pytest.fixture(scope="module")
def float_exports(tmp_path_factory):
    """The SmolLM2-like tiny model exported in float, dynamic and static: {mode: directory}."""
    from kvgraph.export import export_model

    model = smollm2_like_model()
    root = tmp_path_factory.mktemp("float")
    return {"dynamic": export_model(model, root / "dynamic").directory,
            "static": export_model(model, root / "static", cache="static", max_length=64).directory}


@pytest.fixture(scope="module")
def quantized(float_exports, tmp_path_factory):
    """(mode, bits) -> quantized export directory, made on first use."""
    made = {}

    def get(mode: str, bits: int):
        if (mode, bits) not in made:
            out = tmp_path_factory.mktemp("quantized") / f"{mode}-int{bits}"
            made[mode, bits] = quantize_export(float_exports[mode], out, QuantScheme(bits, mix="none"), **ANY_QUALITY)
        return made[mode, bits]

    return get


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_graphs_are_standard_onnx_and_onnxruntime_fuses_every_matmul(quantized, tmp_path, bits):
    directory = quantized("dynamic", bits)
    record = Manifest.load(directory).quantization
    model = onnx.load(str(directory / "decode.onnx"), load_external_data=False)
    assert {opset.domain for opset in model.opset_import} <= {"", "ai.onnx"}
    assert {node.domain for node in model.graph.node} <= {""}
    types = {t.name: t.data_type for t in model.graph.initializer}
    weights = {"matmul": onnx.TensorProto.UINT4 if bits == 4 else onnx.TensorProto.UINT8, "gathered": onnx.TensorProto.UINT8}
    assert record["tensors"]["matmul"] and record["tensors"]["gathered"]
    for name in record["tensors"]["gathered"]:
        assert types[f"{name}.q8"] == weights["gathered"], name
    # the MatMuls' codes (q, k and v side by side: graphs/rewrites/fused_projections.py), every one at the scheme's bits
    codes = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in types]
    assert {types[c] for c in codes if c.rsplit(".", 1)[0] not in record["tensors"]["gathered"]} == {weights["matmul"]}
    assert sum(c.endswith(".fused") for c in codes) == 2 * 2  # per layer: q, k, v; gate, up
    dequantize_nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(onnx.helper.get_attribute_value(a) == 32 for n in dequantize_nodes for a in n.attribute if a.name == "block_size")
    assert not [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
                and t.dims[0] >= 64 and "scales" not in t.name]  # no float weight matrix left

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(directory / "decode.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    ops = [n.op_type for n in optimized.graph.node]
    # 2 layers x (q, k, v; o; gate, up; down), and the lm_head
    assert ops.count("MatMulNBits") == len([n for n in model.graph.node if n.op_type == "MatMul"]) == 2 * 4 + 1
    assert "MatMul" not in ops and ops.count("DequantizeLinear") == 1  # the gathered embedding rows only


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_are_stored_once_and_scales_shared_across_graphs(float_exports, quantized, bits):
    directory = quantized("dynamic", bits)
    record = Manifest.load(directory).quantization["tensors"]
    index = json.loads((directory / "weights.json").read_text())
    size = (directory / "model.onnx.data").stat().st_size
    assert size <= record["quantized_bytes"] * 1.02 + 64 * len(index["tensors"])  # each quantized tensor once (plus alignment)
    assert size < (float_exports["dynamic"] / "model.onnx.data").stat().st_size / (2.5 if bits == 8 else 3.3)
    slots = {graph: set(names.values()) for graph, names in index["graphs"].items()}
    assert slots["prefill"] == slots["extend"] == slots["decode"] == set(range(len(index["tensors"])))  # scales and zero points too


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
def test_blocks_are_round_to_nearest_within_half_a_step(bits, symmetric):
    """onnxruntime's kernels, unpacked by kvgraph: every weight within half a quantization step of its float value."""
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((128, 48)) * rng.uniform(0.01, 2.0, size=(1, 48))).astype(np.float32)
    blocks = quantize_blocks(matrix, bits, 32, symmetric)
    error = np.abs(dequantize(blocks, 32) - matrix)
    step = np.abs(np.repeat(blocks.scales, 32, axis=0))  # symmetric int4 scales carry the sign of the block's extreme
    # symmetric int4 puts the block's largest magnitude at -8: the other side can reach +8 and is clipped to 7
    within = 1.0 if (bits, symmetric) == (4, True) else 0.5
    assert (error <= step * within + 1e-6).all()
    assert (error <= step * 0.5 + 1e-6).mean() > 0.99
    assert error.max() > 0  # really quantized
    assert (blocks.zero_points is None) == symmetric


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantized_cache_equals_recompute_and_one_session_equals_named_graphs(quantized, mode):
    """Both cache modes run quantized; the cache is exact for the quantized graphs too, whichever sessions run them."""
    directory = quantized(mode, 4)
    prompt = [1, 523, 8891, 31000, 77, 4012]
    exact = Generator.load(directory, exact=True)
    cached = exact.generate(prompt, max_new_tokens=12, min_new_tokens=12).token_ids
    assert exact.generate(prompt, max_new_tokens=12, min_new_tokens=12, use_cache=False).token_ids == cached
    fast = Generator.load(directory)
    assert list(fast.graphs.sessions) == [fast.graphs.one_graph] == ["extend" if mode == "dynamic" else "prefill"]
    per_session = Generator.load(directory, weights="per-session")
    assert fast.generate(prompt, max_new_tokens=12).token_ids == per_session.generate(prompt, max_new_tokens=12).token_ids
    with pytest.raises(KvgraphError, match="weights policy 'mapped' is not available for this export: its integer weights"):
        Generator.load(directory, weights="mapped")


def test_quality_report_is_in_the_manifest_and_inspect(quantized, capsys):
    directory = quantized("dynamic", 8)
    from test_vectors import schema_errors

    assert schema_errors(json.loads((directory / "kvgraph.json").read_text())) == []
    record = Manifest.load(directory).quantization
    assert record["scheme"] == {"bits": 8, "block_size": 32, "symmetric": False, "embedding_bits": 8, "float_min": False,
                                "rounding": "search", "mix": "none", "budget_mb": None, "awq": False,
                                "format": "qdq"}
    assert set(record["tensors"]["bits"].values()) == {8}
    assert record["reference"] == "float export"
    quality = record["quality"]
    assert quality["tokens"] >= 2000 and quality["greedy_prompts"] == 8 and quality["greedy_new_tokens"] == 64
    assert quality["mean_kl"] > 0 and quality["perplexity_ratio"] == pytest.approx(quality["perplexity_quantized"] / quality["perplexity_float"])
    assert main(["inspect", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "quantized    int8 weights, block 32, asymmetric (qdq)" in out and "bytes per weight" in out
    assert f"top-1 {100 * quality['top1_agreement']:.2f} %" in out


def test_quality_text_is_real_text_when_the_export_has_a_tokenizer(text_export, tmp_path):
    out = quantize_export(text_export[1], tmp_path / "q8", QuantScheme(8), **ANY_QUALITY)
    quality = Manifest.load(out).quantization["quality"]
    assert quality["text"].startswith("quality_text.txt") and quality["tokens"] >= 2000
    assert (out / "tokenizer.json").read_bytes() == (text_export[1] / "tokenizer.json").read_bytes()
    assert Generator.load(out).generate("Hello", max_new_tokens=4).text is not None


def test_quality_gate_refuses_and_writes_nothing(float_exports, tmp_path, capsys):
    out = tmp_path / "refused"
    assert main(["quantize", str(float_exports["dynamic"]), str(out), "--bits", "4", "--min-top1", "1.0"]) == 1
    err = capsys.readouterr().err
    assert "quantized export refused: top-1 agreement" in err and "is below 100.00 %" in err and "nothing was written" in err
    assert "top-1 agreement" in err.split("kvgraph quantize: error")[0]  # the figures were printed first
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_quantize_input_is_refused_and_writes_nothing(float_exports, quantized, tmp_path, capsys):
    source = str(float_exports["dynamic"])
    cases = [
        (["--bits", "3"], "unsupported bit width 3; choose one of [4, 8]"),
        (["--bits", "4", "--block-size", "48"], "unsupported block size 48; choose one of [16, 32, 64, 128, 256]"),
        (["--bits", "4", "--block-size", "128"], "block size 128 does not divide the input dimension 64 of"),
        (["--bits", "8", "--min-top1", "1.5"], "--min-top1 must be a fraction between 0 and 1, got 1.5"),
        (["--bits", "8", "--max-ppl-ratio", "0.5"], "--max-ppl-ratio must be at least 1, got 0.5"),
    ]
    for options, message in cases:
        assert main(["quantize", source, str(tmp_path / "out"), *options]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
    assert main(["quantize", str(quantized("dynamic", 8)), str(tmp_path / "out"), "--bits", "4"]) == 1
    assert "is already quantized (int8, block 32); quantize its float export instead" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_quantize_end_to_end_and_block_size_refused_before_tracing(tmp_path, capsys):
    from tiny_models import text_model_dir

    model_dir = text_model_dir(tmp_path / "hf")
    assert main(["export", str(model_dir), str(tmp_path / "bad"), "--block-size", "64"]) == 1
    assert "--block-size applies to quantized exports only; add --quantize int4 or int8" in capsys.readouterr().err
    assert main(["export", str(model_dir), str(tmp_path / "bad"), "--quantize", "int4", "--block-size", "128"]) == 1
    err = capsys.readouterr().err
    assert "block size 128 does not divide the input dimension of" in err and "trace" not in err
    assert main(["export", str(model_dir), str(tmp_path / "bad"), "--quantize", "int8", "--no-validate"]) == 1
    assert "--no-validate does not apply to --quantize" in capsys.readouterr().err
    assert main(["export", str(model_dir), str(tmp_path / "bad"), "--quantize", "int4", "--budget-mb", "5"]) == 1
    assert "--budget-mb calibrates on the float export, which export --quantize does not write" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["export", str(model_dir), str(tmp_path / "q"), "--quantize", "int8", "--symmetric", "--cache", "static",
                 "--max-length", "64", "--min-top1", "0", "--max-ppl-ratio", "1e9"]) == 0
    manifest = Manifest.load(tmp_path / "q")
    assert manifest.quantization["scheme"]["symmetric"] and manifest.contract.static and manifest.validation is None
    assert manifest.quantization["reference"] == "pytorch"  # scored against the model itself: no float graph was written
    model = onnx.load(str(tmp_path / "q" / "prefill.onnx"), load_external_data=False)
    assert {t.data_type for t in model.graph.initializer if t.name.endswith(".q8")} == {onnx.TensorProto.INT8}
    assert Generator.load(tmp_path / "q").generate("Hi", max_new_tokens=5, min_new_tokens=5).token_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "q"]  # the float export was temporary


@pytest.mark.parametrize("mode,bits", [("dynamic", 4), ("static", 8)])
def test_quantized_golden_vectors_reproduce_in_node_and_the_reference_evaluator(quantized, tmp_path, mode, bits):
    assert_vectors_reproduce(quantized(mode, bits), tmp_path / "vectors")


def assert_vectors_reproduce(directory, out) -> None:
    """Golden vectors of `directory` check in kvgraph's runtime, in Node and in onnx's ReferenceEvaluator."""
    from test_vectors import node, reference_runner

    vectors = make_vectors(directory, out)
    check_vectors(directory, vectors)
    result = node(str(directory), str(vectors))
    assert result.returncode == 0, result.stderr
    golden = read_vectors(vectors)
    manifest = Manifest.load(directory)
    run = reference_runner(directory)
    traces = {name: replay(manifest, run, t) for name, t in golden.cases.items()}
    assert first_mismatch(golden, manifest.contract, traces) is None
    for name, trace in golden.cases.items():
        assert f"case '{name}': {len(trace.steps)} graph calls match" in result.stdout


def test_quantized_vectors_catch_a_changed_scale(quantized, tmp_path):
    """The vectors pin the quantized numbers: one scale changed in the weights file is a named mismatch."""
    directory = quantized("dynamic", 8)
    vectors = make_vectors(directory, tmp_path / "vectors")
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    index = json.loads((copy / "weights.json").read_text())
    names = index["graphs"]["decode"]
    scales = next(index["tensors"][slot] for name, slot in names.items() if name.endswith("lm_head.weight.T.scales"))
    data = np.fromfile(copy / "model.onnx.data", dtype=np.uint8)
    data[scales["offset"]: scales["offset"] + scales["length"]].view(np.float32)[:] *= 1.5
    data.tofile(copy / "model.onnx.data")
    with pytest.raises(KvgraphError, match=r"case 'single', step 0 \(prefill\): output logits differs"):
        check_vectors(copy, vectors)


def test_quality_report_figures_equal_pytorch_and_an_export_against_itself_is_perfect(float_exports, quantized, tmp_path):
    """The report's float perplexity is the model's own (transformers, same windows); scored against itself an
    export agrees everywhere; the quantized report's figures are those of compare() on the same answers."""
    import torch

    from kvgraph.runtime.tools.quality import Workload, answer, compare

    reference = float_exports["dynamic"]
    workload = Workload.of(reference)
    answers = answer(reference, workload, tmp_path / "float")
    same = compare(workload, answers, answer(reference, workload, tmp_path / "again"))
    assert (same.top1_agreement, same.greedy_identical, same.greedy_common_prefix) == (1.0, 8, 1.0)
    assert abs(same.mean_kl) < 1e-9 and same.perplexity_ratio == 1.0

    model = smollm2_like_model()
    nll = 0.0
    with torch.no_grad():
        for window in workload.windows:
            logits = model(torch.tensor([window])).logits[0, :-1].double()
            nll -= torch.log_softmax(logits, -1)[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum().item()
    assert same.perplexity_float == pytest.approx(np.exp(nll / workload.tokens), rel=1e-5)

    recorded = Manifest.load(quantized("dynamic", 8)).quantization["quality"]
    mine = compare(workload, answers, answer(quantized("dynamic", 8), workload, tmp_path / "int8"))
    assert recorded["perplexity_float"] == pytest.approx(mine.perplexity_float, rel=1e-9)
    assert (recorded["top1_agreement"], recorded["greedy_identical"]) == (mine.top1_agreement, mine.greedy_identical)
    assert recorded["mean_kl"] == pytest.approx(mine.mean_kl, rel=1e-6)


def test_float_min_blocks_are_within_half_a_step_and_hold_their_own_grid_exactly():
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((128, 48)) * rng.uniform(0.01, 2.0, size=(1, 48)) + rng.uniform(-1, 1, size=(1, 48))).astype(np.float32)
    blocks = float_min_blocks(matrix, 4, 32)
    grid = dequantize_float_min(blocks, 32)
    step = np.repeat(blocks.scales, 32, axis=0)
    assert (np.abs(grid - matrix) <= step * 0.5 + 1e-6).all() and np.abs(grid - matrix).max() > 0
    assert blocks.q.dtype.name == "int4" and blocks.zero_points is None and blocks.minimums.shape == (4, 48)
    again = dequantize_float_min(float_min_blocks(grid, 4, 32), 32)  # weights on such a grid (a Q4_1 model) come back
    np.testing.assert_allclose(again, grid, rtol=0, atol=2e-6 * np.abs(grid).max())
    integer = dequantize(quantize_blocks(grid, 4, 32, False), 32)  # an integer zero point cannot place the block's minimum
    assert np.abs(integer - grid).max() > 100 * np.abs(again - grid).max()


def test_float_min_export_computes_a_q4_1_models_own_weights(tmp_path):
    """A model whose linear weights lie on a 4-bit float-minimum grid (as a dequantized Q4_1 GGUF's do) quantizes with
    --float-min to graphs that compute those weights: prompt log-probabilities equal the float export's (without
    onnxruntime's int8-activation kernel), where the integer zero point's differ. The extra nodes are standard ops."""
    import torch
    from tiny_models import tiny_model

    from kvgraph.export import export_model

    model = tiny_model("llama", **SMOLLM2_LIKE)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight is not model.get_input_embeddings().weight:
                grid = dequantize_float_min(float_min_blocks(module.weight.numpy().T.copy(), 4, 32), 32)
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(grid.T)))
    source = export_model(model, tmp_path / "float").directory
    assert main(["quantize", str(source), str(tmp_path / "fm"), "--bits", "4", "--float-min", "--min-top1", "0", "--max-ppl-ratio", "1e9"]) == 0
    plain = quantize_export(source, tmp_path / "plain", QuantScheme(4, mix="none"), **ANY_QUALITY)
    record = Manifest.load(tmp_path / "fm").quantization
    assert record["scheme"]["float_min"] and len(record["tensors"]["matmul"]) == 14  # 2 layers x 7; the tied lm_head is gathered too
    graph = onnx.load(str(tmp_path / "fm" / "decode.onnx"), load_external_data=False).graph
    assert {node.domain for node in graph.node} <= {""}
    assert sum(t.name.endswith(".minimums") for t in graph.initializer) == len(record["tensors"]["matmul"])
    prompt = [1, 523, 8891, 31000, 77, 4012, 9, 15000]
    want = [lp.logprob for lp in Generator.load(source).prompt_logprobs(prompt)[1:]]
    got = [lp.logprob for lp in Generator.load(tmp_path / "fm", exact=True).prompt_logprobs(prompt)[1:]]
    rounded = [lp.logprob for lp in Generator.load(plain, exact=True).prompt_logprobs(prompt)[1:]]
    # the lm_head is the tied embedding, int8 in both: the float-minimum export's only departure from the float weights
    assert np.abs(np.subtract(got, want)).max() < np.abs(np.subtract(rounded, want)).max() / 5


def _blocked_error(matrix, approx, weights=None):
    """(K/32, N) weighted squared error of each block of 32 along axis 0."""
    w = np.ones(matrix.shape[0]) if weights is None else weights
    return ((approx - matrix) ** 2 * w[:, None]).reshape(-1, 32, matrix.shape[1]).sum(axis=1)


def test_searched_blocks_beat_nearest_rounding_weigh_by_importance_and_hold_a_grid_exactly():
    rng = np.random.default_rng(3)
    matrix = (rng.standard_normal((256, 96)) * 0.02).astype(np.float32)
    matrix[rng.random(matrix.shape) < 0.02] *= 6  # outliers, as real weights have
    nearest = dequantize(quantize_blocks(matrix, 4, 32, False), 32)
    searched = searched_blocks(matrix, 4, 32, float_min=False)
    assert searched.q.dtype == nearest.dtype or str(searched.q.dtype) == "uint4"
    assert searched.q.shape == matrix.shape and searched.scales.shape == searched.zero_points.shape == (8, 96)
    plain, better = _blocked_error(matrix, nearest), _blocked_error(matrix, dequantize(searched, 32))
    assert better.sum() < 0.97 * plain.sum() and (better <= plain * 1.0001 + 1e-12).mean() > 0.9
    importance = (rng.random(256) ** 4).astype(np.float32)  # a few input channels carry most of the activation
    weighted = dequantize(searched_blocks(matrix, 4, 32, float_min=False, importance=importance), 32)
    assert _blocked_error(matrix, weighted, importance).sum() < _blocked_error(matrix, dequantize(searched, 32), importance).sum()
    float_min = searched_blocks(matrix, 4, 32, float_min=True)
    assert _blocked_error(matrix, dequantize_float_min(float_min, 32)).sum() < better.sum()  # a float offset is a finer fit
    grid = dequantize(searched, 32)  # weights already on an integer-zero-point grid come back exactly
    assert np.abs(dequantize(searched_blocks(grid, 4, 32, float_min=False), 32) - grid).max() < 1e-6
    q41 = dequantize_float_min(float_min_blocks(matrix, 4, 32), 32)  # and a Q4_1 grid, with a float minimum
    assert np.abs(dequantize_float_min(searched_blocks(q41, 4, 32, float_min=True), 32) - q41).max() < 1e-6


def test_gptq_blocks_lower_the_layer_output_error_and_stay_on_each_blocks_grid():
    """GPTQ minimises ||X W - X W_q|| over calibration inputs X, not the weights' own error: on inputs with correlated
    channels (as a layer's are) its output error is well below the searched grid's alone, though its weights move more."""
    rng = np.random.default_rng(5)
    matrix = (rng.standard_normal((128, 64)) * 0.02).astype(np.float32)
    mixing = rng.standard_normal((128, 128)) * (rng.random(128) ** 3)[:, None]  # a few strong directions
    x = (rng.standard_normal((512, 128)) @ mixing).astype(np.float32)
    x[:, 7] = 0.0  # a channel calibration never drives
    gram = x.astype(np.float64).T @ x / len(x)
    searched = dequantize(searched_blocks(matrix, 4, 32, float_min=False, importance=np.diag(gram).astype(np.float32)), 32)
    blocks = gptq_blocks(matrix, 4, 32, False, gram)
    gptq = dequantize(blocks, 32)
    assert blocks.q.shape == matrix.shape and blocks.scales.shape == blocks.zero_points.shape == (4, 64)
    assert str(blocks.q.dtype) == "uint4" and np.all(gptq[7] == dequantize(blocks, 32)[7])
    out_error = lambda w: float(np.square(x @ (w - matrix)).sum())
    assert out_error(gptq) < 0.7 * out_error(searched), (out_error(gptq), out_error(searched))
    assert np.abs(gptq - matrix).max() < 0.1  # the codes stay within the blocks' ranges: no runaway compensation
    float_min = gptq_blocks(matrix, 4, 32, True, gram)
    assert out_error(dequantize_float_min(float_min, 32)) < out_error(searched)


def test_gptq_quantize_records_its_rounding_and_export_refuses_it(float_exports, tmp_path, capsys):
    from tiny_models import text_model_dir

    out = quantize_export(float_exports["dynamic"], tmp_path / "gptq", QuantScheme(4, rounding="gptq", mix="none"), **ANY_QUALITY)
    record = Manifest.load(out).quantization
    assert record["scheme"]["rounding"] == "gptq" and record["quality"]["top1_agreement"] > 0
    searched = quantize_export(float_exports["dynamic"], tmp_path / "search", QuantScheme(4, mix="none"), **ANY_QUALITY)
    assert (out / "model.onnx.data").read_bytes() != (searched / "model.onnx.data").read_bytes()
    assert main(["export", str(text_model_dir(tmp_path / "hf")), str(tmp_path / "bad"), "--quantize", "int4",
                 "--rounding", "gptq"]) == 1
    assert "--rounding gptq calibrates on the float export" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_awq_folds_keep_the_float_function_and_its_scale_never_loses_on_calibration(float_exports):
    """Every fold found (the norm before q/k/v and before gate/up, the up projection before down) leaves the float
    prefill graph's logits as they were for any scales; the searched scale's error is at most no scaling's."""
    from onnx import numpy_helper

    from kvgraph.graphs.awq_folds import apply_fold, awq_folds, awq_scale

    source = float_exports["dynamic"]
    model = onnx.load(str(source / "prefill.onnx"))
    folds = awq_folds(model.graph)
    kinds = sorted({(len(f.matrices), f.divided[0][1]) for f in folds})
    assert len(folds) == 3 * 2 and kinds == [(1, 1), (2, 0), (3, 0)], folds  # per layer: q/k/v, gate/up, down
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    for fold in folds:
        apply_fold(fold, np.exp(rng.normal(0, 0.7, values[fold.matrices[0]].shape[0])).astype(np.float32), values)
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for tensor in changed.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    feeds = {i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim],
                              onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)) for i in model.graph.input}
    feeds.update({n: rng.integers(0, 1000, a.shape).astype(a.dtype) for n, a in feeds.items() if "input_ids" in n})
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    before, after = run(model), run(changed)
    assert np.abs(before - after).max() < 1e-4 * max(1.0, np.abs(before).max()), np.abs(before - after).max()
    x = rng.standard_normal((256, 128)).astype(np.float32) * np.exp(rng.normal(0, 1.5, 128)).astype(np.float32)
    w = (rng.standard_normal((128, 64)) * 0.02).astype(np.float32)
    s = awq_scale(x, [w], 4, 32)
    error = lambda scale: float(np.square(x @ w - (x / scale) @ dequantize(quantize_blocks(scale[:, None] * w, 4, 32, False), 32)).sum())
    assert error(s) <= error(np.ones(128, np.float32)) and error(s) < 0.9 * error(np.ones(128, np.float32))


def test_awq_quantize_folds_scales_into_the_norms_and_stays_standard(float_exports, tmp_path, capsys):
    source = float_exports["dynamic"]
    assert main(["quantize", str(source), str(tmp_path / "awq"), "--bits", "4", "--awq", "--mix", "none",
                 "--min-top1", "0", "--max-ppl-ratio", "1e9"]) == 0
    assert "AWQ: 6 activations scaled" in capsys.readouterr().err
    record = Manifest.load(tmp_path / "awq").quantization
    assert record["scheme"]["awq"] is True
    model = onnx.load(str(tmp_path / "awq" / "decode.onnx"))
    floats = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(source / "decode.onnx")).graph.initializer}
    norms = [t for t in model.graph.initializer if "layernorm" in t.name and len(t.dims) == 1]
    assert norms and all(not np.array_equal(onnx.numpy_helper.to_array(t), floats[t.name]) for t in norms)
    assert {node.domain for node in model.graph.node} <= {""}
    assert main(["export", str(source), str(tmp_path / "bad"), "--quantize", "int4", "--awq"]) == 1
    assert "--awq calibrates on the float export" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_choose_bits_takes_the_most_kl_per_byte_within_the_room():
    costs = {"a": 0.30, "b": 0.20, "c": 0.05, "d": 0.0}
    extra = {"a": 300, "b": 100, "c": 10, "d": 1}
    assert choose_bits(costs, extra, 115) == {"b": 8, "c": 8}  # b then c by KL per byte; a does not fit after them
    assert choose_bits(costs, extra, 1000) == {"a": 8, "b": 8, "c": 8}  # a matrix that costs nothing stays int4
    assert choose_bits(costs, extra, 0) == {}


def test_calibration_measures_a_matrix_cost_in_kl(float_exports):
    """The sensitivity measurement is real: a matrix fed as itself costs nothing, zeroed it costs KL; the importance
    is each input channel's mean squared activation, positive where activations flow."""
    from kvgraph.runtime.tools.calibrate import Calibration

    calibration = Calibration(float_exports["dynamic"])
    importance = calibration.importance()
    assert set(calibration.matrices) <= set(importance) and len(calibration.matrices) == 14  # 2 layers x 7; the tied lm_head is gathered
    assert all(v.ndim == 1 and (v >= 0).all() and v.sum() > 0 for v in importance.values())
    first = calibration.matrices[:3]
    same = calibration.costs(lambda name, matrix: matrix, matrices=first)
    zeroed = calibration.costs(lambda name, matrix: np.zeros_like(matrix), matrices=first)
    assert set(same) == set(zeroed) == set(first)
    assert all(abs(same[n]) < 1e-9 for n in first) and all(zeroed[n] > 1e-6 for n in first)


def test_mixed_int4_keeps_matrices_at_int8_within_the_budget(float_exports, tmp_path):
    source = float_exports["dynamic"]
    plain = quantize_export(source, tmp_path / "plain", QuantScheme(4, mix="none"), **ANY_QUALITY)
    all_int4 = Manifest.load(plain).quantization["tensors"]["quantized_bytes"]
    budget = (all_int4 + 5_000) / 1e6  # room for a few of the tiny model's matrices at int8, not all
    assert main(["quantize", str(source), str(tmp_path / "mixed"), "--bits", "4", "--budget-mb", str(budget),
                 "--min-top1", "0", "--max-ppl-ratio", "1e9"]) == 0
    record = Manifest.load(tmp_path / "mixed").quantization
    bits = record["tensors"]["bits"]
    matmul = record["tensors"]["matmul"]
    assert record["scheme"]["mix"] == "auto" and record["scheme"]["budget_mb"] == budget
    assert 0 < sum(bits[n] == 8 for n in matmul) < len(matmul) and record["tensors"]["quantized_bytes"] <= budget * 1e6
    model = onnx.load(str(tmp_path / "mixed" / "decode.onnx"), load_external_data=False)
    float_graph = onnx.load(str(source / "decode.onnx"), load_external_data=False).graph
    floats = {t.name: int(np.prod(t.dims)) for t in float_graph.initializer}
    codes = {}  # integer type -> the weights its DequantizeLinear codes hold (q, k, v side by side count as theirs)
    initializers = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]:
        tensor = initializers[node.input[0]]
        codes[tensor.data_type] = codes.get(tensor.data_type, 0) + tensor.dims[0] * tensor.dims[1]
    tied = sum(floats[n] for n in record["tensors"]["gathered"])  # the tied lm_head multiplies the embedding's int8
    want = {onnx.TensorProto.UINT8: tied + sum(floats[n] for n in matmul if bits[n] == 8),
            onnx.TensorProto.UINT4: sum(floats[n] for n in matmul if bits[n] == 4)}
    assert codes == want  # every matrix at the bits the manifest records
    assert {node.domain for node in model.graph.node} <= {""}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "mixed" / "decode.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    # both widths run onnxruntime's fused kernel; the matrices that multiply one activation (q, k, v; gate, up) are
    # one product per width among them (each matrix's width is chosen alone); the tied lm_head reads the embedding
    siblings = {}  # activation -> the widths of the matrices multiplying it
    for node in float_graph.node:
        if node.op_type == "MatMul" and node.input[1] in bits:
            siblings.setdefault(node.input[0], set()).add(bits[node.input[1]])
    assert len(siblings) == 2 * 4 + 1 and sum(len(widths) for widths in siblings.values()) > len(siblings)  # one split
    assert ops.count("MatMulNBits") == sum(len(widths) for widths in siblings.values()) and "MatMul" not in ops


@pytest.mark.parametrize("argv,message", [
    (["--bits", "4", "--budget-mb", "0.001"], "--budget-mb 0.001 is below the all-int4 size of the quantized matrices"),
    (["--bits", "8", "--budget-mb", "50"], "--budget-mb takes a positive size and applies to int4 with --mix auto"),
    (["--bits", "4", "--mix", "none", "--budget-mb", "50"], "--budget-mb takes a positive size and applies to int4 with --mix auto"),
])
def test_bad_mixed_precision_options_are_refused_and_write_nothing(float_exports, tmp_path, capsys, argv, message):
    out = tmp_path / "refused"
    assert main(["quantize", str(float_exports["dynamic"]), str(out), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_the_float_side_of_the_report_is_made_once_per_float_export(float_exports, tmp_path):
    """A second quantization of one float export reads the float answers kept in it; a changed file makes them again;
    the figures are the same either way, and the kept answers never travel into a quantized export."""
    import os

    source = tmp_path / "float"
    shutil.copytree(float_exports["static"], source, ignore=shutil.ignore_patterns("quality-reference"))
    logs: list[list[str]] = []

    def quantize(name: str) -> dict:
        logs.append([])
        out = quantize_export(source, tmp_path / name, QuantScheme(8, rounding="nearest"), log=logs[-1].append, **ANY_QUALITY)
        assert not (out / "quality-reference").exists()
        return Manifest.load(out).quantization["quality"]

    kept = lambda: any("the float side read from" in line for line in logs[-1])
    first = quantize("a")
    assert not kept() and (source / "quality-reference" / "key.json").is_file()
    assert quantize("b") == first and kept()
    weights = source / "model.onnx.data"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert quantize("c") == first and not kept()
    assert quantize("d") == first and kept()
