"""Encoder-decoder parity: t5, bart and marian graphs against PyTorch, and the runtime around them.

The oracle is the Hugging Face model itself (its encoder, and its forward with an
EncoderDecoderCache), never kvgraph's export wrappers. fp32 tolerance as everywhere: 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from conftest import SEQ2SEQ_STATIC_LENGTH
from oracle import forward_with_cache
from tiny_models import SEQ2SEQ_CONFIGS, tiny_seq2seq
from kvgraph.export import export_model
from kvgraph.graphs import KvgraphError
from kvgraph.graphs.conventions import right_pad
from kvgraph.graphs.modes import step_adapter
from kvgraph.graphs.report import compare, failures, format_table
from kvgraph.runtime import Generator
from kvgraph.runtime.commands.main import main

DECODE_STEPS = 8
_RNG = np.random.default_rng(0)
SOURCES = [_RNG.integers(3, 30000, size=n).tolist() for n in (7, 3, 5)]  # spread over every family's vocabulary (>= 32128)


@pytest.fixture(params=sorted(SEQ2SEQ_CONFIGS))
def seq2seq(request, seq2seq_exports):
    return seq2seq_exports(request.param)


@pytest.fixture(params=[(f, m) for m in ("dynamic", "static") for f in sorted(SEQ2SEQ_CONFIGS)], ids=lambda p: f"{p[0]}-{p[1]}")
def seq2seq_any_cache(request, seq2seq_exports):
    """Every encoder-decoder family with a dynamic and with a static self-attention cache."""
    return seq2seq_exports(*request.param)


class Sessions:
    """The three graphs in onnxruntime, fed by the contract's step adapter (numpy in and out).

    Calls take and return the dynamic cache's view (pasts of length P, presents of P + 1): a static
    export gets each past copied into zero buffers written at index P, so the tests run on both modes.
    """

    def __init__(self, directory, contract):
        self.contract = contract
        self.steps = step_adapter(contract)
        self.sessions = {name: ort.InferenceSession(str(directory / f"{name}.onnx"), providers=["CPUExecutionProvider"])
                         for name in ("encoder", "prefill", "decode")}

    def _run(self, graph, feeds):
        names = [o.name for o in self.sessions[graph].get_outputs()]
        return dict(zip(names, self.sessions[graph].run(names, feeds)))

    def encoder(self, ids, mask):
        return self._run("encoder", {"input_ids": ids, "attention_mask": mask})["encoder_hidden_states"]

    def prefill(self, tokens, hidden, mask):
        _, outputs = self.steps.run(self._run, "prefill", tokens, mask, [], {"encoder_hidden_states": hidden})
        return self.steps.step_outputs(outputs)

    def decode(self, tokens, mask, past, cross):
        _, outputs = self.steps.run(self._run, "decode", tokens, mask, list(past), dict(zip(self.contract.cross_names(), cross)))
        return self.steps.step_outputs(outputs)


def torch_encoder(model, ids, mask):
    with torch.no_grad():
        return model.get_encoder()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


def torch_decoder(model, tokens, hidden, mask, cache=None):
    """Hugging Face forward with an EncoderDecoderCache: [logits (B, 1, V), self K/V..., cross K/V...] and the cache."""
    cache = cache if cache is not None else EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        out, cache = forward_with_cache(model, cache, encoder_outputs=BaseModelOutput(last_hidden_state=torch.from_numpy(hidden)),
                                        attention_mask=torch.from_numpy(mask), decoder_input_ids=torch.from_numpy(tokens))
    self_kv = [t.numpy() for layer in cache.self_attention_cache.layers for t in (layer.keys, layer.values)]
    cross_kv = [t.numpy() for layer in cache.cross_attention_cache.layers for t in (layer.keys, layer.values)]
    return [out.logits[:, -1:].numpy(), *self_kv, *cross_kv], cache


def _start(model, batch):
    return np.full((batch, 1), model.config.decoder_start_token_id, dtype=np.int64)


def test_encoder_prefill_and_cross_kv_match_pytorch(seq2seq_any_cache):
    model, directory, manifest = seq2seq_any_cache
    contract = manifest.contract
    graphs = Sessions(directory, contract)
    ids, mask = right_pad(SOURCES, pad_id=model.config.pad_token_id)
    hidden, expected_hidden = graphs.encoder(ids, mask), torch_encoder(model, ids, mask)
    rows = [compare("encoder", 0, "encoder_hidden_states", hidden[mask == 1], expected_hidden[mask == 1], "float32")]
    actual = graphs.prefill(_start(model, len(SOURCES)), expected_hidden, mask)
    expected, _ = torch_decoder(model, _start(model, len(SOURCES)), expected_hidden, mask)
    names = ["logits", *contract.present_names(), *contract.cross_names()]
    assert [a.shape for a in actual] == [e.shape for e in expected] and len(names) == len(actual)
    rows += [compare("prefill", 0, n, a, e, "float32") for n, a, e in zip(names, actual, expected)]
    assert not failures(rows), format_table(rows)


def test_decode_steps_match_pytorch(seq2seq_any_cache):
    model, directory, manifest = seq2seq_any_cache
    contract = manifest.contract
    graphs = Sessions(directory, contract)
    ids, mask = right_pad(SOURCES, pad_id=model.config.pad_token_id)
    hidden = torch_encoder(model, ids, mask)
    layers = 2 * contract.num_layers
    actual = graphs.prefill(_start(model, len(SOURCES)), hidden, mask)
    expected, cache = torch_decoder(model, _start(model, len(SOURCES)), hidden, mask)
    cross = actual[1 + layers:]  # computed once, by prefill; decode only reads them
    rows = []
    for step in range(1, DECODE_STEPS + 1):
        token = expected[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        actual = graphs.decode(token, mask, actual[1: 1 + layers], cross)
        expected, cache = torch_decoder(model, token, hidden, mask, cache)
        assert len(actual) == 1 + layers and actual[1].shape[2] == 1 + step  # no cross K/V among the outputs
        rows += [compare("decode", step, n, a, e, "float32") for n, a, e in zip(["logits", *contract.present_names()], actual, expected)]
    assert not failures(rows), format_table(rows)


def test_greedy_tokens_equal_transformers_generate_and_batch_equals_alone(seq2seq):
    model, directory, _ = seq2seq
    gen = Generator.load(directory)
    new = dict(max_new_tokens=12, min_new_tokens=12)  # 12 tokens every time: eos cannot end a row early, on either side
    batch = [r.token_ids for r in gen.generate(SOURCES, **new)]
    alone = [gen.generate(s, **new).token_ids for s in SOURCES]
    recomputed = [r.token_ids for r in gen.generate(SOURCES, **new, use_cache=False)]
    theirs = _hf_generate(model, **new)
    assert batch == alone == recomputed == theirs
    assert len({tuple(t) for t in theirs}) > 1  # the sources lead to different outputs


def _hf_generate(model, **options) -> list[list[int]]:
    theirs = []
    for source in SOURCES:
        with torch.no_grad():
            out = model.generate(torch.tensor([source]), attention_mask=torch.ones(1, len(source), dtype=torch.long),
                                 do_sample=False, pad_token_id=model.config.pad_token_id, **options)
        theirs.append(out[0, 1:].tolist())  # generate's output starts with the decoder start token
    return theirs


def test_padded_batch_graph_outputs_equal_each_source_alone(seq2seq_any_cache):
    model, directory, manifest = seq2seq_any_cache
    contract = manifest.contract
    graphs = Sessions(directory, contract)
    ids, mask = right_pad(SOURCES, pad_id=model.config.pad_token_id)
    batch = graphs.prefill(_start(model, 3), graphs.encoder(ids, mask), mask)
    rows = []
    for b, source in enumerate(SOURCES):
        ids1, mask1 = right_pad([source], pad_id=model.config.pad_token_id)
        alone = graphs.prefill(_start(model, 1), graphs.encoder(ids1, mask1), mask1)
        rows.append(compare("row", 0, f"row {b} logits", batch[0][b: b + 1], alone[0], "float32"))
        width = len(source)  # cross K/V: the row's real source positions
        rows += [compare("row", 0, f"row {b} cross", c[b: b + 1, :, :width], a[..., :width, :], "float32")
                 for c, a in zip(batch[1 + 2 * contract.num_layers:], alone[1 + 2 * contract.num_layers:])]
    assert not failures(rows), format_table(rows)


def test_decode_never_recomputes_cross_attention_kv(seq2seq):
    """Cross K/V are decode inputs: its cost is independent of how often they are reused.

    The decode graph has no encoder_hidden_states input, every cross.* input goes straight into
    an Attention op, it returns no cross K/V, and it has exactly 2 weight MatMuls per layer fewer
    than prefill: the cross-attention key and value projections, which run once per source.
    """
    model, directory, manifest = seq2seq
    contract = manifest.contract
    decode = onnx.load(str(directory / "decode.onnx"), load_external_data=False)
    prefill = onnx.load(str(directory / "prefill.onnx"), load_external_data=False)
    assert "encoder_hidden_states" not in {i.name for i in decode.graph.input}
    assert not any(o.name.startswith("cross.") for o in decode.graph.output)
    readers = {n.op_type for n in decode.graph.node for i in n.input if i.startswith("cross.")}
    assert readers <= {"Attention", "Shape"} and "Attention" in readers

    def weight_matmuls(graph):
        weights = {t.name for t in graph.graph.initializer}
        return sum(1 for n in graph.graph.node if n.op_type in ("MatMul", "Gemm") and weights & set(n.input))

    assert weight_matmuls(prefill) - weight_matmuls(decode) == 2 * contract.num_layers


def test_seq2seq_manifest_inspect_and_cli(seq2seq_exports, capsys):
    model, directory, manifest = seq2seq_exports("t5")
    assert sorted(manifest.contract.graphs()) == ["decode", "encoder", "prefill"]
    assert manifest.special_tokens.decoder_start_token_id == model.config.decoder_start_token_id
    assert main(["inspect", str(directory)]) == 0
    shown = capsys.readouterr().out
    assert "encoder.onnx" in shown and "cross.0.key" in shown
    assert main(["generate", str(directory), "--prompt", "x", "--max-new-tokens", "4", "--json"]) == 1  # no tokenizer: ids only
    gen = Generator.load(directory)
    assert len(gen.generate([5, 6, 7], max_new_tokens=4).token_ids) <= 4
    with pytest.raises(KvgraphError, match="no chat turns"):
        gen.chat()


def test_seq2seq_bad_input(seq2seq_exports, tmp_path):
    model, directory, _ = seq2seq_exports("bart")  # max positions 64
    gen = Generator.load(directory)
    with pytest.raises(KvgraphError, match=r"the source \(70 tokens\) exceeds the encoder's max positions \(64\)"):
        gen.generate([5] * 70, max_new_tokens=4)
    with pytest.raises(KvgraphError, match="--task text-generation was asked for, but model type 'bart' is an encoder-decoder"):
        export_model(model, tmp_path / "a", task="text-generation")
    with pytest.raises(KvgraphError, match="--task text2text-generation was asked for, but model type 'llama' is a causal LM"):
        from tiny_models import tiny_model

        export_model(tiny_model("llama"), tmp_path / "b", task="text2text-generation")
    startless = tiny_seq2seq("bart")
    startless.config.decoder_start_token_id = None
    with pytest.raises(KvgraphError, match="no decoder_start_token_id"):
        export_model(startless, tmp_path / "c")
    with pytest.raises(KvgraphError, match="encoder-decoder: --all-logits is not available"):
        export_model(model, tmp_path / "d", all_logits=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    data = json.loads((directory / "kvgraph.json").read_text())
    assert data["contract"]["kind"] == "encoder-decoder" and data["contract"]["hidden_size"] == 64


@pytest.mark.parametrize("family", sorted(SEQ2SEQ_CONFIGS))
def test_static_self_attention_cache(family, seq2seq_exports):
    """--cache static: the decoder's self-attention K/V in (B, Hkv, N, D) buffers written in place."""
    model, directory, manifest = seq2seq_exports(family, "static")
    rows = manifest.validation["rows"]  # export checked prefill + decode steps against PyTorch (dynamic cache), or refused
    assert manifest.validation["passed"] and {r["graph"] for r in rows} == {"encoder", "prefill", "decode"}
    assert manifest.contract.max_length == SEQ2SEQ_STATIC_LENGTH == 32
    decode = onnx.load(str(directory / "decode.onnx"), load_external_data=False)
    producers = {out: n for n in decode.graph.node for out in n.output}
    for past, present in zip(manifest.contract.past_names(), manifest.contract.present_names()):
        assert producers[present].op_type == "TensorScatter" and producers[present].input[0] == past
    gen = Generator.load(directory)
    batch = [r.token_ids for r in gen.generate(SOURCES, max_new_tokens=12, min_new_tokens=12)]
    alone = [gen.generate(s, max_new_tokens=12, min_new_tokens=12).token_ids for s in SOURCES]
    assert batch == alone == _hf_generate(model, max_new_tokens=12, min_new_tokens=12)
    with pytest.raises(KvgraphError, match=r"max_new_tokens \(32\) \+ the start token exceeds the static cache's 32 positions"):
        gen.generate([5, 6], max_new_tokens=32)


