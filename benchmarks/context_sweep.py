"""Decode step latency versus context length: static cache, dynamic cache, and recompute (no cache).

    python benchmarks/context_sweep.py --dynamic DYNAMIC_EXPORT --static STATIC_EXPORT \\
        [--contexts 32 64 128 256 512 1024] [--steps 8] [--rounds 3] [--out benchmarks/results/context_sweep]

For each context length C, a prompt of C tokens is prefilled, then `--steps` decode steps are
timed one by one; recompute times one prefill over the C + 1 tokens, which is what a step costs
without a cache. "static, copied" runs the static graph with the present buffers bound apart from
the past ones (ping-pong), so onnxruntime's TensorScatter must copy each whole buffer before
writing: the gap to "static" is what the in-place update saves. The modes alternate within each round; the plot and the table use the median
step of all rounds. Writes OUT.png (matplotlib) and OUT.md (the table drawn).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import onnxruntime as ort

from kvgraph.runtime import Generator
from kvgraph.runtime.core.steps import decode_one, prefill

MODES = ("static", "static-copy", "dynamic", "recompute")


def step_times(gen: Generator, mode: str, context: int, steps: int) -> list[float]:
    rng = np.random.default_rng(context)
    ids = rng.integers(3, gen.graphs.contract.vocab_size, size=(1, context)).astype(np.int64)
    mask = np.ones_like(ids)
    if mode == "recompute":
        times = []
        for _ in range(steps):
            grown = np.concatenate([ids, ids[:, -1:]], axis=1)
            start = time.perf_counter()
            prefill(gen.graphs, grown, np.ones_like(grown))
            times.append(time.perf_counter() - start)
        return times
    logits, cache = prefill(gen.graphs, ids, mask)
    if mode == "static-copy":
        return _copied_steps(gen, cache, logits, mask, steps)
    times = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        start = time.perf_counter()
        logits, cache = decode_one(gen.graphs, cache, token, mask)
        times.append(time.perf_counter() - start)
    return times


def _copied_steps(gen: Generator, cache, logits, mask, steps: int) -> list[float]:
    """Static decode with past and present in different buffers: TensorScatter copies, then writes."""
    contract, session = gen.graphs.contract, gen.graphs.session("decode")
    past = list(cache.values)
    present = [ort.OrtValue.ortvalue_from_numpy(np.zeros(v.shape(), dtype=contract.dtype)) for v in past]
    times = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        host = gen.graphs.steps.host_feeds("decode", token, mask, mask.shape[1] - 1)  # ids, mask (1, N), positions, write index
        start = time.perf_counter()
        binding = session.io_binding()
        for name, array in host.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits", "cpu")
        for name, value in zip(contract.past_names(), past):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(contract.present_names(), present):
            binding.bind_ortvalue_output(name, value)
        session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        times.append(time.perf_counter() - start)
        past, present = present, past
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dynamic", required=True, help="a dynamic-cache export (also used for recompute)")
    parser.add_argument("--static", required=True, help="a static-cache export of the same model, --max-length > the largest context")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/context_sweep")
    args = parser.parse_args(argv)

    generators = {"dynamic": Generator.load(args.dynamic), "static": Generator.load(args.static)}
    generators["recompute"] = generators["dynamic"]
    generators["static-copy"] = generators["static"]
    limit = generators["static"].graphs.contract.max_length
    if max(args.contexts) + args.steps > limit:
        raise SystemExit(f"the static export holds {limit} positions; the sweep needs {max(args.contexts) + args.steps}")
    for mode in MODES:  # warm-up at the largest context: allocations and kernels' first runs
        step_times(generators[mode], mode, max(args.contexts), 2)
    samples = {(mode, c): [] for mode in MODES for c in args.contexts}
    for round_ in range(args.rounds):
        for context in args.contexts:
            for mode in MODES:
                samples[mode, context] += step_times(generators[mode], mode, context, args.steps)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    medians = {key: 1e3 * statistics.median(values) for key, values in samples.items()}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = format_table(medians, args.contexts, limit)
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    plot(medians, args.contexts, limit, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


def format_table(medians: dict, contexts: list[int], limit: int) -> str:
    lines = [f"| context | static (N = {limit}) ms | static, copied ms | dynamic ms | recompute ms | recompute / dynamic |",
             "|---|---|---|---|---|---|"]
    for c in contexts:
        s, copied, d, r = (medians[m, c] for m in MODES)
        lines.append(f"| {c} | {s:.2f} | {copied:.2f} | {d:.2f} | {r:.2f} | {r / d:.1f}× |")
    first, last = contexts[0], contexts[-1]
    lines.append("")
    lines.append(f"step at context {last} / step at context {first}: static {medians['static', last] / medians['static', first]:.2f}×, "
                 f"dynamic {medians['dynamic', last] / medians['dynamic', first]:.2f}×, "
                 f"recompute {medians['recompute', last] / medians['recompute', first]:.2f}×")
    return "\n".join(lines)


def plot(medians: dict, contexts: list[int], limit: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    labels = {"static": f"static cache (buffers of {limit}, in place)", "static-copy": "static cache, buffers copied (not in place)",
              "dynamic": "dynamic cache", "recompute": "no cache (recompute)"}
    for mode, marker in zip(MODES, "oxs^"):
        axis.plot(contexts, [medians[mode, c] for c in contexts], marker=marker, label=labels[mode])
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(contexts, [str(c) for c in contexts])
    axis.set_xlabel("context length (tokens already processed)")
    axis.set_ylabel("time to produce the next token (ms, median)")
    axis.set_title("Decode step latency vs context: why caching wins")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
