"""Golden vectors, the manifest schema, and two more implementations of the contract.

Vectors come from onnxruntime; their greedy tokens are checked against PyTorch. Then the Node.js
driver (examples/node, onnxruntime-node) and onnx's ReferenceEvaluator must reproduce them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from kvgraph.graphs import KvgraphError, Manifest, ManifestError
from kvgraph.graphs.contract import GraphContract
from kvgraph.runtime.commands.main import main
from kvgraph.runtime.tools.step_trace import replay
from kvgraph.runtime.tools.golden_vectors import first_mismatch, read_vectors
from kvgraph.runtime.tools.golden_runs import check_vectors, make_vectors
from kvgraph.runtime.serving.page_server import PageHandler, PageServer

from browser import browser, page_url

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"
SCHEMA = json.loads((ROOT / "graphs" / "manifest.schema.json").read_text())

# (kind, family, cache mode): a decoder and an encoder-decoder, each with a dynamic and a static cache; a sliding
# window with soft-capping (the vectors' 10-15 token sequences cross gemma2's window of 8) and mixture-of-experts routing
EXPORTS = [("decoder", "llama", "dynamic"), ("decoder", "qwen3", "static"), ("seq2seq", "t5", "dynamic"), ("seq2seq", "marian", "static"),
           ("decoder", "gemma2", "static"), ("decoder", "mixtral", "dynamic")]


@pytest.fixture(scope="module")
def vectors(export_cache, seq2seq_exports, tmp_path_factory):
    """(kind, family, mode) -> (model, export directory, vectors directory), made on first use."""
    made = {}

    def get(key):
        if key not in made:
            kind, family, mode = key
            if kind == "decoder":
                exported = export_cache(family, mode)
                model, directory = exported.model, exported.directory
            else:
                model, directory, _ = seq2seq_exports(family, mode)
            out = tmp_path_factory.mktemp("vectors") / f"{family}-{mode}"
            made[key] = (model, directory, make_vectors(directory, out))
        return made[key]

    return get


@pytest.fixture(params=EXPORTS, ids=lambda k: f"{k[1]}-{k[2]}")
def case(request, vectors):
    return request.param, *vectors(request.param)


def torch_greedy(model, prompt: list[int], new_tokens: int, eos: set[int], seq2seq: bool) -> list[int]:
    """PyTorch generate on one unpadded prompt, cut after the first eos (the oracle)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=0, pad_token_id=model.config.pad_token_id or 0)
    tokens = out[0, 1:].tolist() if seq2seq else out[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[: ends[0] + 1] if ends else tokens


def torch_processed(model, trace, seq2seq: bool) -> list[list[int]]:
    """transformers' generate on the case's padded batch (the contract's padding: left for a decoder, right for a source)
    with the case's processor settings, each row cut after its first eos."""
    from transformers import GenerationConfig

    from kvgraph.graphs.conventions import left_pad, right_pad

    ids, mask = (right_pad if seq2seq else left_pad)(trace.prompts, trace.pad_id)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=trace.max_new_tokens, pad_token_id=trace.pad_id,
                              eos_token_id=trace.eos_token_ids, decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None), **trace.settings)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=config)
    rows = out[:, 1:] if seq2seq else out[:, ids.shape[1]:]
    cut = []
    for row in rows.tolist():
        ends = [i for i, t in enumerate(row) if t in trace.eos_token_ids]
        cut.append(row[: ends[0] + 1] if ends else row)
    return cut


def torch_argmax_after(model, prompt: list[int], draft: list[int]) -> list[int]:
    """PyTorch on one unpadded prompt + draft: the argmax after each drafted token (a verify call's oracle)."""
    ids = torch.tensor([prompt + draft])
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt):]
    return logits.argmax(-1).tolist()


