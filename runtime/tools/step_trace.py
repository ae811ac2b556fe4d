"""The contract as a plain greedy loop that records every step (the source of the golden vectors).

    trace = greedy_trace(manifest, run, prompts=[[5, 9, 17]], max_new_tokens=8)
    trace.tokens          # greedy tokens per row
    trace.steps[1].inputs # exactly what decode.onnx was fed at the first decode step

`run(graph, feeds) -> outputs` is any evaluator of the ONNX graphs: onnxruntime (`ort_runner`),
onnx's ReferenceEvaluator, or another runtime's bindings. The loop feeds and fetches every tensor
as numpy (no in-place buffers, no device binding): it is the contract of graphs/README.md written
out step by step, slower than runtime/core/steps.py on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvgraph.graphs.contract import ATTENTION_MASK, ENCODER_HIDDEN, INPUT_IDS, LOGITS, GraphContract
from kvgraph.graphs.conventions import left_pad, right_pad
from kvgraph.graphs.manifest import Manifest
from kvgraph.graphs.modes import step_adapter
from kvgraph.runtime.core import processors
from kvgraph.runtime.core.processors import Context
from kvgraph.runtime.core.sampling import Sampling

Runner = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]  # (graph, feeds) -> outputs by name


@dataclass
class Step:
    graph: str  # "encoder", "prefill", "decode" or "verify"
    inputs: dict[str, np.ndarray]  # every input of the graph, in the graph's order
    outputs: dict[str, np.ndarray]  # logits (B, V) of the last position (verify: (B, Q, V)); the encoder: encoder_hidden_states


@dataclass
class Trace:
    prompts: list[list[int]]
    max_new_tokens: int
    pad_id: int
    eos_token_ids: list[int]
    steps: list[Step]
    tokens: list[list[int]]  # the greedy tokens of each row (an eos that ended the row included); verify: argmax per position
    draft: list[list[int]] | None = None  # a verify case: the Q tokens per row fed to the verify graph after the prefill
    settings: dict | None = None  # processors (graphs/README.md 4.0) applied before each argmax, by generation config field


def greedy_trace(manifest: Manifest, run: Runner, prompts: list[list[int]], max_new_tokens: int, settings: dict | None = None) -> Trace:
    """Greedy generation (argmax, lowest id on ties) for a batch, every graph call recorded; `settings` (generation config
    fields) are applied to the scores by the runtime's processors first."""
    special = manifest.special_tokens
    pad, eos = special.feed_pad_id, list(special.eos_token_ids)
    loop = LOOPS[manifest.contract.kind](manifest, run)
    logits = loop.first(prompts, pad)
    rows: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    sequences, process = _processors(manifest, prompts, pad, max_new_tokens, settings)
    while True:
        chosen = np.argmax(process(sequences, logits), axis=-1)  # (B,)
        sequences = np.concatenate([sequences, [[pad] if done[b] else [int(chosen[b])] for b in range(len(rows))]], axis=1)
        for b, row in enumerate(rows):
            if not done[b]:
                row.append(int(chosen[b]))
                done[b] = row[-1] in eos or len(row) >= max_new_tokens
        if all(done):
            break
        # a finished row is fed the pad id; the batch steps together until every row is done
        logits = loop.next(np.array([[pad] if done[b] else row[-1:] for b, row in enumerate(rows)], dtype=np.int64))
    return Trace([list(p) for p in prompts], max_new_tokens, pad, eos, loop.steps, rows, settings=settings)


def _processors(manifest: Manifest, prompts: list[list[int]], pad: int, max_new_tokens: int, settings: dict | None):
    """(the decoder's sequences (B, L), scores -> processed scores) for a trace; no settings: the scores as they are."""
    seq2seq = manifest.contract.kind == "encoder-decoder"
    start = manifest.special_tokens.decoder_start_token_id
    sequences = np.array([[start] for _ in prompts], dtype=np.int64) if seq2seq else left_pad(prompts, pad)[0]
    if not settings:
        return sequences, lambda ids, scores: scores
    width = sequences.shape[1]
    padding = None if seq2seq else np.array([width - len(p) for p in prompts], dtype=np.int64)
    options = {key: value for key, value in settings.items() if key != "min_new_tokens"}
    context = Context(tuple(manifest.special_tokens.eos_token_ids), width, width + max_new_tokens, settings.get("min_new_tokens", 0),
                      None, padding, manifest.contract.vocab_size)
    return sequences, processors.build(Sampling.of(options), context)


