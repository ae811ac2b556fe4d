"""The graph contract and the manifest: names, shapes, versioning, and clear errors."""

from __future__ import annotations

import json

import pytest

from kvgraph.graphs import FORMAT_VERSION, GraphContract, Manifest, ManifestError, ModelInfo, SpecialTokens, TensorSpec, io_mismatches
from kvgraph.graphs.conventions import extend_position_ids, left_pad, prefill_position_ids

import numpy as np


def _contract(**kw):
    return GraphContract(**{"num_layers": 2, "num_kv_heads": 3, "head_dim": 8, "vocab_size": 50, **kw})


def _manifest(contract=None):
    return Manifest(
        contract or _contract(),
        ModelInfo("llama", "LlamaForCausalLM", "tiny", 128, 1000),
        SpecialTokens(1, (2, 5), 0),
        opset=23,
        ir_version=10,
        versions={"torch": "x"},
        files={"prefill": "prefill.onnx"},
    )


def test_cache_names_and_shapes_follow_the_layout():
    c = _contract()
    assert c.past_names() == ["past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    inputs, outputs = c.graphs()["decode"]
    assert [s.name for s in inputs[:3]] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[1].shape == ("batch", "past_sequence+1")
    assert inputs[3].shape == ("batch", 3, "past_sequence", 8)
    assert outputs[1].shape == ("batch", 3, "past_sequence+1", 8)
    assert c.graphs()["prefill"][1][0].shape == ("batch", 1, 50)
    assert _contract(all_logits=True).graphs()["prefill"][1][0].shape == ("batch", "sequence", 50)
    assert c.cache_bytes_per_token() == 2 * 2 * 3 * 8 * 4


def test_values_may_be_narrower_than_keys():
    """Latent attention: every *.value tensor (past, present, static buffers) is Dv wide, every *.key D wide."""
    for c in (_contract(value_head_dim=4), _contract(value_head_dim=4, cache="static", max_length=32)):
        for graph, (inputs, outputs) in c.graphs().items():
            for spec in inputs + outputs:
                if spec.name.endswith((".key", ".value")):
                    assert spec.shape[-1] == (4 if spec.name.endswith(".value") else 8), (graph, spec)
        assert c.cache_bytes_per_token() == 2 * 3 * (8 + 4) * 4


@pytest.mark.parametrize("field,value", [("num_layers", 0), ("head_dim", -1), ("vocab_size", 2.5), ("num_kv_heads", True),
                                         ("value_head_dim", 0), ("value_head_dim", "8")])
def test_contract_rejects_bad_dimensions(field, value):
    with pytest.raises(ValueError, match=field):
        _contract(**{field: value})


def test_io_mismatches_name_the_tensor_and_shapes():
    want = [TensorSpec("past.0.key", "float32", ("batch", 2, "past_sequence", 64))]
    assert io_mismatches("decode", want, [TensorSpec("past.0.key", "float32", ("b", 2, "p", 64))]) == []
    reasons = io_mismatches("decode", want, [TensorSpec("past.0.key", "float32", ("b", 2, "p", 32))])
    assert reasons == ["decode: past.0.key has shape (b, 2, p, 32), expected (batch, 2, past_sequence, 64)"]
    assert "missing ['past.0.key']" in io_mismatches("decode", want, [TensorSpec("past_0", "float32", (1,))])[0]
    assert "dtype float16" in io_mismatches("decode", want, [TensorSpec("past.0.key", "float16", ("b", 2, "p", 64))])[0]


def test_manifest_round_trips_through_json(tmp_path):
    manifest = _manifest()
    manifest.write(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    data = json.loads((tmp_path / "kvgraph.json").read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert data["graphs"]["decode"]["inputs"][3] == {"name": "past.0.key", "dtype": "float32", "shape": ["batch", 3, "past_sequence", 8]}
    assert data["conventions"]["padding_side"] == "left"


def _write(tmp_path, data):
    (tmp_path / "kvgraph.json").write_text(json.dumps(data))
    return tmp_path


def test_newer_major_format_is_refused(tmp_path):
    data = _manifest().to_json()
    data["format_version"] = "2.0"
    with pytest.raises(ManifestError, match="format_version 2.0 is newer"):
        Manifest.load(_write(tmp_path, data))
    data["format_version"] = "1.7"  # a newer minor version is still readable
    assert Manifest.load(_write(tmp_path, data)).format_version == "1.7"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("contract"), "missing field contract"),
        (lambda d: d["contract"].update(num_layers="2"), "field contract is invalid"),
        (lambda d: d.update(opset="23"), "field opset has the wrong type"),
        (lambda d: d["model"].update(attention_windows=[8, 0]), "field model is invalid: attention_windows"),
        (lambda d: d["model"].update(attention_windows="8"), "field model is invalid: attention_windows"),
        (lambda d: d["special_tokens"].update(eos_token_ids=[2, "x"]), "eos_token_ids"),
        (lambda d: d["graphs"]["decode"]["inputs"].pop(), "graphs.decode.inputs disagrees"),
        (lambda d: d["graphs"]["prefill"].pop("outputs"), "missing field graphs.prefill.outputs"),
    ],
)
def test_bad_manifest_fields_are_named(tmp_path, mutate, message):
    data = _manifest().to_json()
    mutate(data)
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.load(_write(tmp_path, data))
    assert "kvgraph.json" in str(info.value)


def test_missing_or_broken_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="no manifest here"):
        Manifest.load(tmp_path)
    (tmp_path / "kvgraph.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match="not a directory"):
        Manifest.load(tmp_path / "nowhere")


def test_position_ids_follow_the_mask():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert prefill_position_ids(mask).tolist() == [[0, 1, 2], [1, 1, 0]]
    grown = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    assert extend_position_ids(grown, 1).tolist() == [[3], [1]]  # decode: sum(mask) - 1
