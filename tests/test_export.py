"""What export writes, and how it refuses bad input without leaving anything half-written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from tiny_models import tiny_model
from kvgraph.export import TraceError, export_model
from kvgraph.graphs import KvgraphError, Manifest, ValidationError
from kvgraph.graphs import report
from kvgraph.graphs.report import compare, failures, format_table
from oracle import OrtPair, torch_step


def _no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if name in p.name]


@pytest.mark.parametrize("family", ["gpt2", "gemma", "llama"])
def test_weights_are_stored_once_even_when_tied(export_cache, family):
    exported = export_cache(family)
    data = exported.directory / "model.onnx.data"
    assert data.stat().st_size <= 1.1 * exported.manifest.model.parameter_bytes
    for graph in ("prefill.onnx", "decode.onnx", "extend.onnx"):
        model = onnx.load(str(exported.directory / graph), load_external_data=False)
        locations = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
        assert locations == {"model.onnx.data"}
        inline = [t for t in model.graph.initializer if not t.external_data]
        assert all(len(t.raw_data) < 1024 for t in inline)  # only small constants stay in the graph file


@pytest.mark.parametrize("mode,opset", [("dynamic", 23), ("static", 24)])
def test_graphs_use_standard_onnx_ops_only(export_cache, mode, opset):
    exported = export_cache("llama", mode)
    assert exported.manifest.opset == opset
    for graph in ("prefill.onnx", "decode.onnx"):
        model = onnx.load(str(exported.directory / graph), load_external_data=False)
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
        assert model.ir_version == 10
        ops = {n.op_type for n in model.graph.node}
        assert {"RMSNormalization", "RotaryEmbedding", "Attention"} <= ops
        assert ("TensorScatter" in ops) == (mode == "static") and ("Concat" in ops or mode == "static")
        producers = {out: n for n in model.graph.node for out in n.output}
        if mode == "static":  # each present is the TensorScatter of its past, so the buffer can be updated in place
            for past, present in zip(exported.contract.past_names(), exported.contract.present_names()):
                assert producers[present].op_type == "TensorScatter" and producers[present].input[0] == past
        # grouped-query attention (4 heads, 2 KV heads): the Attention op reads the cache itself, not an expanded copy
        attention = [n for n in model.graph.node if n.op_type == "Attention"]
        if mode == "static":  # the written buffer is the op's key and value
            assert {name for n in attention for name in n.input[1:3]} == set(exported.contract.present_names())
        else:  # packed heads: the op takes the past as past_key/past_value and makes the present itself
            past = {name for n in attention for name in n.input[4:6]}
            if graph == "decode.onnx":
                assert past == set(exported.contract.past_names())
            else:  # prefill has no past: one empty key and value for every layer
                assert past == {"kvgraph.empty_past.key", "kvgraph.empty_past.value"}
            assert {name for n in attention for name in n.output[1:3]} == set(exported.contract.present_names())
            heads = {(a.name, a.i) for n in attention for a in n.attribute if a.name.endswith("num_heads")}
            assert heads == {("q_num_heads", 4), ("kv_num_heads", 2)}


def test_manifest_is_complete_and_embedded_in_each_graph(export_cache):
    exported = export_cache("llama")
    text = (exported.directory / "kvgraph.json").read_text()
    data = json.loads(text)
    assert data["model"]["family"] == "llama" and data["contract"]["num_kv_heads"] == 2
    assert data["special_tokens"] == {"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 0, "decoder_start_token_id": None}
    assert data["model"]["max_positions"] == 128 and data["opset"] == 23
    assert {"torch", "transformers", "onnx"} <= set(data["versions"])
    validation = data["validation"]
    tensors = 1 + 2 * 2  # logits and 2 layers' key and value
    assert validation["passed"] and len(validation["rows"]) == tensors * (1 + validation["decode_steps"] + 2)  # + extend, verify
    assert {row["graph"] for row in validation["rows"]} == {"prefill", "decode", "extend", "verify"}
    verify = [row for row in validation["rows"] if row["graph"] == "verify" and row["tensor"] == "logits"]
    assert len(verify) == 1 and verify[0]["ok"]  # PyTorch's logits at each new position; another shape is a failed row
    assert validation["decode_steps"] >= 3
    for graph in ("prefill.onnx", "decode.onnx", "extend.onnx"):
        model = onnx.load(str(exported.directory / graph), load_external_data=False)
        assert {p.key: p.value for p in model.metadata_props}["kvgraph.manifest"] == text


def test_all_logits_option_keeps_every_position(tmp_path):
    model = tiny_model("qwen2")
    result = export_model(model, tmp_path / "out", all_logits=True)
    ids = np.array([[5, 9, 14, 3, 77]], dtype=np.int64)
    mask = np.ones_like(ids)
    logits = OrtPair(tmp_path / "out", result.manifest.contract).prefill(ids, mask)[0]
    assert logits.shape == (1, 5, result.manifest.contract.vocab_size)
    row = compare("prefill", 0, "logits", logits, torch_step(model, ids, mask, all_logits=True)[0], "float32")
    assert row.ok, format_table([row])


def test_float16_export_loads_and_validates(tmp_path):
    result = export_model(tiny_model("llama"), tmp_path / "fp16", dtype="float16")
    assert result.manifest.contract.dtype == "float16"
    assert result.manifest.validation["tolerance"] == {"atol": 2e-2, "rtol": 2e-2}
    assert not failures(result.validation), format_table(result.validation)
    ids = np.array([[5, 9, 14]], dtype=np.int64)
    outputs = OrtPair(tmp_path / "fp16", result.manifest.contract).prefill(ids, np.ones_like(ids))
    assert outputs[0].dtype == np.float16 and outputs[1].dtype == np.float16


def test_untested_family_goes_through_the_generic_path(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("olmo", vocab_size=50304, hidden_size=64,  # allenai/OLMo-1B-hf's vocabulary
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  initializer_range=0.1)
    result = export_model(AutoModelForCausalLM.from_config(config).eval(), tmp_path / "olmo")
    assert result.manifest.model.family == "olmo" and result.manifest.validation["passed"]


@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_failed_validation_publishes_nothing(tmp_path, monkeypatch, kind, capsys):
    """One gate for every kind: a failed validation prints the table and writes nothing, not even the parents it made."""
    from tiny_models import tiny_seq2seq

    monkeypatch.setitem(report.TOLERANCES, "float32", {"atol": 0.0, "rtol": 0.0})  # float noise alone now fails
    model = tiny_model("llama") if kind == "decoder" else tiny_seq2seq("t5")
    with pytest.raises(ValidationError, match="exceed the float32 tolerance .* nothing was written"):
        export_model(model, tmp_path / "new" / "out", log=print)
    assert list(tmp_path.iterdir()) == []
    table = capsys.readouterr().out
    assert "FAIL" in table and ("encoder" in table) == (kind == "encoder-decoder")


def test_onnxruntime_failure_during_validation_is_one_line_naming_type_graph_and_step(tmp_path, monkeypatch):
    import onnxruntime

    real = onnxruntime.InferenceSession

    def refuse_decode(path, *args, **kwargs):
        if str(path).endswith("decode.onnx"):
            raise onnxruntime.capi.onnxruntime_pybind11_state.Fail("[ONNXRuntimeError] : 1 : FAIL : Load model failed\nmore")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse_decode)
    with pytest.raises(KvgraphError, match=r"^model type 'llama': onnxruntime cannot load decode.onnx during validation \(step 1\): "
                                           r"\[ONNXRuntimeError\] : 1 : FAIL : Load model failed$"):
        export_model(tiny_model("llama"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_no_directory(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):  # Ctrl-C while tracing, the longest phase
        assert _no_leftovers(tmp_path, "out"), "the staging directory exists by now"
        raise KeyboardInterrupt

    monkeypatch.setattr("kvgraph.export.api.trace_graphs", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_model("llama"), tmp_path / "out")
    assert _no_leftovers(tmp_path, "out") == []


def test_interrupt_dropped_inside_a_finaliser_still_stops_the_export(tmp_path):
    """A real SIGINT whose KeyboardInterrupt is raised inside an object's __del__ is printed and dropped by Python
    (tracing runs thousands of finalisers); the export remembers it and stops at the next phase."""
    import os
    import signal

    class Finaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside __del__

    def log(line: str) -> None:
        if line == "optimize...":
            Finaliser()  # collected at once

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, also when run as a background job
    try:
        with pytest.raises(KeyboardInterrupt):
            export_model(tiny_model("llama"), tmp_path / "out", log=log)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the export's handler is gone again
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _no_leftovers(tmp_path, "out") == []


def test_model_that_cannot_trace_names_type_and_step(tmp_path):
    model = tiny_model("llama")
    inner_forward = model.model.forward

    def forward(*args, **kwargs):
        if kwargs["input_ids"].sum() > 10:  # data-dependent branch
            return inner_forward(*args, **kwargs)
        return inner_forward(*args, **kwargs)

    model.model.forward = forward
    with pytest.raises(TraceError, match=r"model type 'llama': extend graph failed at step 1/3 \(torch.export capture\)"):
        export_model(model, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out") == []


def test_encoder_decoder_directory_loads_as_seq2seq(tmp_path):
    from tiny_models import tiny_seq2seq

    tiny_seq2seq("marian").save_pretrained(tmp_path / "hf")
    result = export_model(tmp_path / "hf", tmp_path / "out", task="text2text-generation")
    assert result.manifest.contract.kind == "encoder-decoder" and result.manifest.model.architecture == "MarianMTModel"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.onnx")) == ["decode.onnx", "encoder.onnx", "prefill.onnx"]


def test_manifest_loads_back(export_cache):
    exported = export_cache("llama")
    assert Manifest.load(exported.directory) == exported.manifest


@pytest.mark.parametrize("options,message", [
    ({"cache": "static"}, "--cache static needs --max-length"),
    ({"max_length": 64}, "--max-length sets the static cache's size; it needs --cache static"),
    ({"cache": "static", "max_length": 4}, "--max-length must be an integer >= 16"),
    ({"cache": "static", "max_length": 4096}, r"--max-length 4096 exceeds the model's max positions \(128\)"),
    ({"cache": "paged"}, "--cache must be one of"),
])
def test_bad_cache_options_are_refused_before_writing(tmp_path, options, message):
    with pytest.raises(KvgraphError, match=message):
        export_model(tiny_model("llama"), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_window_on_every_layer_holds_past_twice_the_window(tmp_path, mode):
    """Mistral's config windows every layer (no layer_types): one windowed mask for all layers. 7 + 25 tokens
    cross a window of 8 four times; both cache modes give transformers generate's greedy tokens."""
    from kvgraph.runtime import Generator

    model = tiny_model("mistral", sliding_window=8)
    options = {"cache": "static", "max_length": 48} if mode == "static" else {}
    result = export_model(model, tmp_path / "out", **options)
    assert result.manifest.model.attention_windows == [8, 8]
    prompt = [5, 900, 31, 4000, 77, 12, 18000]
    ours = Generator.load(tmp_path / "out").generate(prompt, 25, min_new_tokens=25).token_ids
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 7, dtype=torch.long), do_sample=False,
                                max_new_tokens=25, min_new_tokens=25, pad_token_id=0)[0, 7:].tolist()
    assert ours == theirs