def verify_trace(manifest: Manifest, run: Runner, prompts: list[list[int]], draft: list[list[int]]) -> Trace:
    """The prompts' prefill, then one verify call fed `draft` (B, Q): the logits after each of its tokens.

    tokens: each row's argmax at each position, which a greedy speculative loop compares its drafts with."""
    special = manifest.special_tokens
    loop = _DecoderLoop(manifest.contract, run)
    loop.first(prompts, special.feed_pad_id)
    logits = loop.verify(np.array(draft, dtype=np.int64))  # (B, Q, V)
    chosen = np.argmax(logits, axis=-1).tolist()
    return Trace([list(p) for p in prompts], len(draft[0]), special.feed_pad_id, list(special.eos_token_ids), loop.steps, chosen,
                 [list(row) for row in draft])


def replay(manifest: Manifest, run: Runner, case: Trace) -> Trace:
    """Run a recorded case again (its prompts, and its draft for a verify case), every call recorded."""
    if case.draft is not None:
        return verify_trace(manifest, run, case.prompts, case.draft)
    return greedy_trace(manifest, run, case.prompts, case.max_new_tokens, case.settings)


class _Loop:
    """Feeds built by the contract's step adapter; each step's presents (valid prefix) become the next pasts."""

    def __init__(self, contract: GraphContract, run: Runner) -> None:
        self.contract = contract
        self.adapter = step_adapter(contract)
        self.run = run
        self.steps: list[Step] = []
        self.past: list[np.ndarray] = []  # past.{i}.* for the next step, (B, Hkv, P, D) each

    def _call(self, role: str, tokens: np.ndarray, mask: np.ndarray, other: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run one graph, record exactly what it was fed (a copy) and its logits: the last position's (B, V),
        or for verify every position's (B, Q, V)."""
        inputs, outputs = self.adapter.run(self.run, role, tokens, mask, self.past, other)
        self.past = self.adapter.presents(outputs)
        logits = outputs[LOGITS] if role == "verify" else outputs[LOGITS][:, -1]
        self.steps.append(Step(self.adapter.graph(role), {k: np.array(v) for k, v in inputs.items()}, {LOGITS: np.array(logits)}))
        return outputs


class _DecoderLoop(_Loop):
    """Decoder-only: left-padded prompts through prefill, then one decode step per token."""

    def first(self, prompts: list[list[int]], pad: int) -> np.ndarray:
        ids, self.mask = left_pad(prompts, pad)  # (B, S) each
        return self._call("prefill", ids, self.mask)[LOGITS][:, -1]

    def next(self, tokens: np.ndarray) -> np.ndarray:
        # tokens (B, 1); the mask grows by a 1 column; the new token's position = real tokens before it
        self.mask = np.concatenate([self.mask, np.ones_like(tokens)], axis=1)
        return self._call("decode", tokens, self.mask)[LOGITS][:, -1]

    def verify(self, tokens: np.ndarray) -> np.ndarray:
        # tokens (B, Q) after the prompt; the mask grows by Q 1-columns; logits (B, Q, V)
        self.mask = np.concatenate([self.mask, np.ones_like(tokens)], axis=1)
        return self._call("verify", tokens, self.mask)[LOGITS]


class _Seq2SeqLoop(_Loop):
    """Encoder-decoder: right-padded sources through the encoder once; the decoder starts from its start token."""

    def __init__(self, manifest: Manifest, run: Runner) -> None:
        super().__init__(manifest.contract, run)
        self.start = manifest.special_tokens.decoder_start_token_id
        self.cross: dict[str, np.ndarray] = {}

    def first(self, prompts: list[list[int]], pad: int) -> np.ndarray:
        ids, self.source_mask = right_pad(prompts, pad)  # (B, Se) each
        encoder_inputs = {INPUT_IDS: ids, ATTENTION_MASK: self.source_mask}
        hidden = self.run("encoder", encoder_inputs)[ENCODER_HIDDEN]  # (B, Se, H)
        self.steps.append(Step("encoder", {k: np.array(v) for k, v in encoder_inputs.items()}, {ENCODER_HIDDEN: np.array(hidden)}))
        tokens = np.full((len(prompts), 1), self.start, dtype=np.int64)
        outputs = self._call("prefill", tokens, self.source_mask, {ENCODER_HIDDEN: hidden})
        self.cross = {name: outputs[name] for name in self.contract.cross_names()}  # (B, Hkv, Se, D), fixed from now on
        return outputs[LOGITS][:, -1]

    def next(self, tokens: np.ndarray) -> np.ndarray:
        return self._call("decode", tokens, self.source_mask, self.cross)[LOGITS][:, -1]


LOOPS = {"decoder": lambda manifest, run: _DecoderLoop(manifest.contract, run), "encoder-decoder": _Seq2SeqLoop}


def ort_runner(graphs) -> Runner:
    """A Runner over the sessions of runtime.session.LoadedGraphs (numpy in, numpy out)."""

    def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = graphs.session(graph)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    return run
