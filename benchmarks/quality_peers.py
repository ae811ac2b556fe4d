"""Quality side by side: kvgraph's quantized exports and llama.cpp's Q4_1 GGUF, each against the float export.

    python benchmarks/quality_peers.py --float models/smollm2-135m-instruct-onnx \\
        --quantized models/smollm2-int8 --quantized models/smollm2-int4 \\
        --llamacpp LLAMACPP_VENV/bin/python SmolLM2-135M-Instruct.Q4_1.gguf

The same figures as the quality report written at quantization time (runtime/tools/quality.py), on the
same text, windows and prompts: next-token top-1 agreement and mean KL(float || other) over
quality_text.txt, the perplexity of both, and greedy agreement over 64 new tokens on 8 prompts.
kvgraph's rows are recomputed here (not read from the manifests), with onnxruntime's default kernels.
llama.cpp runs in its own virtualenv (llama-cpp-python), fed the same token ids, logits of every
position (logits_all), 2 threads.

Note on this checkpoint: the float model is itself the dequantized Q4_1 GGUF (the only copy of
SmolLM2 without a hub), so llama.cpp's Q4_1 re-expresses its weights exactly, while kvgraph's int4
(integer zero points, as DequantizeLinear defines them) rounds them onto another grid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _llamacpp_worker(gguf: str, job: str) -> None:
    """In llama.cpp's venv: logits of every window, greedy tokens of every prompt -> files in the job directory."""
    from llama_cpp import Llama

    spec = json.loads(Path(job, "job.json").read_text())
    llm = Llama(model_path=gguf, n_threads=2, n_ctx=spec["window"] + 8, logits_all=True, verbose=False)
    for i, window in enumerate(spec["windows"]):
        llm.reset()
        llm.eval(window)
        np.save(Path(job, f"window{i}.npy"), np.array(llm.scores[: len(window)], dtype=np.float32))
    greedy = []
    for prompt in spec["prompts"]:
        tokens = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == spec["new_tokens"]:
                break
        greedy.append(tokens)
    Path(job, "greedy.json").write_text(json.dumps(greedy))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float", dest="reference", required=True, help="the float kvgraph export (the reference)")
    parser.add_argument("--quantized", action="append", default=[], help="a quantized kvgraph export of the same model (repeatable)")
    parser.add_argument("--llamacpp", nargs=2, metavar=("PYTHON", "GGUF"), help="llama-cpp-python venv python and the GGUF file")
    args = parser.parse_args(argv)

    from kvgraph.runtime import quality
    from kvgraph.runtime.generator import Generator

    reference = Generator.load(args.reference)
    ids, text = quality._text_ids(reference)
    window = quality._window(reference)
    windows = [ids[start: start + window] for start in range(0, len(ids) - 1, window) if len(ids[start: start + window]) >= 2]
    prompts = quality._prompts(reference)
    scorer = quality._Scorer(Path(args.reference), None)
    float_logits = [scorer.logits(np.array([w], dtype=np.int64)) for w in windows]
    float_greedy = [reference.generate(p, max_new_tokens=quality.NEW_TOKENS, min_new_tokens=quality.NEW_TOKENS).token_ids for p in prompts]
    rows = []
    for directory in args.quantized:
        other = quality._Scorer(Path(directory), None)
        generator = Generator.load(directory)
        greedy = [generator.generate(p, max_new_tokens=quality.NEW_TOKENS, min_new_tokens=quality.NEW_TOKENS).token_ids for p in prompts]
        rows.append(_row(f"kvgraph {_scheme(directory)}", float_logits, [other.logits(np.array([w], dtype=np.int64)) for w in windows],
                         windows, float_greedy, greedy, directory))
    if args.llamacpp:
        python, gguf = args.llamacpp
        with tempfile.TemporaryDirectory() as job:
            Path(job, "job.json").write_text(json.dumps({"windows": windows, "prompts": prompts, "window": window,
                                                          "new_tokens": quality.NEW_TOKENS}))
            subprocess.run([python, __file__, "--worker", gguf, job], check=True)
            logits = [np.load(Path(job, f"window{i}.npy")) for i in range(len(windows))]
            greedy = json.loads(Path(job, "greedy.json").read_text())
        rows.append(_row("llama.cpp Q4_1 (llama-cpp-python)", float_logits, logits, windows, float_greedy, greedy, gguf))
    print(f"quality against {Path(args.reference).name} (float32): {text}, {sum(len(w) - 1 for w in windows)} next-token "
          f"predictions in windows of {window}; greedy: {len(prompts)} prompts x {quality.NEW_TOKENS} new tokens")
    print("| system | weights file | top-1 agreement | mean KL (nats) | perplexity (float -> it) | ratio | greedy identical | tokens before first difference |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    return 0


def _row(label, float_logits, logits, windows, float_greedy, greedy, path) -> str:
    from kvgraph.runtime import quality

    scores = quality._Scores()
    for a, b, w in zip(float_logits, logits, windows):
        scores.add(a, b, np.array(w))
    ppl = [float(np.exp(n / scores.count)) for n in scores.nll]
    same = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(float_greedy, greedy)]
    size = _size(Path(path))
    return (f"| {label} | {size / 1e6:.1f} MB | {100 * scores.top1 / scores.count:.2f} % | {scores.kl / scores.count:.5f} | "
            f"{ppl[0]:.3f} -> {ppl[1]:.3f} | {ppl[1] / ppl[0]:.4f}x | {sum(s == len(a) for s, a in zip(same, float_greedy))}/{len(same)} | "
            f"{100 * np.mean([s / len(a) for s, a in zip(same, float_greedy)]):.1f} % |")


def _scheme(directory: str) -> str:
    record = json.loads(Path(directory, "kvgraph.json").read_text()).get("quantization") or {}
    scheme = record.get("scheme", {})
    return f"int{scheme.get('bits')} block {scheme.get('block_size')}" if scheme else "float"


def _size(path: Path) -> int:
    return (path / "model.onnx.data").stat().st_size if path.is_dir() else path.stat().st_size


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _llamacpp_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