def test_weights_index_lists_every_external_initializer(export_cache):
    exported = export_cache("gpt2", "static")  # tied embeddings: stored once, transposed
    index = json.loads((exported.directory / "weights.json").read_text())
    assert index["size"] == (exported.directory / "model.onnx.data").stat().st_size
    for graph in ("prefill", "decode"):
        model = onnx.load(str(exported.directory / f"{graph}.onnx"), load_external_data=False)
        external = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.external_data}
        assert set(index["graphs"][graph]) == set(external)
        for name, info in external.items():
            entry = index["tensors"][index["graphs"][graph][name]]
            assert (entry["offset"], entry["length"]) == (int(info["offset"]), int(info["length"]))
    ops = [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in external]
    assert ops == []  # no Transpose of a weight left for onnxruntime to fold into a second copy


@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_validation_runs_pytorch_first_and_onnxruntime_without_the_weights(export_cache, seq2seq_exports, kind):
    """An export that loaded its own model frees the weights between the two sides of validation (the peak holds one
    copy): with the model's weights wiped at that point, every onnxruntime step still matches PyTorch's."""
    import copy

    from kvgraph.export.families import family_for
    from kvgraph.export.validate import check_cases, reference_cases

    if kind == "decoder":
        exported = export_cache("llama", "dynamic")
        model, directory, contract = exported.model, exported.directory, exported.contract
    else:
        model, directory, manifest = seq2seq_exports("bart", "dynamic")
        contract = manifest.contract
    model, family = copy.deepcopy(model), family_for(model.config.model_type)
    cases = reference_cases(model, family, contract)
    with torch.no_grad():  # what an export that owns its model does here: the weights go
        for parameter in model.parameters():
            parameter.zero_()
    rows = check_cases(directory, family, contract, cases)
    assert rows and not failures(rows), format_table(rows)


def test_a_model_passed_in_keeps_its_weights(tmp_path):
    model = tiny_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    export_model(model, tmp_path / "out")
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
