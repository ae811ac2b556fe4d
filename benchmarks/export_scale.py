"""Export at the sizes people run: random-init models of real checkpoints' exact shapes, exported in a fresh process
each, with wall time and peak RSS (whole run and per phase) against the weights and the interpreter's baseline.

    python benchmarks/export_scale.py --shape qwen2.5-0.5b [--shape llama-3.2-1b] [--work /tmp/scale] [--option=--cache=static]
    python benchmarks/export_scale.py --shape llama-3.2-1b --genai GENAI_VENV/bin/python --tokenizer TOKENIZER_DIR --rounds 3

--genai runs onnxruntime-genai's model builder (`-p fp32 -e cpu`, or --genai-precision) on the same directory,
alternating with kvgraph round by round, and prints each run and the medians. Its builder needs tokenizer files in the
model directory: --tokenizer copies them in (random-init shapes have none).

The shapes are the published configs (vocabulary, tying, head layout, rope scaling); the weights are random (no hub),
made once per shape with a fixed seed and saved as a Hugging Face directory under --work, which the export then
loads as a user's would. Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import re
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path

SHAPES = {  # the published config.json fields that set the shape
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000,
                         eos_token_id=128001, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000,
                         eos_token_id=128001, torch_dtype="float16",
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}
PHASE = re.compile(r"^(\w+) done in ([\d.]+) s, peak RSS ([\d.]+) (GB|MB)")


def make_model(shape: str, work: Path) -> Path:
    """The shape's random-init model saved once under `work` (seed 0), in the config's dtype."""
    directory = work / shape
    if (directory / "config.json").is_file():
        return directory
    script = f"""
import torch
from transformers import AutoConfig, AutoModelForCausalLM
fields = {SHAPES[shape]!r}
dtype = getattr(torch, fields.pop("torch_dtype", "float32"))
config = AutoConfig.for_model(**fields)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
model.save_pretrained({str(directory)!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    return directory


def baseline_rss() -> int:
    """Peak RSS of a process that only imports what an export imports (bytes)."""
    probe = "import resource, torch, transformers, onnx, onnxscript, onnxruntime, kvgraph.export.api; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    return int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()[-1])


def export(model_dir: Path, out: Path, options: list[str]) -> dict:
    """`kvgraph export` in a fresh process: wall time, whole-run peak RSS, the phases' lines."""
    kvgraph = str(Path(sys.executable).with_name("kvgraph"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([kvgraph, "export", str(model_dir), str(out), "--force", *options], capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # since the child's last peak reset (its last phase)
    phases = {m[1]: (float(m[2]), float(m[3]) * (1e9 if m[4] == "GB" else 1e6)) for m in map(PHASE.match, done.stderr.splitlines()) if m}
    error = done.stderr.strip().splitlines()[-1] if done.returncode else ""
    peaks = [rss for _, rss in phases.values()] + ([peak] if peak > before * 1024 else [])  # each phase resets the peak
    return {"ok": done.returncode == 0, "wall": wall, "peak": max(peaks, default=None), "phases": phases, "error": error}


def genai_build(python: str, model_dir: Path, out: Path, precision: str) -> dict:
    """onnxruntime-genai's model builder in a fresh process: wall time and its own peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryFile() as log:
        command = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out), "-p", precision, "-e", "cpu",
                   "-c", cache]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        tail = log.read().decode(errors="replace").strip().splitlines()[-1:]
    return {"ok": status == 0, "wall": wall, "peak": usage.ru_maxrss * 1024, "error": "" if status == 0 else " ".join(tail)}


def copy_tokenizer(source: Path, model_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, model_dir / name)


def alternate(model_dir: Path, work: Path, shape: str, options: list[str], genai: str, precision: str, rounds: int) -> None:
    """kvgraph and genai's builder, one after the other, `rounds` times; each run, then the medians and their ratio."""
    walls: dict[str, list[float]] = {"kvgraph": [], "genai": []}
    print("| round | exporter | result | wall s | peak RSS |")
    print("|---|---|---|---|---|")
    for round_ in range(1, rounds + 1):
        for name in ("genai", "kvgraph"):
            r = (genai_build(genai, model_dir, work / f"{shape}-genai", precision) if name == "genai"
                 else export(model_dir, work / f"{shape}-onnx", options))
            walls[name].append(r["wall"])
            print(f"| {round_} | {name} | {'ok' if r['ok'] else 'failed: ' + r['error'][:100]} | {r['wall']:.1f} | "
                  f"{(r['peak'] or 0) / 1e9:.1f} GB |", flush=True)
    ours, theirs = statistics.median(walls["kvgraph"]), statistics.median(walls["genai"])
    print(f"\nmedian wall: kvgraph {ours:.1f} s, genai {theirs:.1f} s: kvgraph takes {ours / theirs:.2f}x genai's time")


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvgraph-scale"))
    parser.add_argument("--option", action="append", default=[], help="an option for kvgraph export (repeatable), e.g. --option=--cache=static")
    parser.add_argument("--genai", metavar="PYTHON", help="an interpreter with onnxruntime-genai: alternate with its model builder")
    parser.add_argument("--genai-precision", default="fp32", choices=("fp32", "fp16", "int4"))
    parser.add_argument("--tokenizer", type=Path, help="a directory whose tokenizer files are copied into the model's (for --genai)")
    parser.add_argument("--rounds", type=int, default=3, help="with --genai: alternating rounds")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    options = [o for opt in args.option for o in opt.split("=", 1)]
    if args.genai:
        for shape in args.shape:
            model_dir = make_model(shape, args.work)
            if args.tokenizer:
                copy_tokenizer(args.tokenizer, model_dir)
            alternate(model_dir, args.work, shape, options, args.genai, args.genai_precision, args.rounds)
        return
    base = baseline_rss()
    print(f"interpreter baseline (imports only): {base / 1e9:.2f} GB")
    print("| shape | options | weights | result | wall s | peak RSS | (peak - baseline) / weights | phases: s, peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shape:
        model_dir = make_model(shape, args.work)
        weights = weights_bytes(model_dir)
        r = export(model_dir, args.work / f"{shape}-onnx", options)
        phases = ", ".join(f"{name} {s:.1f} s {rss / 1e9:.1f} GB" for name, (s, rss) in r["phases"].items())
        peak = f"{r['peak'] / 1e9:.1f} GB" if r["peak"] else "?"
        ratio = f"{(r['peak'] - base) / weights:.2f}×" if r["peak"] else "?"
        result = "ok" if r["ok"] else f"failed: {r['error'][:120]}"
        print(f"| {shape} | {' '.join(args.option) or '-'} | {weights / 1e9:.2f} GB | {result} | {r['wall']:.1f} | {peak} | {ratio} | {phases} |",
              flush=True)
        print(json.dumps({"shape": shape, "options": args.option, "weights": weights, "baseline": base, **r}), file=sys.stderr)


if __name__ == "__main__":
    main()
