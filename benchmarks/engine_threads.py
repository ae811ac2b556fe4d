"""Continuous batching against threads on one Generator: aggregate tok/s for 1 and N concurrent clients.

    python benchmarks/engine_threads.py models/smollm2-static-128 8

Every client asks for 64 greedy tokens (eos ignored) after its own 24-token prompt, all clients start
together; the two ways alternate, median of 3 runs each. Prints a table.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

from kvgraph.runtime import Generator
from kvgraph.runtime.serving.engine import BatchEngine

NEW_TOKENS = 64
PROMPT = list(range(1000, 1024))


def aggregate_rate(generate, clients: int) -> float:
    """Tokens of all clients over the wall time from the first start to the last finish."""
    counts: list[int] = []

    def client(i: int) -> None:
        counts.append(len(generate([t + i for t in PROMPT])))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def main(directory: str, clients: int) -> None:
    shared = Generator.load(directory)
    engine = BatchEngine(Generator.load(directory), max_batch=clients)
    ways = {"threads on one Generator": lambda p: shared.generate(p, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS).token_ids,
            "BatchEngine": lambda p: engine.generate(p, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS).token_ids}
    print(f"| clients | {' | '.join(ways)} | engine / threads |")
    print("|---|---|---|---|")
    for count in (1, clients):
        rates = {name: [] for name in ways}
        for _ in range(3):
            for name, generate in ways.items():
                rates[name].append(aggregate_rate(generate, count))
        medians = [statistics.median(rates[name]) for name in ways]
        print(f"| {count} | {medians[0]:.1f} tok/s | {medians[1]:.1f} tok/s | {medians[1] / medians[0]:.2f}x |")
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