def test_tied_embedding_is_stored_once_and_read_by_every_graph(seq2seq):
    """Encoder embedding, decoder embedding and lm_head: one (H, V) matrix in model.onnx.data, read by all three graphs.

    With a real vocabulary the embedding is most of the bytes: a second copy would be ~2x the parameters.
    t5-v1_1 unties its lm_head: two matrices, still each stored once.
    """
    model, directory, manifest = seq2seq
    index = json.loads((directory / "weights.json").read_text())
    vocab, hidden = manifest.contract.vocab_size, manifest.contract.hidden_size
    embeddings = [i for i, t in enumerate(index["tensors"]) if sorted(t["shape"]) == sorted([vocab, hidden])]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert len(embeddings) == (1 if tied else 2), index["tensors"]
    for graph in ("encoder", "prefill", "decode"):
        assert set(embeddings) & set(index["graphs"][graph].values()), f"{graph} reads no stored embedding"
    if tied:
        assert all(embeddings[0] in index["graphs"][graph].values() for graph in ("encoder", "prefill", "decode"))
    weights = Generator.load(directory).graphs.weights  # loading keeps one copy too: every session gets the same memory
    pointers = {graph: {weights.initializers(graph)[name].data_ptr() for name, slot in index["graphs"][graph].items() if slot in embeddings}
                for graph in ("encoder", "prefill", "decode")}
    assert len(set.union(*pointers.values())) == len(embeddings) and all(pointers.values())
    parameter_bytes = manifest.model.parameter_bytes  # BART-like final_logits_bias (zeros, a buffer) is dropped, not stored
    assert index["size"] <= parameter_bytes + 64 * len(index["tensors"]), (index["size"], parameter_bytes)  # on top: only alignment
