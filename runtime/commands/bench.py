"""`kvgraph bench DIR [DIR ...]`: prefill time, decode speed, step latency, memory and driver overhead.

Every measurement runs in a fresh worker process (peak RSS is per process), the configurations
alternate round by round, and the table shows medians over the rounds. For each export
directory two modes are measured: its own cache (dynamic or static) and no cache (every step
re-runs the prefill graph over the whole sequence).

    decode tok/s       new tokens after the first / decode wall time (sampling included)
    step p50 / p90     wall time from one decode step's start to the next one's
    overhead           share of decode wall time spent outside session.run
    peak RSS / weights VmHWM of the worker after load and generation, over model.onnx.data's size
    (RSS-base)/weights the same, less the worker's RSS before loading (interpreter, onnxruntime)
    mask ms/token      --structured: the JSON-schema mask's cost per token (llguidance's mask, applied to
                       the logits, and the token fed back), in the "json-schema" rows
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "measure prefill, decode speed, step latency, memory and driver overhead"  # shown by `kvgraph --help` (the command is registered in pyproject.toml)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directories", nargs="+", help="export directories (e.g. a dynamic and a static export of one model)")
    parser.add_argument("--prompt-tokens", type=int, default=24, help="prompt length in tokens (default 24)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens to generate, eos ignored (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the table shows medians (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's)")
    parser.add_argument("--no-recompute", action="store_true", help="skip the no-cache rows")
    parser.add_argument("--compare-sharing", action="store_true",
                        help="also measure each mode with the weights mapped once (unpacked) and with one copy per session (prepacked)")
    parser.add_argument("--structured", action="store_true",
                        help="also generate under a JSON schema (structured output) and report the mask's cost per token")
    parser.add_argument("--json", action="store_true", help="print one JSON object per configuration instead of a table")


def run(args: argparse.Namespace) -> int:
    from kvgraph.graphs import KvgraphError
    from kvgraph.runtime.tools.benchmark import configurations, format_table, measure_rounds

    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.rounds < 1:
        raise KvgraphError("--prompt-tokens must be >= 1, --new-tokens >= 2 and --rounds >= 1")
    configs = configurations(args.directories, args.prompt_tokens, args.new_tokens, not args.no_recompute, args.structured,
                             args.compare_sharing)
    rows = measure_rounds(configs, args.rounds, args.prompt_tokens, args.new_tokens, args.threads,
                          log=lambda line: print(line, file=sys.stderr))
    print("\n".join(json.dumps(row) for row in rows) if args.json else format_table(rows))
    return 0
