"""One export in three runtimes: the web page in headless Chromium (onnxruntime-web), Node.js (onnxruntime-node,
examples/node) and Python (kvgraph.runtime, onnxruntime): load time, first token and decode tok/s, same tokens.

    python benchmarks/web.py models/smollm2-135m-instruct-onnx [--rounds 3] [--new-tokens 64]

The three runtimes take turns in each round on the same chat prompt; the table shows medians. The page is
loaded twice per round in one browser profile: first downloading the weights (over 127.0.0.1), then reading
them from the Cache API. Needs `npm ci` in examples/node and examples/web, and Debian's chromium.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import browser, page_url  # noqa: E402  (the tests' driver of headless Chromium)

from kvgraph.runtime import Generator  # noqa: E402
from kvgraph.runtime.serving.page_server import PageServer  # noqa: E402

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def python_run(directory: Path, ids: list[int], new_tokens: int) -> dict:
    start = time.perf_counter()
    generator = Generator.load(directory)
    loaded = time.perf_counter()
    result = generator.generate([ids], max_new_tokens=new_tokens)[0]
    stats = result.stats
    return {"tokens": result.token_ids, "load": loaded - start, "first": stats.prefill_ms / 1e3, "tok/s": stats.decode_tokens_per_s}


def node_run(directory: Path, ids: list[int], new_tokens: int) -> dict:
    command = ["node", str(ROOT / "examples" / "node" / "generate.js"), str(directory), "--ids", ",".join(map(str, ids)),
               "--max-new-tokens", str(new_tokens), "--time"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    timing = json.loads(out[1])
    return {"tokens": json.loads(out[0]), "load": timing["load_seconds"], "first": timing["first_token_seconds"],
            "tok/s": timing["tokens_per_second"]}


def browser_runs(server: PageServer, new_tokens: int) -> list[dict]:
    shown = browser(page_url(server, export="/export/", prompt=QUESTION, max_new_tokens=new_tokens), reload=True)
    return [{"tokens": json.loads(s["tokens"]), "load": float(s["loadSeconds"]), "first": float(s["firstTokenSeconds"]),
             "tok/s": float(s["tokensPerSecond"]), "backend": s["backend"], "source": s["weightsSource"]} for s in shown]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    ids = Generator.load(args.directory).codec.encode_chat([{"role": "user", "content": QUESTION}])
    server = PageServer({"/export/": args.directory}).start()
    runs: dict[str, list[dict]] = {}
    try:
        for _ in range(args.rounds):
            runs.setdefault("Python onnxruntime", []).append(python_run(args.directory, ids, args.new_tokens))
            runs.setdefault("Node onnxruntime-node", []).append(node_run(args.directory, ids, args.new_tokens))
            fresh, cached = browser_runs(server, args.new_tokens)
            runs.setdefault(f"Chromium onnxruntime-web ({fresh['backend']}), weights downloaded", []).append(fresh)
            runs.setdefault(f"Chromium onnxruntime-web ({cached['backend']}), weights from the Cache API", []).append(cached)
    finally:
        server.close()
    reference = runs["Python onnxruntime"][0]["tokens"]
    print(f"prompt: {len(ids)} tokens (chat template), {args.new_tokens} new tokens at most, greedy; medians of {args.rounds} rounds\n")
    print("| runtime | load s | first token s | decode tok/s | new tokens | same tokens as Python |")
    print("|---|---|---|---|---|---|")
    for name, rows in runs.items():
        median = {key: statistics.median(r[key] for r in rows) for key in ("load", "first", "tok/s")}
        same = all(r["tokens"] == reference for r in rows)
        print(f"| {name} | {median['load']:.2f} | {median['first']:.3f} | {median['tok/s']:.1f} | {len(rows[0]['tokens'])} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
