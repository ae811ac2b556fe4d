"""Concurrent streaming clients against an OpenAI-compatible server: aggregate tok/s, time to first token and
inter-token latency (p50 / p99), for 1, 4, 8 and 16 clients, arriving together or staggered.

    kvgraph serve models/smollm2-static-128 --port 8000 --max-batch 16 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --label "kvgraph fp32"
    LLAMACPP_VENV/bin/python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf --n_threads 2 --port 8001 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8001 --label "llama-cpp-python server"

Every client streams `/v1/completions` for its own prompt (the same text with a different number prefixed,
so no two are identical) with `max_tokens` 64, temperature 0 and `min_tokens` 64 where the server knows it;
Two arrival patterns (`--arrivals`):
- together: every client sends one request at the same instant (a burst: the worst case for time to first
  token, since every prompt must be prefilled before the last one's first token); aggregate tok/s counts
  the streamed text pieces of all clients over the wall time of the round;
- staggered: a closed loop, as long-lived clients behave: client i starts i/N of one request's duration
  after the first, then sends `--requests` requests back to back; aggregate tok/s counts the pieces
  streamed while every client is active (from the last client's first piece to the first client's last).
Each concurrency level runs `--rounds` times; rates are medians, latencies pool every request of every
round. Servers run one at a time (compare rows of one table; the machine is shared and noisy).

`--long-prompts` measures instead what a long prompt does to the streams already running: `--streams` clients
stream `--new-tokens` each; once they all stream, `--long-count` requests with a `--long-tokens` prompt (sized
with the server's /tokenize) arrive `--gap` seconds apart. It prints the running streams' inter-token latency
before the long prompts and while they are in the server (p50 / p99 / max):

    kvgraph serve models/smollm2-static-2304 --max-batch 12 --prefill-chunk 256 &   # and --prefill-chunk 0
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --long-prompts --new-tokens 400 --label "chunks of 256"

`--logprobs 0 5` adds, for each concurrency level, rounds that ask for every token's log-probability (with 0 and 5
alternatives), alternating with the plain rounds: the cost of logprobs on decode tok/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx

PROMPT = "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had taught him, and"


def one_client(url: str, index: int, new_tokens: int, delay: float, requests: int, results: list, logprobs: int | None = None) -> None:
    time.sleep(delay)
    for turn in range(requests):
        body = {"model": "any", "prompt": f"{index}.{turn} {PROMPT}", "max_tokens": new_tokens, "temperature": 0, "stream": True,
                "min_tokens": new_tokens, **({} if logprobs is None else {"logprobs": logprobs})}
        start = time.perf_counter()
        times = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
        results.append((index, start, times))


def round_(url: str, clients: int, new_tokens: int, stagger: float = 0.0, requests: int = 1, logprobs: int | None = None) -> dict:
    """stagger: seconds over which the clients' starts are spread (0: all at once); logprobs: asked for each token."""
    results: list = []
    threads = [threading.Thread(target=one_client, args=(url, i, new_tokens, stagger * i / clients, requests, results, logprobs))
               for i in range(clients)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    ttft = [times[0] - start for _, start, times in results if times]
    itl = [b - a for _, _, times in results for a, b in zip(times, times[1:])]
    if not stagger:
        return {"rate": sum(len(times) for _, _, times in results) / wall, "ttft": ttft, "itl": itl}
    pieces = {i: sorted(t for index, _, times in results if index == i for t in times) for i in range(clients)}
    window = (max(p[0] for p in pieces.values()), min(p[-1] for p in pieces.values()))
    inside = sum(1 for p in pieces.values() for t in p if window[0] <= t <= window[1])
    return {"rate": inside / (window[1] - window[0]), "ttft": ttft, "itl": itl}


def long_prompt_text(url: str, tokens: int) -> str:
    """A prompt of about `tokens` tokens for the server's tokenizer (its /tokenize when it has one; else 1.3 tokens a word)."""
    words = [f"{w}{i % 97}" for i, w in enumerate(("river stone lamp field cloud tower " * (tokens // 4)).split())]
    text = " ".join(words[: tokens // 2])
    try:
        counted = httpx.post(f"{url}/tokenize", json={"prompt": text}, timeout=60).json()["count"]
    except (httpx.HTTPError, KeyError, ValueError):
        counted = int(1.3 * tokens // 2)
    return " ".join(words[: max(1, int(len(text.split()) * tokens / counted))])


def long_prompt_round(url: str, streams: int, new_tokens: int, prompt: str, arrivals: int, gap: float, settle: float = 6.0) -> dict:
    """`streams` clients stream `new_tokens` each; once all are streaming, `arrivals` requests with a long prompt arrive
    `gap` seconds apart (1 token each), `settle` seconds after the streams started. Inter-token latency of the running streams while the long prompts are in the
    server, and before they arrive."""
    results: list = []
    threads = [threading.Thread(target=one_client, args=(url, i, new_tokens, 0.0, 1, results)) for i in range(streams)]
    for thread in threads:
        thread.start()
    time.sleep(settle)  # every stream past its prefill, decoding at a steady pace
    spans = []

    def long_request(i: int) -> None:
        start = time.perf_counter()
        body = {"model": "any", "prompt": f"{i} {prompt}", "max_tokens": 1, "temperature": 0}
        httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()
        spans.append((start, time.perf_counter()))

    arrivals_threads = []
    for i in range(arrivals):
        arrivals_threads.append(threading.Thread(target=long_request, args=(i,)))
        arrivals_threads[-1].start()
        time.sleep(gap)
    for thread in arrivals_threads + threads:
        thread.join()
    window = (min(a for a, _ in spans), max(b for _, b in spans))
    during = [b - a for _, _, times in results for a, b in zip(times, times[1:]) if window[0] <= b <= window[1]]
    before = [b - a for _, _, times in results for a, b in zip(times, times[1:]) if b < window[0]]
    return {"during": during, "before": before, "long": [b - a for a, b in spans],
            "ended_early": sum(1 for _, _, times in results if times and times[-1] < window[1])}


def long_prompts(args) -> None:
    prompt = long_prompt_text(args.url, args.long_tokens)
    print(f"| server | streams | long prompts ({args.long_tokens} tokens, {args.gap:g} s apart) | inter-token ms before: p50 / p99 "
          "| while long prompts arrive: p50 / p99 / max | long prompt latency p50 s |")
    print("|---|---|---|---|---|---|")
    rounds = [long_prompt_round(args.url, args.streams, args.new_tokens, prompt, args.long_count, args.gap) for _ in range(args.rounds)]
    during = [t for r in rounds for t in r["during"]]
    before = [t for r in rounds for t in r["before"]]
    early = sum(r["ended_early"] for r in rounds)
    note = f" ({early} streams ended before the last long prompt)" if early else ""
    print(f"| {args.label} | {args.streams} | {args.long_count} | {1e3 * percentile(before, 50):.1f} / {1e3 * percentile(before, 99):.1f} | "
          f"{1e3 * percentile(during, 50):.1f} / {1e3 * percentile(during, 99):.1f} / {1e3 * max(during, default=float('nan')):.0f}{note} | "
          f"{statistics.median(t for r in rounds for t in r['long']):.2f} |", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--label", default="server")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arrivals", choices=["together", "staggered"], nargs="+", default=["together", "staggered"])
    parser.add_argument("--requests", type=int, default=4, help="requests per client, back to back, when staggered")
    parser.add_argument("--long-prompts", action="store_true",
                        help="instead: inter-token latency of --streams running streams while long prompts arrive")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=2000)
    parser.add_argument("--long-count", type=int, default=4, help="long prompts per round (default 4)")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between two long prompts' arrivals (default 1)")
    parser.add_argument("--logprobs", type=int, nargs="+", default=None, metavar="K",
                        help="also ask for each token's log-probability with K alternatives; the rows without logprobs and "
                             "with each K alternate round by round, and the table adds their rate against the plain one")
    args = parser.parse_args()
    round_(args.url, 1, 8)  # warm-up
    if args.long_prompts:
        return long_prompts(args)
    begin = time.perf_counter()
    round_(args.url, 1, args.new_tokens)
    one_request = time.perf_counter() - begin  # a single client's request: the span the staggered starts cover
    modes = [None] + (args.logprobs or [])
    print("| server | arrivals | clients | logprobs | aggregate tok/s | vs 1 client | vs no logprobs | TTFT p50 / p99 ms | inter-token p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arrivals in args.arrivals:
        single = {}
        for clients in args.clients:
            stagger, requests = (one_request, args.requests) if arrivals == "staggered" and clients > 1 else (0.0, 1)
            rounds = {mode: [] for mode in modes}
            for _ in range(args.rounds):  # the modes alternate: machine noise hits each alike
                for mode in modes:
                    rounds[mode].append(round_(args.url, clients, args.new_tokens, stagger, requests, mode))
            plain = statistics.median(r["rate"] for r in rounds[None])
            for mode in modes:
                rate = statistics.median(r["rate"] for r in rounds[mode])
                single.setdefault(mode, rate)
                ttft = [t for r in rounds[mode] for t in r["ttft"]]
                itl = [t for r in rounds[mode] for t in r["itl"]]
                print(f"| {args.label} | {arrivals} | {clients} | {'-' if mode is None else mode} | {rate:.1f} | {rate / single[mode]:.2f}x | "
                      f"{rate / plain:.2f}x | {1e3 * percentile(ttft, 50):.0f} / {1e3 * percentile(ttft, 99):.0f} | "
                      f"{1e3 * percentile(itl, 50):.1f} / {1e3 * percentile(itl, 99):.1f} |", flush=True)


if __name__ == "__main__":
    main()
