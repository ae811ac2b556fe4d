"""Repeated layers traced once and copied (export/repeated_layers.py): the stitched graphs are the traced-every-layer
graphs, node for node, and agree with PyTorch; a model whose layers differ, in their modules or in what they trace
to, is traced layer by layer, with the reason in the log."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvgraph.export import export_model
from kvgraph.export.repeated_layers import repeat_plan
from kvgraph.graphs import GraphContract
from kvgraph.runtime import Generator

from tiny_models import DECODER_CHECKPOINTS


def _model(family: str, layers: int = 5, **overrides):
    _, fields = DECODER_CHECKPOINTS[family]
    depth = "n_layer" if family == "gpt2" else "num_hidden_layers"
    config = AutoConfig.for_model(family, **{**fields, depth: layers, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _export(model, path, **options) -> list[str]:
    lines: list[str] = []
    export_model(model, path, log=lines.append, **options)  # validated against PyTorch: a wrong copy fails here
    return lines


def _tracing(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith(("traced ", "tracing all ")))


def _ops(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(path, load_external_data=False).graph.node)


def _feeds(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, 32000, (2, 3))
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((2, 7), np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.tile(np.arange(4, 7), (2, 1))
        else:  # past.i.key / past.i.value: (B, Hkv, P, D)
            feeds[spec.name] = rng.standard_normal((2, 2, 4, 16)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_stitched_graphs_are_the_traced_graphs_node_for_node(tmp_path, cache):
    model = _model("llama")
    options = {"cache": "static", "max_length": 32} if cache == "static" else {}
    stitched = _export(model, tmp_path / "stitched", **options)
    every = _export(model, tmp_path / "every", trace_every_layer=True, **options)
    assert _tracing(stitched) == "traced 2 of 5 layers; layers 2..4 are copies of layer 1"
    assert _tracing(every).startswith("tracing all 5 layers")
    graphs = ["prefill", "decode"] + ["extend", "verify"] * (cache == "dynamic")
    for graph in graphs:
        a, b = tmp_path / "stitched" / f"{graph}.onnx", tmp_path / "every" / f"{graph}.onnx"
        assert _ops(a) == _ops(b), graph
        ours, theirs = onnx.load(a, load_external_data=False).graph, onnx.load(b, load_external_data=False).graph
        assert [i.name for i in ours.input] == [i.name for i in theirs.input] and [o.name for o in ours.output] == [o.name for o in theirs.output]
    if cache == "dynamic":  # the same numbers too, to float rounding, from both exports' extend graphs
        a, b = (ort.InferenceSession(str(tmp_path / name / "extend.onnx")) for name in ("stitched", "every"))
        for x, y in zip(a.run(None, _feeds(a)), b.run(None, _feeds(b))):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


def test_a_stitched_export_generates_what_transformers_generates(tmp_path):
    model = _model("qwen2", layers=6)
    assert _tracing(_export(model, tmp_path / "out")).startswith("traced 2 of 6 layers")
    prompt = [5, 900, 31, 17, 4000, 12]
    ours = Generator.load(tmp_path / "out").generate(prompt, 12, min_new_tokens=12).token_ids
    with torch.no_grad():
        ids = torch.tensor([prompt])
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert ours == theirs[0, len(prompt):].tolist()


def test_a_layer_that_computes_with_its_own_index_is_traced_every_time(tmp_path):
    # GPT-2's scale_attn_by_inverse_layer_idx divides each layer's scores by layer_idx + 1: the layers' modules look
    # the same, but their traced constants differ, and the node-by-node check must see it
    model = _model("gpt2", layers=4, scale_attn_by_inverse_layer_idx=True)
    line = _tracing(_export(model, tmp_path / "out"))  # validation against PyTorch passes: every layer was traced
    assert line.startswith("tracing all 4 layers (") and "differ" in line


def test_layers_of_different_kinds_are_not_traced_once():
    model = _model("gemma2", layers=4) if "gemma2" in DECODER_CHECKPOINTS else None
    if model is None:
        config = AutoConfig.for_model("gemma2", vocab_size=256000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)
        model = AutoModelForCausalLM.from_config(config).eval()
    contract = GraphContract(4, 2, 16, 256000)
    plan, reason = repeat_plan(model, contract)
    assert plan is None and "differ" in reason  # sliding and global layers alternate


def test_too_few_layers_are_traced_as_they_are():
    plan, reason = repeat_plan(_model("llama", layers=3), GraphContract(3, 2, 16, 32000))
    assert plan is None and reason == "3 layers: too few to gain"
