"""The measurements behind `kvgraph bench`: every measurement in a fresh worker process (this module, run with -m),
configurations alternating round by round, medians over the rounds (the columns are described in
runtime/commands/bench.py)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kvgraph.graphs import KvgraphError, Manifest
from kvgraph.graphs.modes import step_adapter

PROMPT_TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
               "had taught him, and at the top he lit the great lamp that guided the fishing boats home through the fog.")


def configurations(directories: list[str], prompt_tokens: int, new_tokens: int, recompute: bool = True, structured: bool = False,
                   compare_sharing: bool = False) -> list[tuple[str, str]]:
    """(directory, mode) pairs to measure; an export whose static cache cannot hold the run is refused, named."""
    configs: list[tuple[str, str]] = []
    for directory in directories:
        contract = Manifest.load(directory).contract  # fails early, naming the directory
        capacity = step_adapter(contract).cache.capacity(contract)
        if capacity and prompt_tokens + new_tokens > capacity:
            raise KvgraphError(f"{directory}: --prompt-tokens + --new-tokens = {prompt_tokens + new_tokens} exceeds "
                               f"its static cache of {capacity} positions")
        modes = [contract.cache] + (["no-cache"] if recompute else [])
        configs += [(directory, mode) for mode in modes]
        if structured:
            configs.append((directory, "json-schema"))
        if compare_sharing:
            configs += [(directory, f"{mode}, {policy}") for mode in modes for policy in _COMPARED if _allows(directory, policy)]
    return configs


def measure_rounds(configs: list[tuple[str, str]], rounds: int, prompt_tokens: int, new_tokens: int, threads: int | None,
                   log=lambda line: None) -> list[dict]:
    """Each configuration once a round, alternating, each run in its own worker; one summary row per configuration."""
    samples: dict[tuple[str, str], list[dict]] = {config: [] for config in configs}
    for round_ in range(rounds):
        for directory, mode in configs:
            log(f"round {round_ + 1}/{rounds}: {mode} {directory}")
            samples[directory, mode].append(_spawn(directory, mode, prompt_tokens, new_tokens, threads))
    return [summarize(directory, mode, runs) for (directory, mode), runs in samples.items()]


_COMPARED = {"mapped": "mapped", "unshared": "per-session"}  # mode suffix -> weights policy (no suffix: "auto")


def _allows(directory: str, policy: str) -> bool:
    return policy != "mapped" or Manifest.load(directory).quantization is None  # integer weights cannot be mapped


def _spawn(directory: str, mode: str, prompt_tokens: int, new_tokens: int, threads: int | None) -> dict:
    command = [sys.executable, "-m", "kvgraph.runtime.tools.benchmark", directory, mode, str(prompt_tokens), str(new_tokens),
               str(threads or 0)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise KvgraphError(f"benchmark worker for {directory} ({mode}) failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(directory: str, mode: str, runs: list[dict]) -> dict:
    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    keys = ("prefill_ms", "decode_tok_s", "step_p50_ms", "step_p90_ms", "overhead", "peak_rss_mb", "rss_over_weights", "load_rss_mb",
            "baseline_rss_mb", "added_rss_over_weights", "mask_ms")
    return {"directory": directory, "mode": mode, "rounds": len(runs), **{key: median(key) for key in keys},
            "weights_mb": runs[0]["weights_mb"], "tokens": runs[0]["tokens"]}


def format_table(rows: list[dict]) -> str:
    header = ("export", "mode", "prefill ms", "decode tok/s", "step p50 ms", "step p90 ms", "overhead", "peak RSS MB", "RSS/weights",
              "(RSS-base)/weights", "mask ms/token")
    lines = [header]
    for r in rows:
        mask = f"{r['mask_ms']:.2f}" if r["mask_ms"] == r["mask_ms"] else "-"  # NaN: unconstrained
        lines.append((Path(r["directory"]).name, r["mode"], f"{r['prefill_ms']:.1f}", f"{r['decode_tok_s']:.1f}", f"{r['step_p50_ms']:.2f}",
                      f"{r['step_p90_ms']:.2f}", f"{100 * r['overhead']:.1f} %", f"{r['peak_rss_mb']:.0f}", f"{r['rss_over_weights']:.2f}",
                      f"{r['added_rss_over_weights']:.2f}", mask))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


# -- the worker: one configuration, one process ------------------------------------------------


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def prompt_ids(codec, vocab_size: int, length: int) -> list[int]:
    if codec is not None:
        ids = codec.encode(" ".join([PROMPT_TEXT] * (1 + length // 16)))
        if len(ids) >= length:
            return ids[:length]
    return np.random.default_rng(0).integers(3, vocab_size, size=length).tolist()


class _RunTimer:
    """Wraps one session's run_with_iobinding: start times and durations of every call."""

    def __init__(self, session) -> None:
        self.starts: list[float] = []
        self.durations: list[float] = []
        run = session.run_with_iobinding

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                self.starts.append(start)
                self.durations.append(time.perf_counter() - start)

        session.run_with_iobinding = timed


