"""The onnxruntime Generator: equivalences (batch, recompute, stream, chat), stops, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from kvgraph.graphs import KvgraphError, Manifest, ManifestError
from kvgraph.runtime import Generator
from kvgraph.runtime.commands.main import main

PROMPTS = ["Once upon a time", "héllo wörld €", "a"]


@pytest.fixture(scope="module", params=["dynamic", "static"])
def gen(request, text_export, text_export_static):
    """The runtime tests run on a dynamic-cache and on a static-cache export of the same model."""
    return Generator.load((text_export if request.param == "dynamic" else text_export_static)[1])


def test_greedy_equals_transformers_generate(gen, text_export):
    model, _ = text_export
    result = gen.generate("The answer is", max_new_tokens=12)
    ids = gen.codec.encode("The answer is")
    config = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), generation_config=config)
    assert result.token_ids == theirs[0, len(ids):].tolist()
    assert result.stats.prompt_tokens == len(ids) and result.stats.new_tokens == len(result.token_ids)


def test_padded_batch_equals_one_by_one(gen):
    batch = gen.generate(PROMPTS, max_new_tokens=10)
    alone = [gen.generate(p, max_new_tokens=10) for p in PROMPTS]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.text for r in batch] == [r.text for r in alone]


def test_rows_stop_on_their_own_at_eos(gen):
    free = gen.generate(PROMPTS, max_new_tokens=10)
    eos = free[0].token_ids[-1]  # pretend a token row 0 produces is the eos id
    patched = Generator(gen.graphs, gen.codec)
    patched.eos_ids = frozenset({eos})
    rows = patched.generate(PROMPTS, max_new_tokens=10)
    for row, reference in zip(rows, free):
        if eos in reference.token_ids:
            assert row.token_ids == reference.token_ids[: reference.token_ids.index(eos) + 1]
            assert row.finish_reason == "eos"
        else:
            assert row.token_ids == reference.token_ids and row.finish_reason == "length"
    assert rows[0].finish_reason == "eos"


def test_min_new_tokens_keeps_eos_out_as_transformers_generate_does(gen, text_export):
    """min_new_tokens sets the eos logits to -inf until N new tokens (Hugging Face's MinNewTokensLengthLogitsProcessor)."""
    model, _ = text_export
    free = gen.generate(PROMPTS[0], max_new_tokens=12)
    eos = free.token_ids[2]  # make the third token the eos id: without min_new_tokens the row ends there
    patched = Generator(gen.graphs, gen.codec)
    patched.eos_ids = frozenset({eos})
    assert patched.generate(PROMPTS[0], max_new_tokens=12).finish_reason == "eos"
    result = patched.generate(PROMPTS[0], max_new_tokens=12, min_new_tokens=8)
    assert eos not in result.token_ids[:8] and len(result.token_ids) >= 8
    ids = gen.codec.encode(PROMPTS[0])
    config = GenerationConfig(do_sample=False, max_new_tokens=12, min_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), generation_config=config)
    assert result.token_ids == theirs[0, len(ids):].tolist()
    with pytest.raises(KvgraphError, match="min_new_tokens must be >= 0"):
        gen.generate(PROMPTS[0], max_new_tokens=4, min_new_tokens=-1)


