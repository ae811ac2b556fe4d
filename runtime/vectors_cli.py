"""`kvgraph vectors EXPORT VECTORS`: write golden vectors for an export, or `--check` a run against them."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..graphs.errors import KvgraphError
from ..graphs.staging import check_destination
from .session import LoadedGraphs, load_graphs
from .generator import Generator
from .loop import Request
from .trace import Trace, greedy_trace, ort_runner, replay, verify_trace
from .vectors import (DRAFT_TOKENS, Vectors, VectorsMismatch, contract_mismatch, default_prompts, first_mismatch, read_vectors,
                      write_vectors)

DEFAULT_NEW_TOKENS = 8


HELP = "write golden vectors for an export (every step's inputs and expected outputs), or --check them"  # shown by `kvgraph --help` (the command is registered in pyproject.toml)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="an export directory (from kvgraph export)")
    parser.add_argument("vectors", help="where to write the vectors (a new directory), or with --check the vectors to check")
    parser.add_argument("--check", action="store_true", help="run the export and compare with existing vectors instead")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help=f"greedy tokens per case (default {DEFAULT_NEW_TOKENS})")
    parser.add_argument("--provider", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--force", action="store_true", help="replace an existing vectors directory")


def run(args: argparse.Namespace) -> int:
    if args.check:
        vectors = check_vectors(args.directory, args.vectors, args.provider)
        steps = sum(len(trace.steps) for trace in vectors.cases.values())
        print(f"{args.vectors}: {args.directory} reproduces the vectors ({len(vectors.cases)} cases, {steps} graph calls)")
        return 0
    out = make_vectors(args.directory, args.vectors, args.max_new_tokens, args.provider, args.force)
    print(f"wrote {out}")
    return 0


def make_vectors(directory: str | Path, out: str | Path, max_new_tokens: int = DEFAULT_NEW_TOKENS, provider: str = "cpu",
                 force: bool = False) -> Path:
    """Run the fixed prompts greedily through the export and write every step's tensors to `out`."""
    check_destination(Path(out), force)  # before any slow work
    if max_new_tokens < 1:
        raise KvgraphError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    generator = Generator.load(directory, provider, max_cache_bytes=None, exact=True)
    graphs, codec = generator.graphs, generator.codec
    prompts = default_prompts(graphs.contract.vocab_size, codec.encode if codec else None)
    generator.check([Request(row, max_new_tokens) for rows in prompts.values() for row in rows])  # the runtime's own limits
    cases = {name: _trace(graphs, rows, max_new_tokens) for name, rows in prompts.items()}
    if graphs.contract.verify:
        cases["verify"] = verify_trace(graphs.manifest, ort_runner(graphs), prompts["batch"], _draft(cases["batch"]))
    return write_vectors(graphs.manifest, cases, Path(out), force)


def _draft(batch: Trace) -> list[list[int]]:
    """Each row's first DRAFT_TOKENS greedy tokens (pad after a row that ended sooner): a draft the verify graph
    should accept whole, its argmax at position i being greedy token i + 1."""
    return [(row + [batch.pad_id] * DRAFT_TOKENS)[:DRAFT_TOKENS] for row in batch.tokens]


def check_vectors(directory: str | Path, vectors_dir: str | Path, provider: str = "cpu") -> Vectors:
    """Re-run the vectors' prompts through the export; VectorsMismatch names the first differing step and tensor."""
    vectors = read_vectors(Path(vectors_dir))
    graphs = load_graphs(directory, provider, exact=True)
    reason = contract_mismatch(vectors, graphs.contract)
    if reason:
        raise VectorsMismatch(f"{vectors_dir} vs {directory}: {reason}")
    for name, trace in vectors.cases.items():
        if not all(0 <= t < graphs.contract.vocab_size for row in trace.prompts for t in row):
            raise VectorsMismatch(f"{vectors_dir}: case {name!r} has prompt ids outside the vocabulary [0, {graphs.contract.vocab_size})")
    runs = {name: replay(graphs.manifest, ort_runner(graphs), trace) for name, trace in vectors.cases.items()}
    reason = first_mismatch(vectors, graphs.contract, runs)
    if reason:
        raise VectorsMismatch(f"{vectors_dir} vs {directory}: {reason}")
    return vectors


def _trace(graphs: LoadedGraphs, prompts: list[list[int]], max_new_tokens: int) -> Trace:
    return greedy_trace(graphs.manifest, ort_runner(graphs), prompts, max_new_tokens)
