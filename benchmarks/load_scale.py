"""Loading an export at scale: `Generator.load` and `kvgraph serve`, each in a fresh process, against the weights file.

    python benchmarks/load_scale.py EXPORT [EXPORT ...] [--rounds 3] [--weights auto,mapped]

For each export, weights policy and round, alternating:
- load: a fresh interpreter imports kvgraph's runtime, calls `Generator.load(EXPORT, weights=POLICY)`, then generates
  2 tokens after a 24-token prompt (a mapped policy reads its weights on first use: RSS after load alone says
  nothing); the call's time, the first tokens' time, the whole process's time, and the process's peak RSS (the
  kernel's own count) as a multiple of model.onnx.data's size;
- serve: `kvgraph serve EXPORT --weights POLICY` on a free port on 127.0.0.1, from the process's start until
  `/health` answers 200, then one 2-token completion; the server's peak RSS when it is stopped.
Prints a table and the medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

LOAD = """
import json, resource, sys, time
start = time.perf_counter()
from kvgraph.runtime import Generator
imported = time.perf_counter()
generator = Generator.load(sys.argv[1], weights=sys.argv[2])
loaded = time.perf_counter()
generator.generate(list(range(1, 25)), max_new_tokens=2, min_new_tokens=2)
first = time.perf_counter()
print(json.dumps({"import": imported - start, "load": loaded - imported, "first": first - loaded}))
"""


def weights_file(export: Path) -> int:
    return (export / "model.onnx.data").stat().st_size


def load_once(export: Path, policy: str) -> dict:
    """Generator.load in a fresh process: its times and the process's peak RSS (bytes)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", LOAD, str(export), policy], stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"Generator.load({export}) failed (status {status})")
    return {**json.loads(out.strip().splitlines()[-1]), "process": time.perf_counter() - start, "peak": usage.ru_maxrss * 1024}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(export: Path, policy: str, timeout: float = 600.0) -> dict:
    """`kvgraph serve` from its start until /health answers 200; its peak RSS once stopped."""
    port = _free_port()
    kvgraph = str(Path(sys.executable).with_name("kvgraph"))
    start = time.perf_counter()
    child = subprocess.Popen([kvgraph, "serve", str(export), "--host", "127.0.0.1", "--port", str(port), "--weights", policy],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            if child.poll() is not None:
                raise SystemExit(f"kvgraph serve {export} exited with {child.returncode} before /health answered")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        ready = time.perf_counter() - start
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
    finally:
        child.terminate()
        _, _, usage = os.wait4(child.pid, 0)
    return {"ready": ready, "peak": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", default="auto", help="comma-separated weights policies to alternate (default auto)")
    args = parser.parse_args()
    policies = args.weights.split(",")
    print("| export | weights | round | Generator.load call | 2 tokens | fresh process (imports + load + 2 tokens) | peak RSS / weights file "
          "| serve: start to /health | serve peak RSS / weights file (after 2 tokens) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for export in args.exports:
        size, loads, serves = weights_file(export), {p: [] for p in policies}, {p: [] for p in policies}
        for round_ in range(1, args.rounds + 1):
            for policy in policies:
                load, serve = load_once(export, policy), serve_once(export, policy)
                loads[policy].append(load)
                serves[policy].append(serve)
                print(f"| {export.name} | {policy} | {round_} | {load['load']:.1f} s | {load['first']:.1f} s | {load['process']:.1f} s | {load['peak'] / 1e9:.2f} GB, "
                      f"{load['peak'] / size:.2f}× | {serve['ready']:.1f} s | {serve['peak'] / 1e9:.2f} GB, {serve['peak'] / size:.2f}× |",
                      flush=True)
        print()
        for policy in policies:
            summary(export.name, policy, size, loads[policy], serves[policy])


def summary(name: str, policy: str, size: int, loads: list[dict], serves: list[dict]) -> None:
    med = {k: statistics.median(r[k] for r in loads) for k in ("load", "process", "peak")}
    ready = statistics.median(s["ready"] for s in serves)
    serve_peak = statistics.median(s["peak"] for s in serves)
    print(f"{name}, weights {policy}: weights file {size / 1e9:.2f} GB; median load call {med['load']:.1f} s, fresh process "
          f"{med['process']:.1f} s, peak {med['peak'] / size:.2f}× the weights file; serve ready in {ready:.1f} s: "
          f"{ready / med['process']:.2f}× the fresh load process, {ready / med['load']:.2f}× the load call; serve peak "
          f"{serve_peak / size:.2f}×")


if __name__ == "__main__":
    main()
