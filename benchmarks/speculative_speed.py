"""Speculative decoding against plain greedy decoding on the same export: acceptance rate, decode tok/s
and whole-request time, on input-grounded prompts (edit, summarise, extract or reformat a paragraph
given in the prompt) and on free-form chat, where drafts are rarely right and must cost little.

    python benchmarks/speculative.py models/smollm2-135m-instruct-onnx [--speculative prompt-lookup|DRAFT_DIR]
        [--draft-tokens 3 5] [--rounds 3] [--new-tokens 128]

Prompts: benchmarks/speculative_prompts.json, applied with the export's chat template. Each round
runs every prompt plainly and with each draft length, alternating; the table shows medians over the
rounds of the summed times. Tokens are checked to be identical to plain decoding on every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from kvgraph.runtime import Generator

PROMPTS = Path(__file__).with_name("speculative_prompts.json")


def timed(gen: Generator, prompt: str, new_tokens: int, **options) -> tuple[list[int], float, float, int, int]:
    start = time.perf_counter()
    result = gen.generate(prompt, chat=True, max_new_tokens=new_tokens, **options)
    total = time.perf_counter() - start
    return result.token_ids, total, total - result.stats.prefill_ms / 1e3, result.stats.drafted, result.stats.accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--speculative", default="prompt-lookup")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    gen = Generator.load(args.directory, threads=args.threads)
    sets = json.loads(PROMPTS.read_text(encoding="utf-8"))
    ways = {"plain": {}} | {f"k={k}": {"speculative": args.speculative, "draft_tokens": k} for k in args.draft_tokens}
    for prompt in sets["chat"][:1]:  # warm-up (the verify session opens here)
        for options in ways.values():
            gen.generate(prompt, chat=True, max_new_tokens=8, **options)
    print(f"| prompts | way | new tokens | acceptance | decode tok/s | whole request s | speed-up (decode / whole) |")
    print("|---|---|---|---|---|---|---|")
    for name, prompts in sets.items():
        samples = {way: [] for way in ways}
        for _ in range(args.rounds):
            for way, options in ways.items():
                runs = [timed(gen, p, args.new_tokens, **options) for p in prompts]
                samples[way].append(runs)
        plain_tokens = [r[0] for r in samples["plain"][0]]
        for way in ways:
            assert all([r[0] for r in runs] == plain_tokens for runs in samples[way]), f"{way} changed the tokens"
        base = None
        for way, rounds in samples.items():
            tokens = sum(len(r[0]) for r in rounds[0])
            whole = statistics.median(sum(r[1] for r in runs) for runs in rounds)
            decode = statistics.median(sum(r[2] for r in runs) for runs in rounds)
            rate = (tokens - len(prompts)) / decode
            drafted, accepted = sum(r[3] for r in rounds[0]), sum(r[4] for r in rounds[0])
            base = base or (rate, whole)
            share = f"{100 * accepted / drafted:.0f} % of {drafted}" if drafted else "-"
            print(f"| {name} ({len(prompts)}) | {way} | {tokens} | {share} | {rate:.1f} | {whole:.2f} | "
                  f"{rate / base[0]:.2f}x / {base[1] / whole:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
