"""The contract as a plain greedy loop that records every step (the source of the golden vectors).

    trace = greedy_trace(manifest, run, prompts=[[5, 9, 17]], max_new_tokens=8)
    trace.tokens          # greedy tokens per row
    trace.steps[1].inputs # exactly what decode.onnx was fed at the first decode step

`run(graph, feeds) -> outputs` is any evaluator of the ONNX graphs: onnxruntime (`ort_runner`),
onnx's ReferenceEvaluator, or another runtime's bindings. The loop feeds and fetches every tensor
as numpy (no in-place buffers, no device binding): it is the contract of graphs/README.md written
out step by step, slower than runtime/steps.py on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..graphs.contract import (ATTENTION_MASK, ENCODER_HIDDEN, ENCODER_MASK, INPUT_IDS, LOGITS, POSITION_IDS,
                               WRITE_INDICES, GraphContract)
from ..graphs.conventions import extend_position_ids, left_pad, prefill_position_ids, right_pad
from ..graphs.manifest import Manifest

Runner = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]  # (graph, feeds) -> outputs by name


@dataclass
class Step:
    graph: str  # "encoder", "prefill" or "decode"
    inputs: dict[str, np.ndarray]  # every input of the graph, in the graph's order
    outputs: dict[str, np.ndarray]  # logits (B, V) of the last position; the encoder: encoder_hidden_states


@dataclass
class Trace:
    prompts: list[list[int]]
    max_new_tokens: int
    pad_id: int
    eos_token_ids: list[int]
    steps: list[Step]
    tokens: list[list[int]]  # the greedy tokens of each row (an eos that ended the row included)


def greedy_trace(manifest: Manifest, run: Runner, prompts: list[list[int]], max_new_tokens: int) -> Trace:
    """Greedy generation (argmax, lowest id on ties) for a batch, every graph call recorded."""
    special = manifest.special_tokens
    pad, eos = special.feed_pad_id, list(special.eos_token_ids)
    loop = _Seq2SeqLoop(manifest, run) if manifest.contract.seq2seq else _DecoderLoop(manifest.contract, run)
    logits = loop.first(prompts, pad)
    rows: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    while True:
        chosen = np.argmax(logits, axis=-1)  # (B,)
        for b, row in enumerate(rows):
            if not done[b]:
                row.append(int(chosen[b]))
                done[b] = row[-1] in eos or len(row) >= max_new_tokens
        if all(done):
            break
        # a finished row is fed the pad id; the batch steps together until every row is done
        logits = loop.next(np.array([[pad] if done[b] else row[-1:] for b, row in enumerate(rows)], dtype=np.int64))
    return Trace([list(p) for p in prompts], max_new_tokens, pad, eos, loop.steps, rows)


class _Loop:
    def __init__(self, contract: GraphContract, run: Runner) -> None:
        self.contract = contract
        self.run = run
        self.steps: list[Step] = []
        self.past: dict[str, np.ndarray] = {}  # past.{i}.* for the next step: the last step's present.{i}.*
        self.length = 0  # positions written to the self-attention cache

    def _static_buffers(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.contract.num_kv_heads, self.contract.max_length, self.contract.head_dim)  # (B, Hkv, N, D)
        return {name: np.zeros(shape, dtype=self.contract.dtype) for name in self.contract.past_names()}

    def _call(self, graph: str, feeds: dict[str, np.ndarray], new: int) -> dict[str, np.ndarray]:
        """Run one graph on `feeds` + the pasts, record it, keep its presents as the next pasts."""
        specs, _ = self.contract.graphs()[graph]
        feeds = {**feeds, **self.past}
        inputs = {spec.name: np.array(feeds[spec.name]) for spec in specs}  # the graph's order; a copy
        outputs = self.run(graph, inputs)
        self.past = {past: outputs[present] for past, present in zip(self.contract.past_names(), self.contract.present_names())}
        self.length += new
        self.steps.append(Step(graph, inputs, {LOGITS: np.array(outputs[LOGITS][:, -1])}))
        return outputs


class _DecoderLoop(_Loop):
    """Decoder-only: left-padded prompts through prefill, then one decode step per token."""

    def first(self, prompts: list[list[int]], pad: int) -> np.ndarray:
        ids, self.mask = left_pad(prompts, pad)  # (B, S) each
        feeds = {INPUT_IDS: ids, POSITION_IDS: prefill_position_ids(self.mask)}
        if self.contract.static:
            self.past = self._static_buffers(len(prompts))
        return self._call("prefill", {**feeds, **self._mask_feeds()}, ids.shape[1])[LOGITS][:, -1]

    def next(self, tokens: np.ndarray) -> np.ndarray:
        # tokens (B, 1); the mask grows by a 1 column; the new token's position = real tokens before it
        self.mask = np.concatenate([self.mask, np.ones_like(tokens)], axis=1)
        feeds = {INPUT_IDS: tokens, POSITION_IDS: extend_position_ids(self.mask, 1)}
        return self._call("decode", {**feeds, **self._mask_feeds()}, 1)[LOGITS][:, -1]

    def _mask_feeds(self) -> dict[str, np.ndarray]:
        if not self.contract.static:
            return {ATTENTION_MASK: self.mask}  # (B, P + Q)
        batch = self.mask.shape[0]
        mask = np.zeros((batch, self.contract.max_length), dtype=np.int64)  # (B, N): unwritten positions are 0
        mask[:, : self.mask.shape[1]] = self.mask
        return {ATTENTION_MASK: mask, WRITE_INDICES: np.full(batch, self.length, dtype=np.int64)}


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
        if self.contract.static:
            self.past = self._static_buffers(len(prompts))
        tokens = np.full((len(prompts), 1), self.start, dtype=np.int64)
        outputs = self._call("prefill", {INPUT_IDS: tokens, ENCODER_HIDDEN: hidden, **self._feeds(len(prompts))}, 1)
        self.cross = {name: outputs[name] for name in self.contract.cross_names()}  # (B, Hkv, Se, D), fixed from now on
        return outputs[LOGITS][:, -1]

    def next(self, tokens: np.ndarray) -> np.ndarray:
        return self._call("decode", {INPUT_IDS: tokens, **self.cross, **self._feeds(tokens.shape[0])}, 1)[LOGITS][:, -1]

    def _feeds(self, batch: int) -> dict[str, np.ndarray]:
        feeds = {ENCODER_MASK: self.source_mask}
        if self.contract.static:
            feeds[WRITE_INDICES] = np.full(batch, self.length, dtype=np.int64)
        return feeds


def ort_runner(graphs) -> Runner:
    """A Runner over the sessions of runtime.session.LoadedGraphs (numpy in, numpy out)."""

    def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = graphs.session(graph)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    return run