def test_vectors_greedy_tokens_equal_pytorch_generate(case):
    (kind, _, _), model, directory, out = case
    golden = read_vectors(out)
    manifest = Manifest.load(directory)
    eos = set(manifest.special_tokens.eos_token_ids)
    assert ("verify" in golden.cases) == manifest.contract.verify == (kind == "decoder" and manifest.contract.ring_windows is None)
    for name, trace in golden.cases.items():
        if trace.draft is not None:
            assert trace.tokens == [torch_argmax_after(model, p, d) for p, d in zip(trace.prompts, trace.draft)]
            batch = golden.cases["batch"].tokens  # the draft is the batch's greedy tokens: the verify graph accepts it
            assert trace.draft == [row[:4] for row in batch] and all(t[:len(r[1:4])] == r[1:4] for t, r in zip(trace.tokens, batch))
            continue
        if trace.settings:  # the processors case: transformers' generate on the same padded batch with the same settings
            assert trace.tokens == torch_processed(model, trace, kind == "seq2seq"), name
            assert trace.tokens != golden.cases["batch"].tokens  # the settings changed the greedy tokens: the case tests them
            continue
        theirs = [torch_greedy(model, prompt, trace.max_new_tokens, eos, kind == "seq2seq") for prompt in trace.prompts]
        assert trace.tokens == theirs, name
    assert len(golden.cases["batch"].prompts) == 2 and len({len(p) for p in golden.cases["batch"].prompts}) == 2  # padded


def test_vectors_files_are_self_describing(case):
    (kind, _, mode), _, directory, out = case
    doc = json.loads((out / "vectors.json").read_text())
    contract = Manifest.load(directory).contract
    assert doc["format"] == "kvgraph-vectors" and doc["contract"]["cache"] == mode
    for entry in doc["cases"]:
        steps = entry["steps"]
        graphs = [s["graph"] for s in steps]
        later = ["verify"] if "draft" in entry else ["decode"] * (len(graphs) - 1 - (kind == "seq2seq"))
        assert graphs == (["encoder"] if kind == "seq2seq" else []) + ["prefill"] + later
        for step in steps:
            want_inputs = [spec.name for spec in contract.graphs()[step["graph"]][0]]
            assert [i["name"] for i in step["inputs"]] == want_inputs
            for item in step["inputs"] + step["outputs"]:
                array = np.load(out / item["file"])
                assert list(array.shape) == item["shape"] and str(array.dtype) == item["dtype"]
                if "values" in item:
                    assert array.tolist() == item["values"]
                if "top5" in item:
                    top = np.take_along_axis(array, np.array(item["top5"]["ids"]), -1)
                    assert np.array_equal(top, np.array(item["top5"]["values"], dtype=array.dtype))
                    assert (np.sort(array, -1)[..., -5:][..., ::-1] == top).all() and item["argmax"] == array.argmax(-1).tolist()
        tokens = entry["greedy_tokens"]
        if "draft" in entry:  # the verify case's tokens: the argmax after each drafted token
            assert tokens == steps[-1]["outputs"][0]["argmax"] and steps[-1]["inputs"][0]["values"] == entry["draft"]
            continue
        if "settings" in entry:  # the processors case: its tokens are the argmax of the processed scores
            assert set(entry["settings"]) <= {"repetition_penalty", "no_repeat_ngram_size", "suppress_tokens", "min_new_tokens", "bad_words_ids"}
            continue
        for b, row in enumerate(tokens):  # each greedy token is the argmax of the step before it
            assert row == [s["outputs"][0]["argmax"][b] for s in steps if s["graph"] != "encoder"][: len(row)]


def test_vectors_check_passes_and_names_the_first_mismatch(case, tmp_path, capsys):
    _, _, directory, out = case
    assert main(["vectors", str(directory), str(out), "--check"]) == 0
    assert "reproduces the vectors" in capsys.readouterr().out

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    doc = json.loads((bad / "vectors.json").read_text())
    step = [s for s in doc["cases"][1]["steps"] if s["graph"] == "decode"][1]  # the batch case's second decode step
    past = next(i for i in step["inputs"] if i["name"] == "past.1.value")
    array = np.load(bad / past["file"])
    array[0, 0, -1, 0] += 0.5
    np.save(bad / past["file"], array)
    with pytest.raises(KvgraphError, match=rf"case 'batch', step {step['index']} \(decode\): input past.1.value differs at \(0, 0, {array.shape[2] - 1}, 0\)"):
        check_vectors(directory, bad)

    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    doc["cases"][0]["greedy_tokens"][0][-1] += 1
    (bad / "vectors.json").write_text(json.dumps(doc))
    assert main(["vectors", str(directory), str(bad), "--check"]) == 1
    assert "case 'single', greedy tokens differ" in capsys.readouterr().err


