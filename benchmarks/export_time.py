"""Export time against optimum-cli, side by side in one session: wall time and peak RSS per run.

    python benchmarks/export_time.py models/smollm2-135m-instruct \\
        --optimum-cli /path/to/optimum-venv/bin/optimum-cli [--rounds 2] [--max-length 256]

Each run is a fresh process writing into a fresh directory; the systems alternate within each round
(kvgraph dynamic, kvgraph static, optimum-cli, then again), and the table gives the median of the
rounds. Both sides validate their export against PyTorch, as they do by default (`kvgraph export`
checks prefill, 3 decode steps and extend; optimum-cli compares outputs once). optimum-onnx pins
transformers < 4.58, so it lives in its own virtualenv (see the README's Performance section).
kvgraph's own per-phase times (trace, optimize, write, validate) are printed from its progress lines.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB of that process, its stderr) for one command."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed:\n{err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, err


def commands(model: str, out: Path, optimum_cli: str | None, max_length: int) -> dict[str, list[str]]:
    kvgraph = str(Path(sys.executable).with_name("kvgraph"))
    systems = {
        "kvgraph export (dynamic cache)": [kvgraph, "export", model, str(out / "dynamic")],
        f"kvgraph export --cache static --max-length {max_length}": [kvgraph, "export", model, str(out / "static"), "--cache", "static",
                                                                     "--max-length", str(max_length)],
    }
    if optimum_cli:
        systems["optimum-cli export onnx --task text-generation-with-past"] = [
            optimum_cli, "export", "onnx", "--model", model, "--task", "text-generation-with-past", str(out / "optimum")]
    return systems


def phases(stderr: str) -> str:
    found = re.findall(r"^(\w+) done in ([\d.]+) s", stderr, flags=re.MULTILINE)
    return ", ".join(f"{name} {seconds}" for name, seconds in found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a Hugging Face model directory")
    parser.add_argument("--optimum-cli", default=shutil.which("optimum-cli"), help="optimum-cli of a virtualenv with optimum-onnx")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, str]]] = {}
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="export-time-") as scratch:
            for name, command in commands(args.model, Path(scratch), args.optimum_cli, args.max_length).items():
                seconds, rss, err = run(command)
                results.setdefault(name, []).append((seconds, rss, err))
                print(f"round {round_ + 1}: {name}: {seconds:.1f} s, peak RSS {rss:.0f} MB  {phases(err)}", file=sys.stderr, flush=True)
    reference = statistics.median(s for s, _, _ in results[next(iter(results))])
    print(f"\n| system | wall time (median of {args.rounds}) | vs kvgraph dynamic | peak RSS | kvgraph phases (s, last round) |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        seconds = statistics.median(s for s, _, _ in runs)
        print(f"| {name} | {seconds:.1f} s | {seconds / reference:.2f}x | {statistics.median(r for _, r, _ in runs) / 1024:.1f} GB "
              f"| {phases(runs[-1][2]) or '-'} |")


if __name__ == "__main__":
    main()