def test_recompute_equals_cache(gen):
    cached = gen.generate(PROMPTS, max_new_tokens=10)
    recomputed = gen.generate(PROMPTS, max_new_tokens=10, use_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stream_equals_generate_and_never_splits_a_character(gen, seed):
    options = dict(max_new_tokens=24, temperature=1.5, seed=seed)  # random bytes: many partial UTF-8 sequences
    pieces = list(gen.stream("héllo", **options))
    assert "".join(pieces) == gen.generate("héllo", **options).text
    assert len(pieces) > 2
    assert not any(p.endswith("\ufffd") for p in pieces[:-1]), pieces


def test_seeded_sampling_is_reproducible(gen):
    a = gen.generate("x", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=5)
    b = gen.generate("x", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=5)
    c = gen.generate("x", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=6)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stop_string_cuts_text_before_it(gen):
    free = gen.generate("stop here", max_new_tokens=20)
    stop = free.text[5:8]
    assert len(stop) == 3
    cut = gen.generate("stop here", max_new_tokens=20, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    streamed = "".join(gen.stream("stop here", max_new_tokens=20, stop=[stop]))
    assert streamed == cut.text


def test_conversation_continuation_equals_one_shot(gen):
    conversation = gen.chat()
    first = conversation.send("hi there", max_new_tokens=6)
    second = conversation.send("and then?", max_new_tokens=6)
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": first.text},
                {"role": "user", "content": "and then?"}]
    full_ids = gen.codec.encode_chat(messages)
    one_shot = gen.generate(full_ids, max_new_tokens=6)
    assert second.token_ids == one_shot.token_ids
    assert conversation.processed_tokens[1] < len(full_ids) / 2  # the second turn reused the cache


def test_chat_template_renders_in_a_sandbox(gen):
    rendered = gen.codec.render_chat([{"role": "user", "content": "hi"}])
    assert rendered == "<s><|user|>hi</s><|assistant|>"
    evil = type(gen.codec).__new__(type(gen.codec))
    evil.__dict__.update(gen.codec.__dict__)
    evil.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(KvgraphError, match="chat template failed"):
        evil.render_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("prompt,kwargs,message", [
    ("", {}, "prompt is empty"),
    ([5, 999], {}, "token id 999 is outside the vocabulary"),
    ("x", {"max_new_tokens": 500}, r"exceeds the (model's max positions|static cache's 96 positions)"),
    ("x", {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ("x", {"temperature": -1.0}, "temperature"),
    ("x", {"top_p": 0.0}, "top_p"),
    ("x", {"top_k": -2}, "top_k"),
])
def test_bad_requests_are_refused(gen, prompt, kwargs, message):
    with pytest.raises(KvgraphError, match=message):
        gen.generate(prompt, **kwargs)


def test_unknown_and_unavailable_providers(text_export):
    with pytest.raises(KvgraphError, match="unknown provider 'tpu'"):
        Generator.load(text_export[1], provider="tpu")
    with pytest.raises(KvgraphError, match="provider 'cuda' is not available.*CPUExecutionProvider"):
        Generator.load(text_export[1], provider="cuda")


def _copy_export(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_graphs_that_do_not_match_the_manifest(text_export, tmp_path):
    directory = _copy_export(text_export[1], tmp_path / "copy")
    manifest = Manifest.load(directory)
    replace(manifest, contract=replace(manifest.contract, head_dim=32)).write(directory)
    with pytest.raises(KvgraphError, match=r"do not match kvgraph.json: (prefill|extend).onnx: present.0.key has shape \(batch, 2, sequence, 16\), expected \(batch, 2, sequence, 32\).*and \d+ more"):
        Generator.load(directory)


def test_newer_manifest_and_missing_manifest(text_export, tmp_path):
    directory = _copy_export(text_export[1], tmp_path / "copy")
    data = json.loads((directory / "kvgraph.json").read_text())
    data["format_version"] = "9.0"
    (directory / "kvgraph.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="newer than this kvgraph reads"):
        Generator.load(directory)
    with pytest.raises(ManifestError, match="no manifest here"):
        Generator.load(tmp_path)


def test_cli_json_and_plain_output(text_export, capsys):
    assert main(["generate", str(text_export[1]), "--prompt", "a", "--prompt", "bc", "--max-new-tokens", "5", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    objects = [json.loads(line) for line in lines]
    assert len(objects) == 2
    assert set(objects[0]["stats"]) >= {"prompt_tokens", "new_tokens", "prefill_ms", "decode_tokens_per_s"}
    assert len(objects[0]["token_ids"]) == objects[0]["stats"]["new_tokens"] <= 5
    assert main(["generate", str(text_export[1]), "--prompt", "a", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "prompt tokens" in captured.err and "tok/s" in captured.err


def test_cli_errors_are_one_line(text_export, tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "a"]) == 1
    assert main(["generate", str(text_export[1]), "--prompt", "a", "--top-p", "2"]) == 1
    err = capsys.readouterr().err
    assert "no manifest here" in err and "top_p must be in (0, 1]" in err and "Traceback" not in err


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'optimum'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from kvgraph.runtime import Generator
gen = Generator.load(sys.argv[1])
print(gen.generate('abc', max_new_tokens=4).token_ids)
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
"""


def test_runtime_works_with_torch_and_transformers_unimportable(gen, text_export):
    out = subprocess.run([sys.executable, "-c", BLOCKER, str(text_export[1])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == gen.generate("abc", max_new_tokens=4).token_ids



def test_one_session_serves_every_step_by_default(text_export, text_export_static):
    """Default weights policy: the one graph that can run prefill, decode and extend, loaded and prepacked once."""
    for directory, graph in ((text_export[1], "extend"), (text_export_static[1], "prefill")):
        gen = Generator.load(directory)
        assert list(gen.graphs.sessions) == [graph] and gen.graphs.weights is None
        conversation = gen.chat()
        first = conversation.send("hi", max_new_tokens=3)
        second = conversation.send("more", max_new_tokens=3)
        assert list(gen.graphs.sessions) == [graph]
        named = Generator.load(directory, weights="per-session").chat()  # prefill, decode and extend graphs by name
        assert [named.send("hi", max_new_tokens=3).token_ids, named.send("more", max_new_tokens=3).token_ids] == [
            first.token_ids, second.token_ids]


def test_extend_session_opens_only_when_a_conversation_continues(text_export):
    fresh = Generator.load(text_export[1], weights="mapped")
    assert sorted(fresh.graphs.sessions) == ["decode", "prefill"]
    fresh.generate("abc", max_new_tokens=3)
    conversation = fresh.chat()
    conversation.send("hi", max_new_tokens=3)
    assert "extend" not in fresh.graphs.sessions
    conversation.send("more", max_new_tokens=3)
    assert sorted(fresh.graphs.sessions) == ["decode", "extend", "prefill"]


def test_static_and_dynamic_exports_generate_the_same_tokens(text_export, text_export_static):
    dynamic, static = Generator.load(text_export[1]), Generator.load(text_export_static[1])
    assert static.graphs.contract.static and not dynamic.graphs.contract.static
    assert sorted(static.graphs.sessions) == ["prefill"]  # one session serves every step
    for prompts in (PROMPTS, PROMPTS[1]):
        a, b = dynamic.generate(prompts, max_new_tokens=20), static.generate(prompts, max_new_tokens=20)
        assert [r.token_ids for r in a] == [r.token_ids for r in b] if isinstance(a, list) else a.token_ids == b.token_ids


def test_static_cache_is_written_in_place(text_export_static):
    """The decode step's present buffers are the past buffers: same OrtValue, same memory, new rows written."""
    import numpy as np

    from kvgraph.runtime.core.steps import StaticCache, decode_one, prefill

    graphs = Generator.load(text_export_static[1]).graphs
    ids, mask = np.array([[1, 40, 41, 42]]), np.ones((1, 4), dtype=np.int64)
    logits, cache = prefill(graphs, ids, mask)
    assert isinstance(cache, StaticCache) and cache.length == 4
    values = list(cache.values)
    pointers = [v.data_ptr() for v in values]
    before = values[0].numpy()
    assert np.abs(before[:, :, :4]).max() > 0 and not before[:, :, 4:].any()  # prefill wrote positions 0-3 only
    for step in range(3):
        token = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        logits, same = decode_one(graphs, cache, token, mask)
        assert same is cache and cache.length == 5 + step
        assert [v.data_ptr() for v in cache.values] == pointers and all(a is b for a, b in zip(cache.values, values))
        after = values[0].numpy()
        assert np.abs(after[:, :, 4 + step]).max() > 0 and not after[:, :, 5 + step:].any()
        np.testing.assert_array_equal(after[:, :, :4], before[:, :, :4])  # earlier positions untouched


def test_static_request_longer_than_the_buffers_is_refused_before_running(text_export_static):
    gen = Generator.load(text_export_static[1])
    calls = []
    gen.graphs.session = lambda name: calls.append(name)  # any graph run would be recorded
    with pytest.raises(KvgraphError, match=r"\(4 tokens\) \+ max_new_tokens \(93\) = 97 exceeds the static cache's 96 positions"):
        gen.generate([1, 40, 41, 42], max_new_tokens=93)
    assert calls == []


def test_shared_weights_are_what_the_sessions_read(text_export, tmp_path):
    """With shared weights every session reads the memory kvgraph mapped, not the graphs' own file."""
    import numpy as np

    directory = _copy_export(text_export[1], tmp_path / "copy")
    index = json.loads((directory / "weights.json").read_text())
    data = np.fromfile(directory / "model.onnx.data", dtype=np.uint8)
    rng = np.random.default_rng(0)
    for entry in index["tensors"]:  # a second weights file with every float tensor perturbed
        if entry["dtype"] == "float32":  # (negating all would not do: the network is symmetric under it)
            view = data[entry["offset"]: entry["offset"] + entry["length"]].view(np.float32)
            view *= rng.uniform(0.0, 2.0, size=view.shape).astype(np.float32)
    data.tofile(directory / "perturbed.data")
    (directory / "weights.json").write_text(json.dumps({**index, "file": "perturbed.data"}))
    prompt = [1, 40, 41, 42, 43]
    original = Generator.load(text_export[1]).generate(prompt, max_new_tokens=8).token_ids
    assert Generator.load(directory, share_weights=False).generate(prompt, max_new_tokens=8).token_ids == original
    shared = Generator.load(directory, weights="mapped")
    assert shared.graphs.weights is not None
    assert shared.generate(prompt, max_new_tokens=8).token_ids != original


@pytest.mark.parametrize("mutate,message", [
    (lambda d, i: (d / "model.onnx.data").write_bytes((d / "model.onnx.data").read_bytes()[:-8]), "truncated or replaced"),
    (lambda d, i: (d / "weights.json").write_text(json.dumps({**i, "file": "../model.onnx.data"})), "plain name"),
    (lambda d, i: (d / "weights.json").write_text(json.dumps({**i, "tensors": [{"offset": 0}] + i["tensors"][1:]})), r"tensors\[0\] is malformed"),
    (lambda d, i: (d / "weights.json").write_text(json.dumps({**i, "tensors": [{**i["tensors"][0], "offset": i["size"]}] + i["tensors"][1:]})),
     r"tensors\[0\] .* does not fit"),
    (lambda d, i: (d / "weights.json").write_text("{not json"), "cannot read the weights index"),
    (lambda d, i: (d / "weights.json").write_text(json.dumps({**i, "format_version": "2.0"})), r"format_version '2.0' is newer than this kvgraph reads \(1.0\)"),
    (lambda d, i: (d / "weights.json").write_text(json.dumps({**i, "format": "other"})), "field format is 'other', expected 'kvgraph-weights'"),
])
def test_bad_weights_index_is_refused(text_export, tmp_path, mutate, message):
    directory = _copy_export(text_export[1], tmp_path / "copy")
    mutate(directory, json.loads((directory / "weights.json").read_text()))
    with pytest.raises(KvgraphError, match=message):
        Generator.load(directory)


def test_cuda_graph_needs_cuda_and_a_static_export(text_export, text_export_static):
    with pytest.raises(KvgraphError, match="cuda_graph needs provider 'cuda' and a static-cache export"):
        Generator.load(text_export_static[1], cuda_graph=True)  # provider cpu
    with pytest.raises(KvgraphError, match="cuda_graph needs provider 'cuda' and a static-cache export"):
        Generator.load(text_export[1], provider="cuda", cuda_graph=True)


@pytest.fixture(scope="module")
def draft_export(tmp_path_factory):
    """A second byte-level llama (another seed: other weights, the same tokenizer) to draft for the text model; its
    vocabulary is the byte one of text_model_dir (a ByT5-like byte model) because a draft must share the target's."""
    from tiny_models import CHAT_TEMPLATE, byte_tokenizer, tiny_model
    from kvgraph.export import export_model

    model_dir = tmp_path_factory.mktemp("hf") / "draft-llama"
    tiny_model("llama", seed=1, vocab_size=260).save_pretrained(model_dir)
    byte_tokenizer(CHAT_TEMPLATE).save_pretrained(model_dir)
    return export_model(model_dir, tmp_path_factory.mktemp("exports") / "draft-llama").directory


def test_a_draft_export_speeds_nothing_up_but_changes_nothing(gen, draft_export):
    """A draft model that is mostly wrong: drafts are rejected and rolled back, and the tokens stay those of plain decoding."""
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=20, min_new_tokens=20)
        drafted = gen.generate(prompt, max_new_tokens=20, min_new_tokens=20, speculative=str(draft_export), draft_tokens=3)
        assert drafted.token_ids == plain.token_ids and drafted.text == plain.text
        assert drafted.stats.drafted > drafted.stats.accepted  # rejections happened
    repeated = PROMPTS[0] * 3  # prompt lookup finds n-grams in it
    assert gen.generate(repeated, max_new_tokens=20, speculative="prompt-lookup").token_ids == gen.generate(repeated, max_new_tokens=20).token_ids
    stops = gen.generate(PROMPTS[0], max_new_tokens=20, stop=[plain.text[4:6]] if plain.text[4:6] else [], speculative="prompt-lookup")
    assert stops.text == gen.generate(PROMPTS[0], max_new_tokens=20, stop=[plain.text[4:6]] if plain.text[4:6] else []).text


@pytest.mark.parametrize("options,message", [
    ({"speculative": "prompt-lookup", "draft_tokens": 0}, "draft_tokens must be an integer between 1 and 64"),
    ({"speculative": "/nowhere"}, "speculative must be 'prompt-lookup' or a draft export's directory; /nowhere has no kvgraph.json"),
    ({"speculative": "prompt-lookup", "num_beams": 2}, "speculative decoding does not combine with num_beams > 1"),
    ({"speculative": 7}, "speculative must be 'prompt-lookup', a draft export's directory or a Generator, got int"),
])
def test_bad_speculative_options_are_refused(gen, options, message):
    with pytest.raises(KvgraphError, match=message):
        gen.generate("abc", max_new_tokens=4, **options)


def test_a_draft_with_another_tokenizer_is_refused(gen, draft_export, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(draft_export, other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + "\n")
    with pytest.raises(KvgraphError, match="its tokenizer.json differs from the target's"):
        gen.generate("abc", max_new_tokens=4, speculative=str(other))


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    from kvgraph.runtime.decoding.speculative import PromptLookup

    lookup = PromptLookup()
    assert lookup.propose([5, 6, 7, 8, 9, 1, 6, 7], 3) == [8, 9, 1]  # the bigram 6 7 occurred before: what came after it
    assert lookup.propose([4, 6, 7, 1, 2, 9, 6, 7, 3, 6, 7], 2) == [3, 6]  # the latest earlier occurrence wins
    assert lookup.propose([1, 2, 3, 4], 3) == []  # no repeated bigram: nothing drafted


def test_speculative_sampling_keeps_the_models_distribution(text_export, draft_export):
    """A two-sample chi-square test: the first two sampled tokens (top-k 5: 25 outcomes) with a mostly wrong draft model,
    and without speculation, over disjoint seeds. (With equal seeds the tokens are equal: tested above.)"""
    gen = Generator.load(text_export[1])  # one cache mode: the stepper is the same for both
    options = dict(max_new_tokens=2, min_new_tokens=2, temperature=1.0, top_k=5)
    drafted = [tuple(gen.generate("Once", **options, seed=s, speculative=str(draft_export), draft_tokens=2).token_ids) for s in range(300)]
    plain = [tuple(gen.generate("Once", **options, seed=10_000 + s).token_ids) for s in range(300)]
    outcomes = sorted(set(drafted) | set(plain))
    table = np.array([[drafted.count(o) for o in outcomes], [plain.count(o) for o in outcomes]], dtype=float)
    assert len(outcomes) >= 10  # the test has something to compare
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic, df = float(((table - expected) ** 2 / expected).sum()), len(outcomes) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3  # chi-square at p = 0.001 (Wilson-Hilferty)
    assert statistic < critical, f"chi-square {statistic:.1f} over {df} degrees of freedom (p < 0.001)"
