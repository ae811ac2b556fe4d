"""Mechanisms beyond the dense decoder, read off the exports the parity suite proves (tests/test_parity.py
runs every parity test on gemma2, mixtral, falcon, falcon-new and bloom in both cache modes):
what each export says about itself, and what kvgraph refuses, with its reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kvgraph.graphs import KvgraphError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import coverage  # noqa: E402  (benchmarks/coverage.py: the shrinker and one row of the coverage table)


def _ops(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_sliding_window_layers_are_recorded_and_the_static_cache_outgrows_the_window(export_cache, mode):
    exported = export_cache("gemma2", mode)
    assert exported.manifest.model.attention_windows == [8, None]  # gemma2 alternates sliding and global layers
    if mode == "static":
        assert exported.contract.max_length == 48 > 8  # parity runs 23 tokens through a window of 8


def test_a_static_window_layer_is_a_ring_of_w_positions(export_cache):
    """The windowed layer's buffers hold W = 8 positions, the global layer's N = 48; the runtime allocates them so."""
    from kvgraph.runtime.core.budget import cache_need
    from kvgraph.runtime.generator import Generator
    from kvgraph.runtime.core.steps import StaticCache

    exported = export_cache("gemma2", "static")
    contract = exported.contract
    assert contract.ring_windows == (8, None)
    inputs = {spec.name: spec.shape for spec in contract.graphs()["decode"][0]}
    assert inputs["past.0.key"] == ("batch", 2, 8, 16) and inputs["past.1.value"] == ("batch", 2, 48, 16)
    graph = onnx.load(str(exported.directory / "decode.onnx"), load_external_data=False)
    declared = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert declared["past.0.key"][2] == 8 and declared["past.1.key"][2] == 48
    assert any(n.op_type == "TensorScatter" and any(a.s == b"circular" for a in n.attribute) for n in graph.graph.node)
    cache = StaticCache(Generator.load(exported.directory).graphs, batch=3)
    assert [v.shape()[2] for v in cache.values] == [8, 8, 48, 48]
    assert contract.buffer_bytes_per_row() == 2 * 2 * 16 * 4 * (8 + 48)
    need, how = cache_need(contract, [5, 9], 10)
    assert need == 2 * contract.buffer_bytes_per_row() and "1 windowed layers hold rings of 8" in how  # the budget counts W
    cache.length = 20  # as after 20 positions: continuing keeps them all, and so does a rewind of one position;
    assert (cache.reusable(20), cache.reusable(19), cache.reusable(18), cache.reusable(12)) == (20, 19, 0, 0)  # 2+: overwritten


@pytest.mark.parametrize("family", ["falcon", "falcon-new", "mixtral", "bloom"])
def test_kv_head_layout_is_the_cached_one(export_cache, family):
    """The contract's Hkv is what the model caches, however its config spells it: multi-query Falcon caches one
    K/V head (its config says multi_query, no num_key_value_heads); Falcon's new decoder architecture projects
    grouped K/V heads. The expectation is read off transformers' own cache after one forward, not written down,
    so it follows whatever layout the installed transformers caches."""
    from oracle import torch_step

    exported = export_cache(family, "dynamic")
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    cached_key = torch_step(exported.model, ids, np.ones_like(ids))[1]  # layer 0's key (B, Hkv, S, D)
    assert exported.contract.num_kv_heads == cached_key.shape[1], (exported.contract.num_kv_heads, cached_key.shape)
    nodes = _ops(exported.directory / "decode.onnx")
    assert not [n.op_type for n in nodes if n.op_type in ("Tile", "Expand") and any("past" in i for i in n.input)], \
        "a K/V head is copied per query head"


def test_multi_query_attention_is_one_attention_op_per_layer_reading_one_head(export_cache):
    """Falcon calls SDPA with one K/V head broadcast over 4 query heads; it becomes ONNX Attention with kv_num_heads 1."""
    exported = export_cache("falcon", "dynamic")
    attention = [n for n in _ops(exported.directory / "decode.onnx") if n.op_type == "Attention"]
    assert len(attention) == exported.contract.num_layers


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_experts_are_routed_with_standard_ops(export_cache, mode):
    """transformers 5 routes experts through a custom op; the export routes them with NonZero / Gather / ScatterND."""
    exported = export_cache("mixtral", mode)
    nodes = _ops(exported.directory / "decode.onnx")
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}, {n.domain for n in nodes}
    assert sum(n.op_type == "NonZero" for n in nodes) == exported.contract.num_layers * 8  # one per expert and layer
    assert any(n.op_type == "ScatterND" and any(a.s == b"add" for a in n.attribute) for n in nodes)


def test_a_model_without_a_key_value_cache_is_refused_with_the_reason(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvgraph.export import export_model

    config = AutoConfig.for_model("mamba", **coverage.shrink(AutoConfig.for_model("mamba").to_dict()))
    torch.manual_seed(0)
    with pytest.raises(KvgraphError, match="model type 'mamba'.*(recurrent|state-space)"):
        export_model(AutoModelForCausalLM.from_config(config).eval(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layers_other_than_attention_are_refused_before_tracing(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvgraph.export import export_model

    small = coverage.shrink(AutoConfig.for_model("lfm2").to_dict())
    config = AutoConfig.for_model("lfm2", **{**small, "layer_types": ["conv", "full_attention"]})  # as LiquidAI/LFM2-350M mixes them
    torch.manual_seed(0)
    with pytest.raises(KvgraphError, match="model type 'lfm2' has conv layers"):
        export_model(AutoModelForCausalLM.from_config(config).eval(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the coverage script's generic shrinker ----------------------------------------------------------


def test_shrinker_keeps_the_vocabulary_kv_layout_and_one_layer_of_each_kind():
    from transformers import AutoConfig

    gemma3 = AutoConfig.for_model("gemma3_text").to_dict()
    small = coverage.shrink(gemma3)
    assert "vocab_size" not in small and small["num_hidden_layers"] == 2 and small["hidden_size"] == 64
    assert small["layer_types"] == ["sliding_attention", "full_attention"]  # 5:1 in the real config; both kinds kept
    assert small["sliding_window"] == 8
    falcon = coverage.shrink(AutoConfig.for_model("falcon").to_dict())
    assert "multi_query" not in falcon and AutoConfig.for_model("falcon", **falcon).multi_query  # still multi-query
    mixtral = coverage.shrink(AutoConfig.for_model("mixtral").to_dict())
    assert (mixtral["num_local_experts"], mixtral["num_experts_per_tok"]) == (8, 2)


def test_coverage_row_of_a_family_outside_the_suite():
    """One row of the README's coverage table, produced as the script produces it: gpt_bigcode (multi-query
    StarCoder) exports in both modes and its greedy tokens equal transformers generate."""
    row = coverage.check("gpt_bigcode", seq2seq=False)
    assert (row["dynamic"], row["static"]) == (True, True), row
    assert row["vocab"] == 50257


def test_latent_attention_caches_keys_and_values_of_different_widths(tmp_path):
    """DeepSeek-V3's multi-head latent attention caches a compressed latent (kv_lora_rank wide) as the "key" and the
    rotary part as the "value": the contract carries Dv beside D, and both cache modes give generate's tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvgraph.export import export_model

    from kvgraph.runtime import Generator

    config = AutoConfig.for_model("deepseek_v3", **coverage.shrink(AutoConfig.for_model("deepseek_v3").to_dict()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    theirs = coverage._transformers_greedy(model)
    contract = export_model(model, tmp_path / "out").manifest.contract  # validated against PyTorch
    assert (contract.num_kv_heads, contract.head_dim, contract.value_head_dim) == (1, config.kv_lora_rank, config.qk_rope_head_dim)
    ours = Generator.load(tmp_path / "out").generate(coverage._prompt(model), coverage.NEW_TOKENS, min_new_tokens=coverage.NEW_TOKENS)
    assert ours.token_ids == theirs
    assert coverage._check_mode(model, "static", theirs) == (True, "")  # the static cache: exported and generating the same


def test_a_conversation_on_a_ring_cache_equals_one_shot(tmp_path):
    """A two-turn chat on a static cache with a ring equals generating the whole conversation at once, past the
    window of 8 (turn two reuses the cache as far as StaticCache.reusable allows)."""
    from tiny_models import text_model_dir

    from kvgraph.export import export_model
    from kvgraph.runtime import Generator

    export_model(text_model_dir(tmp_path / "hf", family="gemma2"), tmp_path / "out", cache="static", max_length=96)
    gen = Generator.load(tmp_path / "out")
    assert gen.graphs.contract.ring_windows == (8, None)
    conversation = gen.chat()
    first = conversation.send("hi there", max_new_tokens=10)
    second = conversation.send("and then?", max_new_tokens=10)
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": first.text},
                {"role": "user", "content": "and then?"}]
    assert second.token_ids == gen.generate(gen.codec.encode_chat(messages), max_new_tokens=10).token_ids
