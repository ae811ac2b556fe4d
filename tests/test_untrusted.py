"""Export directories from anyone: links and external data out of the directory, corrupted files,
manifests that lie about their graphs, and fuzzed manifests. Every fault is one KvgraphError that
names the file (and the field or tensor); nothing outside the directory is ever opened.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgraph.graphs import KvgraphError, Manifest, ManifestError
from kvgraph.graphs.contract import GraphContract
from kvgraph.runtime import Generator
from kvgraph.runtime.core.session import load_graphs


@pytest.fixture
def copy_of(export_cache, tmp_path):
    """A fresh copy of the tiny llama export (dynamic cache) to damage."""
    out = tmp_path / "export"
    shutil.copytree(export_cache("llama").directory, out)
    return out


@pytest.fixture
def ort_spy(monkeypatch):
    """Records every graph onnxruntime is asked to open (to prove a refusal came first)."""
    opened = []
    real = ort.InferenceSession

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return opened


def _point_external_data(graph: Path, location: str) -> None:
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(graph))


@pytest.mark.parametrize("where", ["parent", "absolute", "nested-parent"])
def test_external_data_outside_the_directory_is_refused_before_onnxruntime(copy_of, ort_spy, where):
    outside = copy_of.parent / "stolen.bin"
    shutil.copy(copy_of / "model.onnx.data", outside)  # a real file onnxruntime would happily read
    location = {"parent": "../stolen.bin", "absolute": str(outside), "nested-parent": "sub/../../stolen.bin"}[where]
    _point_external_data(copy_of / "decode.onnx", location)
    for share in (True, False):
        with pytest.raises(KvgraphError, match=rf"decode.onnx: tensor '.*': refers to '{location}', outside the export directory"):
            load_graphs(copy_of, share_weights=share)
    assert "decode.onnx" not in ort_spy


def test_symlinks_out_of_the_directory_are_refused(copy_of, ort_spy):
    elsewhere = copy_of.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.move(copy_of / "model.onnx.data", elsewhere / "model.onnx.data")
    os.symlink(elsewhere / "model.onnx.data", copy_of / "model.onnx.data")
    with pytest.raises(KvgraphError, match=r"model.onnx.data: is a link to .*elsewhere/model.onnx.data, outside the export directory"):
        load_graphs(copy_of)
    assert ort_spy == []
    shutil.move(elsewhere / "model.onnx.data", copy_of / "model.onnx.data.real")
    (copy_of / "model.onnx.data").unlink()
    os.symlink("model.onnx.data.real", copy_of / "model.onnx.data")  # a link that stays inside is fine
    assert load_graphs(copy_of).contract.num_layers == 2

    shutil.move(copy_of / "prefill.onnx", elsewhere / "prefill.onnx")
    os.symlink(elsewhere / "prefill.onnx", copy_of / "prefill.onnx")
    with pytest.raises(KvgraphError, match=r"prefill.onnx: is a link to .*, outside the export directory"):
        load_graphs(copy_of)
    shutil.move(elsewhere / "prefill.onnx", copy_of / "prefill.onnx.real")
    (copy_of / "prefill.onnx").unlink()
    (elsewhere / "tokenizer.json").write_text("{}")
    os.symlink(elsewhere / "tokenizer.json", copy_of / "tokenizer.json")
    os.symlink("prefill.onnx.real", copy_of / "prefill.onnx")
    with pytest.raises(KvgraphError, match=r"tokenizer.json: is a link to .*, outside the export directory"):
        Generator.load(copy_of)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupted_graph_is_named(copy_of, ort_spy, damage):
    path = copy_of / "prefill.onnx"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 40, "empty": b""}[damage])
    with pytest.raises(KvgraphError, match=r"prefill.onnx: not a readable ONNX graph"):
        load_graphs(copy_of)
    assert "prefill.onnx" not in ort_spy


def test_truncated_or_replaced_weights_are_named(copy_of):
    weights = copy_of / "model.onnx.data"
    data = weights.read_bytes()
    weights.write_bytes(data[:-4096])
    with pytest.raises(KvgraphError, match=rf"model.onnx.data: {len(data) - 4096} bytes, but weights.json says {len(data)}"):
        load_graphs(copy_of)
    for policy in ("one-session", "per-session"):  # sessions that load the file themselves: checked against weights.json first
        with pytest.raises(KvgraphError, match=rf"model.onnx.data: {len(data) - 4096} bytes, but weights.json says {len(data)}"):
            load_graphs(copy_of, weights=policy)


def _rewrite_contract(directory: Path, **changes) -> None:
    """A manifest that is self-consistent but describes other graphs than the ones on disk."""
    manifest = Manifest.load(directory)
    fields = {**manifest.contract.__dict__, **changes}
    manifest = Manifest(**{**manifest.__dict__, "contract": GraphContract(**fields)})
    manifest.write(directory)


@pytest.mark.parametrize("changes,message", [
    ({"num_layers": 3}, r"prefill.onnx: tensor names differ \(missing \['present.2.key', 'present.2.value'\]"),
    ({"head_dim": 32}, r"present.0.key has shape \(batch, 2, sequence, 16\), expected \(batch, 2, sequence, 32\)"),
    ({"dtype": "float16"}, r"logits has dtype float32, expected float16"),
    ({"vocab_size": 64}, r"logits has shape \(batch, 1, 32000\), expected \(batch, 1, 64\)"),
])
def test_manifest_that_disagrees_with_its_graphs_is_named(copy_of, changes, message):
    _rewrite_contract(copy_of, **changes)
    with pytest.raises(KvgraphError, match=r"the graphs do not match kvgraph.json: .*" + message):
        load_graphs(copy_of)


def test_truncated_manifest_is_named(copy_of):
    path = copy_of / "kvgraph.json"
    path.write_text(path.read_text()[:500])
    with pytest.raises(ManifestError, match=r"kvgraph.json: cannot read the manifest"):
        Generator.load(copy_of)


# -- fuzzing: any mutation of a manifest loads or raises ManifestError, never anything else ---------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _mutate(doc, path, action, value):
    if not path:
        return value if action == "replace" else doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    elif action == "replace":
        parent[path[-1]] = value
    elif action == "add" and isinstance(parent[path[-1]], dict):
        parent[path[-1]]["extra"] = value
    return doc


@pytest.fixture(scope="module")
def manifests(export_cache, seq2seq_exports):
    return [json.loads((d / "kvgraph.json").read_text())
            for d in (export_cache("llama").directory, export_cache("qwen3", "static").directory, seq2seq_exports("t5")[1])]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_manifests_load_or_raise_manifest_error(manifests, data):
    doc = copy.deepcopy(data.draw(st.sampled_from(manifests)))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(doc))))
        doc = _mutate(doc, path, data.draw(st.sampled_from(["delete", "replace", "add"])), data.draw(JSON))
    try:
        manifest = Manifest.from_json(doc)
    except ManifestError as error:
        assert "kvgraph.json" in str(error)
        return
    contract = manifest.contract  # a manifest that loads is fully usable
    assert all(spec.name for inputs, outputs in contract.graphs().values() for spec in inputs + outputs)
    assert np.isfinite(contract.cache_bytes_per_token())
