"""Quality side by side: kvgraph's quantized exports and llama.cpp's Q4_1 GGUF, each against the float export.

    python benchmarks/quality_peers.py --float models/smollm2-135m-instruct-onnx \\
        --quantized models/smollm2-int8 --quantized models/smollm2-int4 \\
        --llamacpp LLAMACPP_VENV/bin/python SmolLM2-135M-Instruct.Q4_1.gguf [--llamacpp-requantize q4_0,q4_k_m,q8_0]

--llamacpp-requantize has llama.cpp's own quantizer (`llama_model_quantize`, allow_requantize) requantize the GGUF
into each type, and scores those too: llama.cpp rounding the same weights as kvgraph rounds from the float export.

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


def _requantize_worker(source: str, target: str, kind: str) -> None:
    """In llama.cpp's venv: `source` requantized by llama.cpp into `target` as LLAMA_FTYPE_MOSTLY_<KIND>."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.allow_requantize = True
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    if status != 0:
        raise SystemExit(f"llama_model_quantize({source} -> {kind}) returned {status}")


def _llamacpp_row(python: str, gguf: Path, label: str, workload, reference, scratch: Path, quality) -> str:
    job = scratch / f"llamacpp-{gguf.stem}"
    job.mkdir()
    (job / "job.json").write_text(json.dumps({"windows": workload.windows, "prompts": workload.prompts,
                                              "window": workload.window, "new_tokens": workload.new_tokens}))
    subprocess.run([python, __file__, "--worker", str(gguf), str(job)], check=True)
    answers = quality.Answers(job, json.loads((job / "greedy.json").read_text()), workload.windows)
    return _row(label, quality.compare(workload, reference, answers), gguf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float", dest="reference", required=True, help="the float kvgraph export (the reference)")
    parser.add_argument("--quantized", action="append", default=[], help="a quantized kvgraph export of the same model (repeatable)")
    parser.add_argument("--llamacpp", nargs=2, metavar=("PYTHON", "GGUF"), help="llama-cpp-python venv python and the GGUF file")
    parser.add_argument("--llamacpp-requantize", default="", metavar="TYPES",
                        help="comma-separated llama.cpp types (q4_0, q4_k_m, q8_0, ...) to requantize the GGUF into and score")
    args = parser.parse_args(argv)
    if args.llamacpp_requantize and not args.llamacpp:
        parser.error("--llamacpp-requantize needs --llamacpp PYTHON GGUF")

    from kvgraph.runtime.tools import quality

    workload = quality.Workload.of(args.reference)
    scratch = tempfile.TemporaryDirectory(prefix="quality-peers-")
    reference = quality.reference_answers(args.reference, workload, Path(scratch.name) / "float", log=lambda m: print(m, file=sys.stderr))
    rows = []
    for i, directory in enumerate(args.quantized):
        answers = quality.answer(directory, workload, Path(scratch.name) / f"quantized{i}", sequences=reference.sequences)
        rows.append(_row(f"kvgraph {_scheme(directory)}", quality.compare(workload, reference, answers), directory))
    if args.llamacpp:
        python, gguf = args.llamacpp[0], Path(args.llamacpp[1])
        rows.append(_llamacpp_row(python, gguf, f"llama.cpp {gguf.name} (as published)", workload, reference, Path(scratch.name), quality))
        for kind in filter(None, args.llamacpp_requantize.split(",")):
            target = Path(scratch.name) / f"{gguf.stem}.requantized-{kind}.gguf"
            subprocess.run([python, __file__, "--requantize", str(gguf), str(target), kind], check=True)
            rows.append(_llamacpp_row(python, target, f"llama.cpp {kind.upper()} (requantized from {gguf.name})", workload, reference,
                                      Path(scratch.name), quality))
    text, window, prompts = workload.text, workload.window, workload.prompts
    print(f"quality against {Path(args.reference).name} (float32): {text}, {workload.tokens} next-token "
          f"predictions in windows of {window}; greedy: {len(prompts)} prompts x {workload.new_tokens} new tokens")
    print("| system | weights file | top-1 agreement | mean KL (nats) | perplexity (float -> it) | ratio | greedy identical | tokens before first difference |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    return 0


def _row(label, report, path) -> str:
    size = _size(Path(path))
    return (f"| {label} | {size / 1e6:.1f} MB | {100 * report.top1_agreement:.2f} % | {report.mean_kl:.5f} | "
            f"{report.perplexity_float:.3f} -> {report.perplexity_quantized:.3f} | {report.perplexity_ratio:.4f}x | "
            f"{report.greedy_identical}/{report.greedy_prompts} | {100 * report.greedy_common_prefix:.1f} % |")


def _scheme(directory: str) -> str:
    record = json.loads(Path(directory, "kvgraph.json").read_text()).get("quantization") or {}
    scheme = record.get("scheme", {})
    if not scheme:
        return "float"
    form = "float minimum" if scheme.get("float_min") else "symmetric" if scheme.get("symmetric") else "asymmetric"
    tensors = record.get("tensors", {})
    mixed = sum(1 for name in tensors.get("matmul", []) if tensors.get("bits", {}).get(name) == 8) if scheme.get("bits") == 4 else 0
    how = f"{scheme.get('rounding', 'nearest')}" + (f", {mixed} matrices int8" if mixed else "")
    return f"int{scheme.get('bits')} block {scheme.get('block_size')}, {form}, {how}"


def _size(path: Path) -> int:
    return (path / "model.onnx.data").stat().st_size if path.is_dir() else path.stat().st_size


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _llamacpp_worker(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--requantize":
        _requantize_worker(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(main())
