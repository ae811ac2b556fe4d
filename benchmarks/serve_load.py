"""Concurrent streaming clients against an OpenAI-compatible server: aggregate tok/s, time to first token and
inter-token latency (p50 / p99), for 1, 4, 8 and 16 clients.

    kvgraph serve models/smollm2-static-128 --port 8000 --max-batch 16 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --label "kvgraph fp32"
    LLAMACPP_VENV/bin/python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf --n_threads 2 --port 8001 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8001 --label "llama-cpp-python server"

Every client streams `/v1/completions` for its own prompt (the same text with a different number prefixed,
so no two are identical) with `max_tokens` 64, temperature 0 and `min_tokens` 64 where the server knows it;
aggregate tok/s counts the streamed text pieces of all clients over the wall time of the round. Each
concurrency level runs `--rounds` times and the table shows medians. Servers run one at a time (compare
rows of one table; the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx

PROMPT = "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had taught him, and"


def one_client(url: str, index: int, new_tokens: int, results: list) -> None:
    body = {"model": "any", "prompt": f"{index}. {PROMPT}", "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "min_tokens": new_tokens}
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
    results.append((start, times))


def round_(url: str, clients: int, new_tokens: int) -> dict:
    results: list = []
    threads = [threading.Thread(target=one_client, args=(url, i, new_tokens, results)) for i in range(clients)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    pieces = sum(len(times) for _, times in results)
    ttft = [times[0] - start for start, times in results if times]
    itl = [b - a for _, times in results for a, b in zip(times, times[1:])]
    return {"rate": pieces / wall, "ttft": ttft, "itl": itl}


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
    args = parser.parse_args()
    round_(args.url, 1, 8)  # warm-up
    print(f"| server | clients | aggregate tok/s | vs 1 client | TTFT p50 / p99 ms | inter-token p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    single = None
    for clients in args.clients:
        rounds = [round_(args.url, clients, args.new_tokens) for _ in range(args.rounds)]
        rate = statistics.median(r["rate"] for r in rounds)
        single = single or rate
        ttft = [t for r in rounds for t in r["ttft"]]
        itl = [t for r in rounds for t in r["itl"]]
        print(f"| {args.label} | {clients} | {rate:.1f} | {rate / single:.2f}x | {1e3 * percentile(ttft, 50):.0f} / "
              f"{1e3 * percentile(ttft, 99):.0f} | {1e3 * percentile(itl, 50):.1f} / {1e3 * percentile(itl, 99):.1f} |")


if __name__ == "__main__":
    main()