def measure(directory: str, mode: str, prompt_tokens: int, new_tokens: int, threads: int | None) -> dict:
    from kvgraph.runtime.generator import Generator

    baseline_rss, _ = _rss_mb()  # interpreter, numpy, onnxruntime, kvgraph.runtime
    mode, _, suffix = mode.partition(", ")
    gen = Generator.load(directory, threads=threads, weights=_COMPARED.get(suffix, "auto"))
    load_rss, _ = _rss_mb()
    ids = prompt_ids(gen.codec, gen.graphs.contract.vocab_size, prompt_tokens)
    use_cache = mode != "no-cache"
    options, masks = _structured(gen) if mode == "json-schema" else ({"min_new_tokens": new_tokens}, None)
    gen.generate(ids, max_new_tokens=4, use_cache=use_cache, **{**options, "min_new_tokens": 0})  # warm-up: first runs allocate and tune
    timer = _RunTimer(gen.graphs.session(gen.graphs.graph_for("decode" if use_cache else "prefill")))
    if masks is not None:
        masks.clear()
    start = time.perf_counter()
    result = gen.generate(ids, max_new_tokens=new_tokens, use_cache=use_cache, **options)  # exactly new_tokens (a schema: until it is complete)
    total = time.perf_counter() - start
    _, peak = _rss_mb()
    steps = timer.durations if use_cache else timer.durations[1:]  # no-cache: the first prefill call is the prompt
    step_starts = timer.starts if use_cache else timer.starts[1:]
    decode_wall = total - result.stats.prefill_ms / 1e3
    gaps = np.diff(step_starts) if len(step_starts) > 1 else np.array([decode_wall])
    weights = Path(directory, gen.graphs.manifest.files.get("weights", "model.onnx.data")).stat().st_size / 2**20
    return {
        "tokens": len(result.token_ids),
        "prefill_ms": result.stats.prefill_ms,
        "decode_tok_s": (len(result.token_ids) - 1) / decode_wall,
        "step_p50_ms": float(np.percentile(gaps, 50) * 1e3),
        "step_p90_ms": float(np.percentile(gaps, 90) * 1e3),
        "overhead": max(0.0, 1 - sum(steps) / decode_wall),
        "load_rss_mb": load_rss,
        "peak_rss_mb": peak,
        "weights_mb": weights,
        "rss_over_weights": peak / weights,
        "baseline_rss_mb": baseline_rss,
        "added_rss_over_weights": (peak - baseline_rss) / weights,
        "mask_ms": 1e3 * sum(masks) / len(result.token_ids) if masks is not None else float("nan"),
    }


BENCH_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "price": {"type": "number"},
                                                 "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["name", "price", "tags"], "additionalProperties": False}


def _structured(gen) -> tuple[dict, list[float]]:
    """A JSON-schema constraint whose matchers time their mask and feed (this worker process only)."""
    from kvgraph.runtime.decoding import constrained as constrain

    spent: list[float] = []
    for name in ("allowed", "feed"):
        original = getattr(constrain.RowMatcher, name)

        def timed(self, *args, _original=original):
            begin = time.perf_counter()
            try:
                return _original(self, *args)
            finally:
                spent.append(time.perf_counter() - begin)

        setattr(constrain.RowMatcher, name, timed)
    return {"constraint": constrain.Constraint.build(gen, json_schema=BENCH_SCHEMA)}, spent


if __name__ == "__main__":
    directory, mode, prompt_tokens, new_tokens, threads = sys.argv[1:6]
    print(json.dumps(measure(directory, mode, int(prompt_tokens), int(new_tokens), int(threads) or None)))
