"""Export-time validation: the written graphs in onnxruntime against the PyTorch model.

Decoder-only: prefill and a few decode steps on a left-padded batch of 2, each side feeding its own
presents back, then one extend step (and the verify graph on the same tokens). Encoder-decoder: encoder, decoder prefill (self and cross K/V)
and decode steps on a right-padded batch of 2, both sides decoding from PyTorch's past. Every kind and
cache mode builds its feeds with the contract's step adapter (graphs/modes.py) and returns one
labelled max-abs-diff row per tensor and step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from kvgraph.graphs import GraphContract, KvgraphError
from kvgraph.graphs.contract import ATTENTION_MASK, ENCODER_HIDDEN, INPUT_IDS, LOGITS
from kvgraph.graphs.conventions import extend_position_ids, left_pad, right_pad
from kvgraph.graphs.manifest import graph_file
from kvgraph.graphs.modes import step_adapter
from kvgraph.graphs.report import DiffRow, compare, compare_step
from kvgraph.export.families import Family
from kvgraph.export.load import first_line
from kvgraph.export.seq2seq import seq2seq_steps
from kvgraph.export.wrappers import DecodeStep, PrefillStep

PROMPT_LENGTHS = (7, 4)  # the second row is left-padded by 3
SOURCE_LENGTHS = (7, 4)  # the second source is right-padded by 3
DECODE_STEPS = 3
EXTEND_TOKENS = 3  # the extend graph is checked once, after the decode steps


class OrtRunner:
    """The export's graphs in onnxruntime (numpy in and out); a failure names the model type, graph and step.
    Only the graph last run has an open session, so validation holds the weights once on this side."""

    def __init__(self, directory: Path, model_type: str, dtype: str = "float32") -> None:
        self.directory, self.model_type, self.dtype = Path(directory), model_type, dtype
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.step = 0

    def __call__(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session(graph)
        names = [o.name for o in session.get_outputs()]
        try:
            return dict(zip(names, session.run(names, feeds)))
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            raise KvgraphError(f"model type {self.model_type!r}: {graph_file(graph)} failed in onnxruntime during validation "
                               f"(step {self.step}): {first_line(exc)}") from exc

    def _session(self, graph: str) -> ort.InferenceSession:
        if graph not in self.sessions:
            self.sessions.clear()  # one session at a time: each holds its own copy of the weights
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # Prepacking copies every MatMul weight into the kernel's layout as the session starts: ~10 s and a second
            # copy of the weights per graph of a 1B model, for the handful of steps validation runs. The graph and its
            # numerics are the same either way (the steps then take ~2x as long).
            options.add_session_config_entry("session.disable_prepacking", "1")
            if self.dtype != "float32":
                _one_weight_at_a_time(options)
            try:
                self.sessions[graph] = ort.InferenceSession(str(self.directory / graph_file(graph)), options,
                                                            providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise KvgraphError(f"model type {self.model_type!r}: onnxruntime cannot load {graph_file(graph)} during validation "
                                   f"(step {self.step}): {first_line(exc)}") from exc
        return self.sessions[graph]


def _one_weight_at_a_time(options: ort.SessionOptions) -> None:
    """Half-precision graphs on the CPU provider, which has fp32 kernels only for most of their ops: onnxruntime wraps
    them in Casts, and would fold each weight's Cast into an fp32 copy as the session starts (and, in its default
    order, run them all before the first layer): 2x the fp16 weights held at once, 14.7 GB for a 3B model. Unfolded and
    in priority order, each weight's fp32 copy lives only while its MatMul runs. The graph is the one written; only
    onnxruntime's own rewrites are left out, for the few steps validation runs."""
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False


@dataclass
class Case:
    """One step as PyTorch ran it: the inputs both sides get, and PyTorch's outputs."""

    role: str  # prefill, decode, extend, verify (encoder-decoders: encoder, prefill, decode)
    step: int
    tokens: np.ndarray
    mask: np.ndarray
    expected: list[np.ndarray]  # [logits, *presents, (*cross)] or [encoder_hidden_states]
    feeds: list[np.ndarray] = field(default_factory=list)  # encoder-decoders: the past and cross K/V both sides read


def _check_decoder(directory: Path, family: Family, contract: GraphContract, cases: list[Case]) -> list[DiffRow]:
    """PyTorch's steps replayed in onnxruntime, each side feeding its own presents back."""
    adapter, runner = step_adapter(contract), OrtRunner(directory, family.model_type, contract.dtype)
    names, rows, past = [LOGITS, *contract.present_names()], [], []
    for case in cases:
        runner.step = case.step
        _, outputs = adapter.run(runner, case.role, case.tokens, case.mask, past)
        actual = adapter.step_outputs(outputs)
        rows += compare_step(adapter.graph(case.role), case.step, names, actual, case.expected, case.mask, contract.dtype, adapter.held())
        if case.role in ("prefill", "decode"):  # extend and verify run after the last decode step's past
            past = actual[1:]
    return rows


