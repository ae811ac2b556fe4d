"""Loading an export at scale: `Generator.load` and `kvgraph serve`, each in a fresh process, against the weights file.

    python benchmarks/load_scale.py EXPORT [EXPORT ...] [--rounds 3]

For each export and round, alternating the two:
- load: a fresh interpreter imports kvgraph's runtime and calls `Generator.load(EXPORT)` (the default weights policy,
  as the server's); the call's time, the whole process's time, and the process's peak RSS (the kernel's own count) as
  a multiple of model.onnx.data's size;
- serve: `kvgraph serve EXPORT` on a free port on 127.0.0.1, from the process's start until `/health` answers 200;
  the server's peak RSS when it is stopped.
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
generator = Generator.load(sys.argv[1])
loaded = time.perf_counter()
print(json.dumps({"import": imported - start, "load": loaded - imported}))
"""


def weights_file(export: Path) -> int:
    return (export / "model.onnx.data").stat().st_size


def load_once(export: Path) -> dict:
    """Generator.load in a fresh process: its times and the process's peak RSS (bytes)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", LOAD, str(export)], stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"Generator.load({export}) failed (status {status})")
    return {**json.loads(out.strip().splitlines()[-1]), "process": time.perf_counter() - start, "peak": usage.ru_maxrss * 1024}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(export: Path, timeout: float = 600.0) -> dict:
    """`kvgraph serve` from its start until /health answers 200; its peak RSS once stopped."""
    port = _free_port()
    kvgraph = str(Path(sys.executable).with_name("kvgraph"))
    start = time.perf_counter()
    child = subprocess.Popen([kvgraph, "serve", str(export), "--host", "127.0.0.1", "--port", str(port)],
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
    finally:
        child.terminate()
        _, _, usage = os.wait4(child.pid, 0)
    return {"ready": ready, "peak": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| export | round | Generator.load call | fresh process (imports + load) | peak RSS / weights file | serve: start to /health | serve peak RSS / weights file |")
    print("|---|---|---|---|---|---|---|")
    for export in args.exports:
        size, loads, serves = weights_file(export), [], []
        for round_ in range(1, args.rounds + 1):
            load, serve = load_once(export), serve_once(export)
            loads.append(load)
            serves.append(serve)
            print(f"| {export.name} | {round_} | {load['load']:.1f} s | {load['process']:.1f} s | {load['peak'] / 1e9:.2f} GB, "
                  f"{load['peak'] / size:.2f}× | {serve['ready']:.1f} s | {serve['peak'] / 1e9:.2f} GB, {serve['peak'] / size:.2f}× |",
                  flush=True)
        med = {k: statistics.median(r[k] for r in loads) for k in ("load", "process", "peak")}
        ready = statistics.median(s["ready"] for s in serves)
        print(f"\n{export.name}: weights file {size / 1e9:.2f} GB; median load call {med['load']:.1f} s, fresh process "
              f"{med['process']:.1f} s, peak {med['peak'] / size:.2f}× the weights file; serve ready in {ready:.1f} s: "
              f"{ready / med['process']:.2f}× the fresh load process, {ready / med['load']:.2f}× the load call\n")


if __name__ == "__main__":
    main()
