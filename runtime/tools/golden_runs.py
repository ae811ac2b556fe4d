"""Golden vectors made and checked: the fixed prompts run greedily through an export, every step's tensors
written (make_vectors), or re-run and compared with vectors written before (check_vectors)."""

from __future__ import annotations

from pathlib import Path

from kvgraph.graphs.errors import KvgraphError
from kvgraph.graphs.staging import check_destination
from kvgraph.runtime.core.loop import Request
from kvgraph.runtime.core.session import LoadedGraphs, load_graphs
from kvgraph.runtime.generator import Generator
from kvgraph.runtime.tools.golden_vectors import (DRAFT_TOKENS, Vectors, VectorsMismatch, contract_mismatch, default_prompts,
                                                  first_mismatch, read_vectors, write_vectors)
from kvgraph.runtime.tools.step_trace import Trace, greedy_trace, ort_runner, replay, verify_trace

DEFAULT_NEW_TOKENS = 8


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
    cases["processors"] = greedy_trace(graphs.manifest, ort_runner(graphs), prompts["batch"], max_new_tokens, _settings(cases["batch"]))
    if graphs.contract.verify:
        cases["verify"] = verify_trace(graphs.manifest, ort_runner(graphs), prompts["batch"], _draft(cases["batch"]))
    return write_vectors(graphs.manifest, cases, Path(out), force)


def _settings(batch: Trace) -> dict:
    """Processors that change the batch case's greedy tokens (graphs/README.md 4.0): its first row's first token suppressed,
    its second row's first two tokens a bad word, a repetition penalty and no repeated bigram, eos not before 2 tokens."""
    first, second = batch.tokens[0], batch.tokens[-1]
    settings = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "suppress_tokens": [first[0]], "min_new_tokens": 2}
    if len(second) >= 2:
        settings["bad_words_ids"] = [second[:2]]
    return settings


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