def test_vectors_bad_input(vectors, export_cache, tmp_path, capsys):
    _, directory, out = vectors(EXPORTS[0])
    assert main(["vectors", str(tmp_path), str(tmp_path / "v")]) == 1  # not an export
    assert "no manifest here" in capsys.readouterr().err and not (tmp_path / "v").exists()
    assert main(["vectors", str(directory), str(out)]) == 1  # would overwrite
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    other = export_cache("qwen3", "static").directory
    with pytest.raises(KvgraphError, match=r"different export \(contract vocab_size 32000 vs 151936, cache 'dynamic' vs 'static', max_length None vs 48\)"):
        check_vectors(other, out)
    with pytest.raises(KvgraphError, match=r"no vectors.json here"):
        check_vectors(directory, tmp_path)
    (tmp_path / "vectors.json").write_text('{"format": "kvgraph-vectors", "format_version": "1.0", "cases": 3}')
    with pytest.raises(KvgraphError, match=r"vectors.json: malformed golden vectors"):
        check_vectors(directory, tmp_path)
    assert main(["vectors", str(directory), str(tmp_path / "w"), "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err and not (tmp_path / "w").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.json"]  # nothing half-written


# -- the ONNX reference evaluator: a third implementation of every op -----------------------------


def reference_runner(directory: Path):
    sessions = {}

    def run(graph: str, feeds: dict) -> dict:
        if graph not in sessions:
            sessions[graph] = ReferenceEvaluator(str(directory / f"{graph}.onnx"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # T5's relative buckets take log(0) for distance 0, then clip
            outputs = sessions[graph].run(None, feeds)
        return dict(zip(sessions[graph].output_names, outputs))

    return run


def test_reference_evaluator_reproduces_the_vectors(case):
    """Every step's inputs and outputs, not only the tokens, within the float32 tolerance."""
    _, _, directory, out = case
    golden = read_vectors(out)
    manifest = Manifest.load(directory)
    run = reference_runner(directory)
    traces = {name: replay(manifest, run, t) for name, t in golden.cases.items()}
    assert first_mismatch(golden, manifest.contract, traces) is None
    assert all(traces[name].tokens == t.tokens for name, t in golden.cases.items())


# -- onnxruntime-node -------------------------------------------------------------------------------


def node(*args: str) -> subprocess.CompletedProcess:
    assert shutil.which("node"), "Node.js is not installed: the contract's second runtime cannot be tested"
    assert (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir(), f"run `npm ci` in {NODE_DIR} (.ci/run does)"
    return subprocess.run(["node", str(NODE_DIR / "generate.js"), *args], capture_output=True, text=True, timeout=120)


def test_node_driver_reproduces_the_vectors(case):
    _, _, directory, out = case
    result = node(str(directory), str(out))
    assert result.returncode == 0, result.stderr
    golden = read_vectors(out)
    for name, trace in golden.cases.items():
        assert f"case '{name}': {len(trace.steps)} graph calls match, greedy tokens {json.dumps(trace.tokens, separators=(',', ':'))}" in result.stdout


def test_node_and_browser_reproduce_a_float16_export(tmp_path, page_server):
    """float16 logits and buffers travel as raw half bits in JavaScript; the vectors' tolerance is float16's."""
    from tiny_models import tiny_model
    from kvgraph.export import export_model

    export_model(tiny_model("llama"), tmp_path / "fp16", dtype="float16", cache="static", max_length=32)
    out = make_vectors(tmp_path / "fp16", tmp_path / "vectors")
    assert json.loads((out / "vectors.json").read_text())["tolerance"] == {"atol": 2e-2, "rtol": 2e-2}
    assert np.load(next((out / "tensors" / "batch").glob("01-decode")) / "out.logits.npy").dtype == np.float16
    result = node(str(tmp_path / "fp16"), str(out))
    assert result.returncode == 0, result.stderr
    golden = read_vectors(out)
    for name, trace in golden.cases.items():
        assert f"case '{name}': {len(trace.steps)} graph calls match, greedy tokens {json.dumps(trace.tokens, separators=(',', ':'))}" in result.stdout
    check_vectors(tmp_path / "fp16", out)
    page_server.mount("/x/fp16/", tmp_path / "fp16")
    page_server.mount("/v/fp16/", out)
    [shown] = browser(page_url(page_server, export="/x/fp16/", vectors="/v/fp16/"))
    assert shown["state"] == "done", shown["text"]
    assert shown["text"].splitlines() == [line for line in result.stdout.splitlines() if line.startswith("case ")]  # what Node printed


@pytest.mark.parametrize("key", EXPORTS[:2], ids=lambda k: f"{k[1]}-{k[2]}")
def test_node_driver_runs_one_graph_samples_with_a_seed_and_streams(vectors, key):
    """--ids runs every step on one graph (dynamic: extend after an empty past; static: prefill at write_indices):
    greedy, it gives the vectors' tokens; sampled, a seed gives the same tokens, streamed in order as chosen."""
    _, directory, out = vectors(key)
    single = read_vectors(out).cases["single"]
    ids = ",".join(map(str, single.prompts[0]))
    greedy = node(str(directory), "--ids", ids, "--max-new-tokens", str(single.max_new_tokens))
    assert greedy.returncode == 0, greedy.stderr
    assert json.loads(greedy.stdout) == single.tokens[0]
    options = ["--ids", ids, "--max-new-tokens", "12", "--temperature", "1.5", "--top-p", "0.95"]
    runs = [node(str(directory), *options, "--seed", seed, "--stream").stdout.split() for seed in ("7", "7", "8")]
    streamed, final = runs[0][:-1], json.loads(runs[0][-1])
    assert [int(t) for t in streamed] == final and len(final) == 12 and runs[1] == runs[0] and runs[2] != runs[0]
    assert final[: len(single.tokens[0])] != single.tokens[0]  # sampled at temperature 1.5, not the greedy tokens


def test_node_driver_names_the_first_mismatch(vectors, tmp_path):
    _, directory, out = vectors(EXPORTS[1])  # static: write_indices and the (B, N) mask are int inputs Node must match
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    doc = json.loads((out / "vectors.json").read_text())
    doc["cases"][1]["steps"][3]["inputs"][3]["values"][1] += 1  # the batch case's 4th call: write_indices of row 1
    (bad / "vectors.json").write_text(json.dumps(doc))
    result = node(str(directory), str(bad))
    assert result.returncode == 1
    assert "case 'batch', step 3 (decode): input write_indices differs at flat index 1" in result.stderr

    doc = json.loads((out / "vectors.json").read_text())
    logits = doc["cases"][0]["steps"][2]["outputs"][0]
    logits["top5"]["values"][0][0] += 0.01
    (bad / "vectors.json").write_text(json.dumps(doc))
    result = node(str(directory), str(bad))
    assert result.returncode == 1
    assert f"case 'single', step 2 (decode): output logits[0, {logits['top5']['ids'][0][0]}] is" in result.stderr


def test_node_driver_refuses_a_newer_manifest_and_a_non_export(vectors, tmp_path):
    _, directory, out = vectors(EXPORTS[0])
    newer = tmp_path / "newer"
    shutil.copytree(directory, newer)
    data = json.loads((newer / "kvgraph.json").read_text())
    data["format_version"] = "2.0"
    (newer / "kvgraph.json").write_text(json.dumps(data))
    result = node(str(newer), str(out))
    assert result.returncode == 2 and "format_version 2.0 is newer than this driver reads (1.x)" in result.stderr
    result = node(str(tmp_path), str(out))
    assert result.returncode == 2 and "no manifest here" in result.stderr


def js_draws(logits: np.ndarray, temperature: float, top_p: float, seed: int, draws: int) -> np.ndarray:
    doc = {"logits": logits.tolist(), "temperature": temperature, "topP": top_p, "seed": seed, "draws": draws}
    result = subprocess.run(["node", str(ROOT / "tests" / "js" / "draw.mjs")], input=json.dumps(doc), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return np.array(json.loads(result.stdout))


def test_js_sampler_draws_from_the_python_samplers_distribution():
    """The JavaScript driver's temperature + top-p draws (seeded) follow the probabilities kvgraph's Python sampler
    computes from the same logits: never a token top-p removes, and a chi-square test on the rest."""
    from kvgraph.runtime.core.sampling import Sampling, processed_logits, softmax

    logits = np.random.default_rng(0).normal(size=64).astype(np.float32) * 2.5
    probs = softmax(processed_logits(logits[None], [], Sampling(temperature=0.7, top_p=0.9)))[0]
    counts = js_draws(logits, 0.7, 0.9, seed=11, draws=20000)
    kept = probs > 0
    assert counts[~kept].sum() == 0 and 2 < kept.sum() < 64  # top-p removed some tokens, and left a choice
    expected = probs[kept] * counts.sum()
    statistic, df = float(((counts[kept] - expected) ** 2 / expected).sum()), int(kept.sum()) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3  # chi-square at p = 0.001 (Wilson-Hilferty)
    assert statistic < critical, f"chi-square {statistic:.1f} over {df} degrees of freedom"
    assert np.array_equal(js_draws(logits, 0.7, 0.9, seed=11, draws=200), js_draws(logits, 0.7, 0.9, seed=11, draws=200))  # seeded
    assert js_draws(logits, 0, 1, seed=5, draws=50)[int(np.argmax(logits))] == 50  # temperature 0: the argmax


# -- the web page in headless Chromium (onnxruntime-web, WebAssembly) -------------------------------------

BROWSER_EXPORTS = [EXPORTS[0], EXPORTS[1], EXPORTS[3]]  # a dynamic and a static decoder, a static encoder-decoder (Marian)


@pytest.fixture(scope="module")
def page_server():
    server = PageServer({}).start()
    yield server
    server.close()


def mounted(page_server, vectors, key) -> tuple[str, str]:
    _, directory, out = vectors(key)
    name = f"{key[1]}-{key[2]}"
    page_server.mount(f"/x/{name}/", directory)
    page_server.mount(f"/v/{name}/", out)
    return f"/x/{name}/", f"/v/{name}/"


def test_browser_reproduces_the_vectors(vectors, page_server):
    urls = [page_url(page_server, export=x, vectors=v) for x, v in (mounted(page_server, vectors, key) for key in BROWSER_EXPORTS)]
    for key, shown in zip(BROWSER_EXPORTS, browser(*urls), strict=True):
        assert shown["state"] == "done", shown["text"]
        assert shown["backend"].startswith("WebAssembly") and shown["crossOriginIsolated"]  # threads allowed
        golden = read_vectors(vectors(key)[2])
        assert len(shown["text"].splitlines()) == len(golden.cases) == 4 - (key[0] == "seq2seq")  # single, batch, processors (+ verify)
        for name, trace in golden.cases.items():
            assert f"case '{name}': {len(trace.steps)} graph calls match, greedy tokens {json.dumps(trace.tokens, separators=(',', ':'))}" in shown["text"]


def test_kvgraph_web_serves_the_page_to_a_browser_and_refuses_bad_input(vectors, tmp_path, capsys):
    _, directory, out = vectors(EXPORTS[0])
    assert main(["web", str(tmp_path)]) == 1 and "no kvgraph.json here" in capsys.readouterr().err
    assert main(["web", str(directory), "--vectors", str(tmp_path)]) == 1 and "no vectors.json here" in capsys.readouterr().err
    assert main(["web", str(directory), "--page", str(tmp_path)]) == 1 and "the web page is not here" in capsys.readouterr().err
    server = subprocess.Popen([sys.executable, "-m", "kvgraph.runtime.commands.main", "web", str(directory), "--vectors", str(out), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("open http://127.0.0.1:"), line + server.stderr.read()
        [shown] = browser(line.split()[1])
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0 and "stopped" in server.stderr.read()
    assert shown["state"] == "done" and "case 'verify': 2 graph calls match" in shown["text"], shown["text"]


def test_page_server_serves_only_its_mounts_with_the_isolation_headers(vectors):
    """What lets the page use WebAssembly threads (COOP/COEP) and load modules (MIME types); nothing outside a mount."""
    import http.client

    _, directory, _ = vectors(EXPORTS[0])
    server = PageServer({"/export/": directory}).start()
    try:
        def get(path: str):
            connection = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=10)
            connection.request("GET", path)  # sent as written: no client-side normalisation of ".."
            response = connection.getresponse()
            return response.status, response.headers, response.read()  # headers: case-insensitive

        status, headers, body = get("/export/kvgraph.json")
        assert status == 200 and json.loads(body)["format"] == "kvgraph" and headers["Content-Type"] == "application/json"
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin" and headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert get("/web/")[0] == 200 and get("/js/kvgraph.js")[1]["Content-Type"] == "text/javascript"
        wasm = next((ROOT / "examples" / "web" / "node_modules" / "onnxruntime-web" / "dist").glob("*.wasm")).name
        assert get(f"/web/node_modules/onnxruntime-web/dist/{wasm}")[1]["Content-Type"] == "application/wasm"
        for path in ("/export/../../README.md", "/export/%2e%2e/%2e%2e/README.md", "/export/", "/README.md", "/tests/browser.py"):
            assert get(path)[0] == 404, path
    finally:
        server.close()


class _CutDownload(PageHandler):
    """Sends the weights file's full Content-Length, then half of it, then hangs up: a network error mid-download."""

    def copyfile(self, source, outputfile) -> None:
        if Path(source.name).name == "model.onnx.data":
            size = os.fstat(source.fileno()).st_size
            outputfile.write(source.read(size // 2))
            outputfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        super().copyfile(source, outputfile)


def test_browser_shows_bad_input_as_one_line_in_the_page(vectors, page_server, tmp_path):
    export, good = mounted(page_server, vectors, EXPORTS[1])
    directory = vectors(EXPORTS[1])[1]
    (tmp_path / "empty").mkdir()
    newer = tmp_path / "newer"
    newer.mkdir()
    data = json.loads((directory / "kvgraph.json").read_text())
    (newer / "kvgraph.json").write_text(json.dumps({**data, "format_version": "2.0"}))
    unweighted = tmp_path / "unweighted"
    shutil.copytree(directory, unweighted, ignore=shutil.ignore_patterns("model.onnx.data"))
    bad = tmp_path / "bad-vectors"
    shutil.copytree(vectors(EXPORTS[1])[2], bad)
    doc = json.loads((bad / "vectors.json").read_text())
    doc["cases"][1]["steps"][3]["inputs"][3]["values"][1] += 1  # the batch case's 4th call: write_indices of row 1
    (bad / "vectors.json").write_text(json.dumps(doc))
    for name in ("empty", "newer", "unweighted", "bad-vectors"):
        page_server.mount(f"/bad/{name}/", tmp_path / name)
    shown = browser(page_url(page_server, export="/bad/empty/"), page_url(page_server, export="/bad/newer/"),
                    page_url(page_server, export="/bad/unweighted/", vectors=good), page_url(page_server, export=export, vectors="/bad/bad-vectors/"),
                    page_url(page_server, export=export, prompt="hi", temperature="-1"))
    assert [s["state"] for s in shown] == ["error"] * 5 and all(len(s["text"].splitlines()) == 1 for s in shown)
    assert shown[4]["text"] == "error: temperature=-1: out of range"
    assert "/bad/empty/kvgraph.json: HTTP 404: the manifest is not there; is" in shown[0]["text"] and "a kvgraph export directory?" in shown[0]["text"]
    assert "format_version 2.0 is newer than this driver reads (1.x)" in shown[1]["text"]
    assert "/bad/unweighted/model.onnx.data: HTTP 404: the weights file is not there" in shown[2]["text"]
    assert "case 'batch', step 3 (decode): input write_indices differs at flat index 1" in shown[3]["text"]

    cut = PageServer({"/export/": directory, "/v/": vectors(EXPORTS[1])[2]}).start()
    cut.httpd.RequestHandlerClass = functools.partial(_CutDownload, mounts=cut.mounts)
    try:
        first, again = browser(page_url(cut, export="/export/", vectors="/v/"), reload=True)
    finally:
        cut.close()
    size = (directory / "model.onnx.data").stat().st_size
    for attempt in (first, again):  # the reload downloads again: nothing partial was kept in the cache
        assert attempt["state"] == "error" and "/export/model.onnx.data: the download failed after" in attempt["text"], attempt["text"]
        assert f"of {size / 1e6:.1f} MB" in attempt["text"] and "reload to try again" in attempt["text"]


# -- the manifest schema ----------------------------------------------------------------------------


def schema_errors(data) -> list[str]:
    return [error.message for error in jsonschema.Draft202012Validator(SCHEMA).iter_errors(data)]


def test_every_export_manifest_matches_the_schema(case):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    _, _, directory, _ = case
    assert schema_errors(json.loads((directory / "kvgraph.json").read_text())) == []


MUTATIONS = {
    "no contract.num_layers": lambda d: d["contract"].pop("num_layers"),
    "num_layers 0": lambda d: d["contract"].update(num_layers=0),
    "num_kv_heads a string": lambda d: d["contract"].update(num_kv_heads="2"),
    "unknown cache mode": lambda d: d["contract"].update(cache="paged"),
    "static without max_length": lambda d: d["contract"].update(cache="static", max_length=None),
    "dynamic with max_length": lambda d: d["contract"].update(max_length=64),
    "decoder with hidden_size": lambda d: d["contract"].update(hidden_size=64),
    "unknown dtype": lambda d: d["contract"].update(dtype="bfloat16"),
    "eos ids not a list": lambda d: d["special_tokens"].update(eos_token_ids=2),
    "format_version not MAJOR.MINOR": lambda d: d.update(format_version="one"),
    "no graphs": lambda d: d.pop("graphs"),
    "opset a float": lambda d: d.update(opset=23.5),
    "unknown contract field": lambda d: d["contract"].update(sliding_window=64),
    "verify not a boolean": lambda d: d["contract"].update(verify="yes"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_schema_and_reader_refuse_the_same_bad_manifests(vectors, mutation):
    _, directory, _ = vectors(EXPORTS[0])
    data = json.loads((directory / "kvgraph.json").read_text())
    MUTATIONS[mutation](data)
    assert schema_errors(data), f"the schema accepts a manifest with {mutation}"
    with pytest.raises(ManifestError):
        Manifest.from_json(data)


# -- the written contract ---------------------------------------------------------------------------


def test_the_contract_document_names_every_tensor_and_field():
    text = (ROOT / "graphs" / "README.md").read_text()
    contracts = [GraphContract(2, 2, 16, 128, verify=True), GraphContract(2, 2, 16, 128, cache="static", max_length=32, verify=True),
                 GraphContract(2, 2, 16, 128, kind="encoder-decoder", hidden_size=64),
                 GraphContract(2, 2, 16, 128, cache="static", max_length=32, kind="encoder-decoder", hidden_size=64)]
    for contract in contracts:
        for graph, (inputs, outputs) in contract.graphs().items():
            assert f"{graph}.onnx" in text
            for spec in inputs + outputs:
                generic = spec.name.replace(".0.", ".{i}.").replace(".1.", ".{i}.")
                assert f"`{generic}`" in text or f"`{spec.name}`" in text, f"graphs/README.md does not document {spec.name}"
    for field in [*SCHEMA["properties"], *SCHEMA["properties"]["contract"]["properties"], *SCHEMA["properties"]["special_tokens"]["properties"]]:
        assert f"`{field}`" in text, f"graphs/README.md does not describe manifest field {field}"
