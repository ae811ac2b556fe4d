"""Soak: many requests of varied shape through one Generator; does resident memory creep?

    python benchmarks/soak.py EXPORT_DIR [--requests 200] [--tokens 5000]

Requests cycle through greedy and sampled, single and batched (2-3 rows), streamed, stop strings,
and chat turns, with prompts and lengths that vary, until `--tokens` new tokens over `--requests`
requests. RSS is read from /proc after a warm-up pass over every kind (the start) and every 10% of
the run; the verdict compares the end with the start (target: growth under 2%).
"""

from __future__ import annotations

import argparse
import sys
import time

from kvgraph.runtime import Generator

PROMPTS = ("Once upon a time", "What is the capital of France?", "List three colours:", "Hi",
           "Write a haiku about the sea.", "def fibonacci(n):", "The quick brown fox", "Explain gravity to a child.")
KINDS = ("greedy", "sampled", "batch", "stream", "stop", "chat")


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def request(gen: Generator, i: int, new_tokens: int) -> int:
    """Request number i of kind KINDS[i % 6]; returns the tokens it generated."""
    prompt = PROMPTS[i % len(PROMPTS)] + " " * (i % 3)
    kind = KINDS[i % len(KINDS)]
    if kind == "batch":
        rows = [prompt, PROMPTS[(i + 1) % len(PROMPTS)], PROMPTS[(i + 2) % len(PROMPTS)]][: 2 + i % 2]
        return sum(len(r.token_ids) for r in gen.generate(rows, max_new_tokens=new_tokens))
    if kind == "stream":  # the text's tokens, re-encoded (stream yields text, not ids)
        return len(gen.codec.encode("".join(gen.stream(prompt, max_new_tokens=new_tokens)), add_special_tokens=False))
    if kind == "chat":
        conversation = gen.chat()
        first = conversation.send(prompt, max_new_tokens=new_tokens // 2)
        return len(first.token_ids) + len(conversation.send("And then?", max_new_tokens=new_tokens - new_tokens // 2).token_ids)
    options = {"temperature": 0.8, "top_p": 0.9, "seed": i} if kind == "sampled" else {}
    stop = ["."] if kind == "stop" else []
    return len(gen.generate(prompt, max_new_tokens=new_tokens, stop=stop, **options).token_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=5000, help="new tokens over the whole run (about)")
    args = parser.parse_args(argv)
    gen = Generator.load(args.directory)
    for i in range(len(KINDS)):  # warm-up: every kind once, so first-use allocations are not counted as growth
        request(gen, i, 8)
    start_rss, start = rss_mb(), time.perf_counter()
    per_request = max(1, args.tokens // args.requests)
    rows, total = [("start", 0, 0, start_rss)], 0
    for i in range(args.requests):
        total += request(gen, i, max(4, per_request + (i % 7 - 3) * per_request // 4))  # lengths vary around the mean
        if (i + 1) % max(1, args.requests // 10) == 0:
            rows.append((f"after {i + 1}", i + 1, total, rss_mb()))
    end_rss = rss_mb()
    print("| point | requests | new tokens | RSS MB | vs start |\n|---|---|---|---|---|")
    for label, count, tokens, rss in rows:
        print(f"| {label} | {count} | {tokens} | {rss:.1f} | {100 * (rss / start_rss - 1):+.2f} % |")
    growth = 100 * (end_rss / start_rss - 1)
    print(f"\n{args.requests} requests, {total} new tokens in {time.perf_counter() - start:.0f} s; "
          f"RSS {start_rss:.1f} -> {end_rss:.1f} MB ({growth:+.2f} %): {'under' if growth < 2 else 'NOT under'} the 2 % target")
    if len(rows) > 2:  # the first tenth meets the longest shapes and batches for the first time
        print(f"from {rows[1][0]} requests to the end: {100 * (end_rss / rows[1][3] - 1):+.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
