"""Export-time validation: the written graphs in onnxruntime against the PyTorch model.

Decoder-only: prefill and a few decode steps on a left-padded batch of 2, each side feeding its own
presents back, then one extend step (and the verify graph on the same tokens). Encoder-decoder: encoder, decoder prefill (self and cross K/V)
and decode steps on a right-padded batch of 2, both sides decoding from PyTorch's past. Every kind and
cache mode builds its feeds with the contract's step adapter (graphs/modes.py) and returns one
labelled max-abs-diff row per tensor and step.
"""

from __future__ import annotations

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

    def __init__(self, directory: Path, model_type: str) -> None:
        self.directory, self.model_type = Path(directory), model_type
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
            try:
                self.sessions[graph] = ort.InferenceSession(str(self.directory / graph_file(graph)), options,
                                                            providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise KvgraphError(f"model type {self.model_type!r}: onnxruntime cannot load {graph_file(graph)} during validation "
                                   f"(step {self.step}): {first_line(exc)}") from exc
        return self.sessions[graph]


def validate_decoder(directory: Path, model: torch.nn.Module, family: Family, contract: GraphContract) -> list[DiffRow]:
    adapter, runner = step_adapter(contract), OrtRunner(directory, family.model_type)
    reference = _TorchSteps(model, family, contract)
    names = [LOGITS, *contract.present_names()]

    def both(role: str, step: int, tokens, mask, actual_past, expected_past):
        runner.step = step
        _, outputs = adapter.run(runner, role, tokens, mask, actual_past)
        actual, expected = adapter.step_outputs(outputs), reference.step(role, tokens, mask, expected_past)
        return actual, expected, compare_step(adapter.graph(role), step, names, actual, expected, mask, contract.dtype, adapter.held())

    ids, mask = _sample_batch(contract.vocab_size)
    actual, expected, rows = both("prefill", 0, ids, mask, [], [])
    for step in range(1, DECODE_STEPS + 1):
        token = expected[0][:, -1].argmax(-1)[:, None].astype(np.int64)  # greedy on PyTorch's logits
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        actual, expected, more = both("decode", step, token, mask, actual[1:], expected[1:])
        rows += more
    tokens = np.random.default_rng(1).integers(0, contract.vocab_size, size=(mask.shape[0], EXTEND_TOKENS))
    mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    rows += both("extend", DECODE_STEPS + 1, tokens, mask, actual[1:], expected[1:])[2]
    if contract.verify:  # the same Q tokens after the same past, logits at each of them
        rows += both("verify", DECODE_STEPS + 2, tokens, mask, actual[1:], expected[1:])[2]
    return rows


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


def validate_seq2seq(directory: Path, model: torch.nn.Module, family: Family, contract: GraphContract) -> list[DiffRow]:
    """Encoder, decoder prefill (self and cross K/V) and greedy decode steps against PyTorch.

    Both sides decode from PyTorch's past at each step, so every step is checked on its own.
    """
    adapter, runner, torch_steps = step_adapter(contract), OrtRunner(directory, family.model_type), seq2seq_steps(model)
    rng = np.random.default_rng(0)
    source, mask = right_pad([rng.integers(3, contract.vocab_size, size=n).tolist() for n in SOURCE_LENGTHS], pad_id=0)
    actual = runner("encoder", {INPUT_IDS: source, ATTENTION_MASK: mask})[ENCODER_HIDDEN]
    hidden = _eager(torch_steps["encoder"], source, mask)[0]  # both decoders read PyTorch's encoder output
    rows = [compare("encoder", 0, ENCODER_HIDDEN, actual[mask == 1], hidden[mask == 1], contract.dtype)]
    tokens = np.full((len(SOURCE_LENGTHS), 1), model.config.decoder_start_token_id, dtype=np.int64)
    _, outputs = adapter.run(runner, "prefill", tokens, mask, [], {ENCODER_HIDDEN: hidden})
    expected = _eager(torch_steps["prefill"], tokens, hidden, mask)
    names = [LOGITS, *contract.present_names(), *contract.cross_names()]
    rows += [compare("prefill", 0, n, a, e, contract.dtype) for n, a, e in zip(names, adapter.step_outputs(outputs), expected)]
    layers = 2 * contract.num_layers
    past, cross = expected[1: 1 + layers], expected[1 + layers:]
    for step in range(1, DECODE_STEPS + 1):
        runner.step = step
        token = expected[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        _, outputs = adapter.run(runner, "decode", token, mask, past, dict(zip(contract.cross_names(), cross)))
        expected = _eager(torch_steps["decode"], token, mask, *past, *cross)
        rows += [compare("decode", step, n, a, e, contract.dtype) for n, a, e in zip(names, adapter.step_outputs(outputs), expected)]
        past = expected[1:]
    return rows


VALIDATORS = {"decoder": validate_decoder, "encoder-decoder": validate_seq2seq}


def validate(directory: Path, model: torch.nn.Module, family: Family, contract: GraphContract) -> list[DiffRow]:
    """The contract's graphs against PyTorch, whatever their kind and cache mode."""
    return VALIDATORS[contract.kind](directory, model, family, contract)
