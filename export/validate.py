"""Export-time validation: the written graphs in onnxruntime against the PyTorch model.

Runs prefill and a few decode steps on a left-padded batch of 2, feeding each side its own
presents as the next pasts, and returns one labelled max-abs-diff row per tensor and step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..graphs import GraphContract
from ..graphs.contract import ATTENTION_MASK, ENCODER_HIDDEN, ENCODER_MASK, INPUT_IDS, LOGITS, POSITION_IDS, WRITE_INDICES
from ..graphs.conventions import extend_position_ids, left_pad, prefill_position_ids, right_pad
from ..graphs.manifest import graph_file
from ..graphs.report import DiffRow, compare, compare_step
from .families import Family
from .wrappers import DecodeStep, PrefillStep

PROMPT_LENGTHS = (7, 4)  # the second row is left-padded by 3
DECODE_STEPS = 3
EXTEND_TOKENS = 3  # the extend graph is checked once, after the decode steps


class OrtGraphs:
    """The graphs of an export directory in onnxruntime, one call per step (numpy in and out).

    The interface is the dynamic cache's; for a static-cache export the buffers stay inside this
    object and each step returns the buffers' valid prefix (B, Hkv, P, D) as the presents.
    """

    def __init__(self, directory: str | Path, contract: GraphContract, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        self.contract = contract
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {
            name: ort.InferenceSession(str(Path(directory) / graph_file(name)), options, providers=list(providers))
            for name in contract.graphs()
        }
        self.buffers: list[np.ndarray] = []

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        # (B, S), (B, S) -> [logits (B, 1|S, V), present.0.key (B, Hkv, S, D), ...]
        if self.contract.static:
            batch, shape = input_ids.shape[0], (self.contract.num_kv_heads, self.contract.max_length, self.contract.head_dim)
            self.buffers = [np.zeros((batch, *shape), dtype=self.contract.dtype) for _ in self.contract.cache_slots()]
            return self._static("prefill", input_ids, attention_mask, prefill_position_ids(attention_mask))
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: prefill_position_ids(attention_mask)}
        return self.sessions["prefill"].run(None, feeds)

    def _static(self, graph: str, input_ids, attention_mask, positions) -> list[np.ndarray]:
        batch, length = attention_mask.shape
        written = length - input_ids.shape[1]
        mask = np.zeros((batch, self.contract.max_length), dtype=np.int64)  # (B, N)
        mask[:, :length] = attention_mask
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: mask, POSITION_IDS: positions,
                 WRITE_INDICES: np.full(batch, written, dtype=np.int64), **dict(zip(self.contract.past_names(), self.buffers))}
        logits, *self.buffers = self.sessions[graph].run(None, feeds)
        return [logits, *(buffer[:, :, :length] for buffer in self.buffers)]

    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        # (B, 1), (B, P+1), past (B, Hkv, P, D) each -> [logits (B, 1, V), present (B, Hkv, P+1, D) ...]
        return self._after_past("decode", input_ids, attention_mask, past)

    def extend(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        # (B, Q), (B, P+Q), past (B, Hkv, P, D) each -> [logits (B, 1, V), present (B, Hkv, P+Q, D) ...]
        return self._after_past("extend", input_ids, attention_mask, past)

    def _after_past(self, graph: str, input_ids, attention_mask, past) -> list[np.ndarray]:
        positions = extend_position_ids(attention_mask, input_ids.shape[1])
        if self.contract.static:  # the buffers hold `past`; extend is the prefill graph at write index P
            return self._static("prefill" if graph == "extend" else graph, input_ids, attention_mask, positions)
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: positions}
        feeds.update(zip(self.contract.past_names(), past))
        return self.sessions[graph].run(None, feeds)


def validate_export(directory: Path, model: torch.nn.Module, family: Family, contract: GraphContract, steps: int = DECODE_STEPS) -> list[DiffRow]:
    graphs = OrtGraphs(directory, contract)
    reference = _TorchSteps(model, family, contract)
    ids, mask = _sample_batch(contract.vocab_size)
    names = [LOGITS, *contract.present_names()]
    actual, expected = graphs.prefill(ids, mask), reference.prefill(ids, mask)
    rows = compare_step("prefill", 0, names, actual, expected, mask, contract.dtype)
    for step in range(1, steps + 1):
        token = expected[0][:, -1].argmax(-1)[:, None].astype(np.int64)  # greedy on PyTorch's logits
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        actual = graphs.decode(token, mask, actual[1:])
        expected = reference.decode(token, mask, expected[1:])
        rows += compare_step("decode", step, names, actual, expected, mask, contract.dtype)
    tokens = np.random.default_rng(1).integers(0, contract.vocab_size, size=(mask.shape[0], EXTEND_TOKENS))
    mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    actual = graphs.extend(tokens, mask, actual[1:])
    expected = reference.extend(tokens, mask, expected[1:])
    rows += compare_step("prefill" if contract.static else "extend", steps + 1, names, actual, expected, mask, contract.dtype)
    return rows


def _sample_batch(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]
    return left_pad(rows, pad_id=0)


class _TorchSteps:
    """The same wrappers that were traced, run eagerly in PyTorch."""

    def __init__(self, model: torch.nn.Module, family: Family, contract: GraphContract) -> None:
        self.prefill_step = PrefillStep(model, family, 0 if contract.all_logits else 1)
        self.decode_step = DecodeStep(model, family)
        self.dtype = next(model.parameters()).dtype

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return self._run(self.prefill_step, ids, mask, prefill_position_ids(mask))

    def decode(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        return self._run(self.decode_step, ids, mask, extend_position_ids(mask, 1), *past)

    def extend(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        return self._run(self.decode_step, ids, mask, extend_position_ids(mask, ids.shape[1]), *past)

    def _run(self, step, ids, mask, positions, *past) -> list[np.ndarray]:
        with torch.no_grad():
            outputs = step(*(torch.from_numpy(np.ascontiguousarray(x)) for x in (ids, mask, positions, *past)))
        return [t.contiguous().numpy() for t in outputs]


SOURCE_LENGTHS = (7, 4)  # the second source is right-padded by 3


def validate_seq2seq(directory: Path, model: torch.nn.Module, contract: GraphContract, start_token: int, steps: int = DECODE_STEPS) -> list[DiffRow]:
    """Encoder, decoder prefill (self and cross K/V) and `steps` greedy decode steps against PyTorch.

    Both sides decode from PyTorch's past at each step, so every step is checked on its own. A
    static export gets that past copied into zero buffers of its length, written at index P; its
    presents are compared on their first P + 1 positions.
    """
    from .seq2seq import seq2seq_steps

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(Path(directory) / graph_file(name)), options, providers=["CPUExecutionProvider"])
                for name in contract.graphs()}
    torch_steps = seq2seq_steps(model)

    def both(graph: str, feeds: dict[str, np.ndarray], past: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        values = list(feeds.values())
        if graph == "decode":  # the torch step takes (ids, mask, *past, *cross)
            values = values[:2] + list(past) + values[2:]
        with torch.no_grad():
            expected = torch_steps[graph](*(torch.from_numpy(np.ascontiguousarray(v)) for v in values))
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        return _ort_seq2seq(sessions[graph], contract, graph, feeds, past), [t.contiguous().numpy() for t in expected]

    rng = np.random.default_rng(0)
    rows = [rng.integers(3, contract.vocab_size, size=n).tolist() for n in SOURCE_LENGTHS]
    source, mask = right_pad(rows, pad_id=0)
    actual, expected = both("encoder", {INPUT_IDS: source, ATTENTION_MASK: mask})
    report = [compare("encoder", 0, ENCODER_HIDDEN, actual[0][mask == 1], expected[0][mask == 1], contract.dtype)]
    hidden = expected[0]  # both decoders read the same encoder output
    tokens = np.full((len(rows), 1), start_token, dtype=np.int64)
    actual, expected = both("prefill", {INPUT_IDS: tokens, ENCODER_HIDDEN: hidden, ENCODER_MASK: mask})
    names = [LOGITS, *contract.present_names(), *contract.cross_names()]
    report += [compare("prefill", 0, n, a, e, contract.dtype) for n, a, e in zip(names, actual, expected)]
    layers = 2 * contract.num_layers
    cross = expected[1 + layers:]
    past = expected[1: 1 + layers]
    for step in range(1, steps + 1):
        token = expected[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        feeds = {INPUT_IDS: token, ENCODER_MASK: mask, **dict(zip(contract.cross_names(), cross))}
        actual, expected = both("decode", feeds, past)
        report += [compare("decode", step, n, a, e, contract.dtype) for n, a, e in zip([LOGITS, *contract.present_names()], actual, expected)]
        past = expected[1:]
    return report


def _ort_seq2seq(session, contract: GraphContract, graph: str, feeds: dict, past: list[np.ndarray] | None) -> list[np.ndarray]:
    """Run one seq2seq graph; `past` is the dynamic (B, Hkv, P, D) self-attention cache (decode only)."""
    feeds = dict(feeds)
    if not contract.static or graph == "encoder":
        feeds.update(zip(contract.past_names(), past or []))
        return session.run(None, feeds)
    batch = feeds[INPUT_IDS].shape[0]
    written = past[0].shape[2] if past else 0
    buffers = [np.zeros((batch, contract.num_kv_heads, contract.max_length, contract.head_dim), dtype=contract.dtype) for _ in contract.cache_slots()]
    for buffer, tensor in zip(buffers, past or []):
        buffer[:, :, :written] = tensor
    feeds[WRITE_INDICES] = np.full(batch, written, dtype=np.int64)
    feeds.update(zip(contract.past_names(), buffers))
    logits, *rest = session.run(None, feeds)
    end = written + feeds[INPUT_IDS].shape[1]
    layers = 2 * contract.num_layers
    return [logits, *(b[:, :, :end] for b in rest[:layers]), *rest[layers:]]
