"""`kvgraph vectors EXPORT VECTORS`: write golden vectors for an export, or `--check` a run against them."""

from __future__ import annotations

import argparse

from kvgraph.runtime.tools.golden_runs import DEFAULT_NEW_TOKENS


HELP = "write golden vectors for an export (every step's inputs and expected outputs), or --check them"  # shown by `kvgraph --help` (the command is registered in pyproject.toml)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="an export directory (from kvgraph export)")
    parser.add_argument("vectors", help="where to write the vectors (a new directory), or with --check the vectors to check")
    parser.add_argument("--check", action="store_true", help="run the export and compare with existing vectors instead")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help=f"greedy tokens per case (default {DEFAULT_NEW_TOKENS})")
    parser.add_argument("--provider", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--force", action="store_true", help="replace an existing vectors directory")


def run(args: argparse.Namespace) -> int:
    from kvgraph.runtime.tools.golden_runs import check_vectors, make_vectors

    if args.check:
        vectors = check_vectors(args.directory, args.vectors, args.provider)
        steps = sum(len(trace.steps) for trace in vectors.cases.values())
        print(f"{args.vectors}: {args.directory} reproduces the vectors ({len(vectors.cases)} cases, {steps} graph calls)")
        return 0
    out = make_vectors(args.directory, args.vectors, args.max_new_tokens, args.provider, args.force)
    print(f"wrote {out}")
    return 0