def _decoder_cases(model: torch.nn.Module, family: Family, contract: GraphContract) -> list[Case]:
    """Prefill, DECODE_STEPS greedy steps (on PyTorch's logits), then extend (and verify) on the same Q tokens."""
    reference = _TorchSteps(model, family, contract)
    ids, mask = _sample_batch(contract.vocab_size)
    cases = [Case("prefill", 0, ids, mask, reference.step("prefill", ids, mask, []))]
    for step in range(1, DECODE_STEPS + 1):
        token = cases[-1].expected[0][:, -1].argmax(-1)[:, None].astype(np.int64)  # greedy on PyTorch's logits
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        cases.append(Case("decode", step, token, mask, reference.step("decode", token, mask, cases[-1].expected[1:])))
    past = cases[-1].expected[1:]
    tokens = np.random.default_rng(1).integers(0, contract.vocab_size, size=(mask.shape[0], EXTEND_TOKENS))
    mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    cases.append(Case("extend", DECODE_STEPS + 1, tokens, mask, reference.step("extend", tokens, mask, past)))
    if contract.verify:  # the same Q tokens after the same past, logits at each of them
        cases.append(Case("verify", DECODE_STEPS + 2, tokens, mask, reference.step("verify", tokens, mask, past)))
    return cases


def _sample_batch(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]
    return left_pad(rows, pad_id=0)


class _TorchSteps:
    """The same wrappers that were traced, run eagerly in PyTorch (always with a dynamic cache)."""

    def __init__(self, model: torch.nn.Module, family: Family, contract: GraphContract) -> None:
        self.prefill_step = PrefillStep(model, family, 0 if contract.all_logits else 1)
        self.decode_step = DecodeStep(model, family)
        self.verify_step = DecodeStep(model, family, logits_to_keep=0)

    def step(self, role: str, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        wrapper = {"prefill": self.prefill_step, "verify": self.verify_step}.get(role, self.decode_step)
        return _eager(wrapper, ids, mask, extend_position_ids(mask, ids.shape[1]), *past)


def _eager(step: Callable, *arrays: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = step(*(torch.from_numpy(np.ascontiguousarray(x)) for x in arrays))
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs
    return [t.contiguous().numpy() for t in outputs]


def _check_seq2seq(directory: Path, family: Family, contract: GraphContract, cases: list[Case]) -> list[DiffRow]:
    """PyTorch's steps replayed in onnxruntime: both sides decode from PyTorch's past, so each step is checked alone."""
    adapter, runner = step_adapter(contract), OrtRunner(directory, family.model_type, contract.dtype)
    encoder, *steps = cases
    actual = runner("encoder", {INPUT_IDS: encoder.tokens, ATTENTION_MASK: encoder.mask})[ENCODER_HIDDEN]
    valid = encoder.mask == 1
    rows = [compare("encoder", 0, ENCODER_HIDDEN, actual[valid], encoder.expected[0][valid], contract.dtype)]
    names, layers = [LOGITS, *contract.present_names(), *contract.cross_names()], 2 * contract.num_layers
    for case in steps:
        runner.step = case.step
        other = {ENCODER_HIDDEN: encoder.expected[0]} if case.role == "prefill" else dict(zip(contract.cross_names(), case.feeds[layers:]))
        _, outputs = adapter.run(runner, case.role, case.tokens, encoder.mask, case.feeds[:layers], other)
        rows += [compare(case.role, case.step, n, a, e, contract.dtype) for n, a, e in zip(names, adapter.step_outputs(outputs), case.expected)]
    return rows


def _seq2seq_cases(model: torch.nn.Module, contract: GraphContract) -> list[Case]:
    """The encoder on a right-padded batch, the decoder's prefill, then DECODE_STEPS greedy steps, all in PyTorch."""
    torch_steps, rng = seq2seq_steps(model), np.random.default_rng(0)
    source, mask = right_pad([rng.integers(3, contract.vocab_size, size=n).tolist() for n in SOURCE_LENGTHS], pad_id=0)
    hidden = _eager(torch_steps["encoder"], source, mask)[0]  # both decoders read PyTorch's encoder output
    cases = [Case("encoder", 0, source, mask, [hidden])]
    tokens = np.full((len(SOURCE_LENGTHS), 1), model.config.decoder_start_token_id, dtype=np.int64)
    cases.append(Case("prefill", 0, tokens, mask, _eager(torch_steps["prefill"], tokens, hidden, mask)))
    layers = 2 * contract.num_layers
    cross = cases[-1].expected[1 + layers:]
    for step in range(1, DECODE_STEPS + 1):
        last = cases[-1].expected
        token = last[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        feeds = [*last[1: 1 + layers], *cross]
        cases.append(Case("decode", step, token, mask, _eager(torch_steps["decode"], token, mask, *feeds), feeds))
    return cases


CASES = {"decoder": _decoder_cases, "encoder-decoder": lambda model, family, contract: _seq2seq_cases(model, contract)}
CHECKS = {"decoder": _check_decoder, "encoder-decoder": _check_seq2seq}


def reference_cases(model: torch.nn.Module, family: Family, contract: GraphContract) -> list[Case]:
    """PyTorch's side of validation, run before anything is traced: each step's inputs and PyTorch's outputs.
    Decoder-only: prefill, greedy decode steps, then extend (and verify). Encoder-decoder: encoder, prefill, decode."""
    return CASES[contract.kind](model, family, contract)


def check_cases(directory: Path, family: Family, contract: GraphContract, cases: list[Case]) -> list[DiffRow]:
    """The written graphs in onnxruntime on the same inputs: one labelled max-abs-diff row per tensor and step."""
    return CHECKS[contract.kind](directory, family, contract, cases)
