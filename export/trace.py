"""Tracing the prefill and decode wrappers into ONNX with torch.onnx (dynamo exporter)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import onnx
import onnx_ir as ir
import torch

from kvgraph.graphs import GraphContract, KvgraphError, io_mismatches
from kvgraph.graphs.contract import BATCH, NEW, PAST, PAST_PLUS_NEW, SEQUENCE, VERIFY
from kvgraph.graphs.derive import prefill_from_extend
from kvgraph.graphs.modes import step_adapter
from kvgraph.graphs.onnx_files import apply_shapes, read_io
from kvgraph.graphs.rewrites.every_position import keep_every_position
from kvgraph.graphs.rewrites.grouped_heads import attend_grouped_heads_directly
from kvgraph.graphs.rewrites.packed_heads import attend_packed_heads
from kvgraph.graphs.rewrites.strip_metadata import strip_exporter_metadata
from kvgraph.graphs.rewrites.transposed_embeddings import share_embeddings_across_graphs, store_embedding_transposed
from kvgraph.graphs.rewrites.untie_transposed import untie_transposed_copies
from kvgraph.graphs.rewrites.zero_additions import drop_zero_additions
from kvgraph.graphs.weight_store import INLINE_LIMIT, WeightStore, location
from kvgraph.export import memory
from kvgraph.export.experts import traceable_experts
from kvgraph.export.families import Family
from kvgraph.export.optimize import optimize
from kvgraph.export.repeated_layers import TRACED, RepeatPlan, cut_to_traced, repeat_plan, stitch_layers, traced_contract
from kvgraph.export.scatter import to_standard_tensor_scatter
from kvgraph.export.translations import custom_translations
from kvgraph.export.seq2seq import (seq2seq_dynamic_shapes, seq2seq_examples, seq2seq_static_dynamic_shapes, seq2seq_static_examples,
                                    seq2seq_static_steps, seq2seq_steps)
from kvgraph.export.wrappers import DecodeStep, PrefillStep, StaticStep

OPSET = 23  # the exporter fuses RMSNormalization / RotaryEmbedding / Attention at exactly 23
IR_VERSION = 10  # onnxruntime reads IR <= 13; onnx writes 14 by default

# Example sizes for tracing; all distinct and > 1 so no dimension gets specialised.
_BATCH, _PROMPT, _PAST, _NEW = 2, 7, 5, 3


class TraceError(KvgraphError):
    """torch.onnx could not turn the model into a graph."""


def trace_graphs(model: torch.nn.Module, family: Family, contract: GraphContract, log=lambda message: None,
                 repeat: bool = True) -> dict[str, Any]:
    """Capture the contract's graphs with torch.onnx, unoptimized: graph name -> ONNXProgram.

    Decoder-only, dynamic: one trace, extend (the decode wrapper with Q new tokens after a past of
    P). optimize_graphs derives the others: decode is extend with Q pinned to 1 on its inputs and
    outputs (the same nodes, so bit-identical results, and as fast as a separately traced Q = 1 graph:
    SmolLM2 45.5 ms vs 45.5 ms a step), and prefill is extend after an empty past (graphs/derive.py),
    which halves the export's time. --all-logits keeps a traced prefill (extend keeps the last
    position only). Static: one trace, Q tokens into the buffers; decode is the same graph.

    Repeated layers are traced once (export/repeated_layers.py) unless `repeat` is false; log says which way it went.
    """
    with traceable_experts(model):
        plan, reason = repeat_plan(model, contract) if repeat else (None, "asked to trace every layer")
        programs = _traced_once(model, family, contract, plan) if plan else None
        if isinstance(programs, str):
            plan, reason = None, programs
        if plan is None:
            log(f"tracing all {contract.num_layers} layers ({reason})")
            return _trace(model, family, contract)
        log(f"traced {TRACED} of {contract.num_layers} layers; layers {TRACED}..{contract.num_layers - 1} are copies of layer {TRACED - 1}")
        return programs


def _traced_once(model: torch.nn.Module, family: Family, contract: GraphContract, plan: RepeatPlan) -> dict[str, Any] | str:
    """The programs of the model cut to its first layers, stitched back to every layer; or why they could not be."""
    with cut_to_traced(model, plan):
        programs = _trace(model, family, traced_contract(contract))
    tensors = {f"model.{name}": tensor for name, tensor in [*model.named_parameters(remove_duplicate=False),
                                                             *model.named_buffers(remove_duplicate=False)]}
    for name, program in programs.items():
        reason = stitch_layers(program.model, plan, contract, tensors)
        if reason:
            return f"{name} graph: {reason}"
    return programs


def _trace(model: torch.nn.Module, family: Family, contract: GraphContract) -> dict[str, Any]:
    return TRACERS[contract.kind, contract.cache](model, family, contract)


def _trace_decoder_dynamic(model: torch.nn.Module, family: Family, contract: GraphContract) -> dict[str, Any]:
    extend = {"extend": _export(DecodeStep(model, family), _extend_example(model, contract), "extend", contract)}
    if not contract.all_logits:  # prefill is extend after an empty past (optimize_graphs derives it)
        return extend
    prefill = _export(PrefillStep(model, family, logits_to_keep=0), _prefill_example(contract), "prefill", contract)
    return {"prefill": prefill, **extend}


def _trace_decoder_static(model: torch.nn.Module, family: Family, contract: GraphContract) -> dict[str, Any]:
    step = StaticStep(model, family, 0 if contract.all_logits else 1)
    return {"prefill": _export(step, _static_example(model, contract), "prefill", contract, _static_shapes(contract))}


def _seq2seq_tracer(make_steps, make_examples, shapes):
    def trace(model: torch.nn.Module, family: Family, contract: GraphContract) -> dict[str, Any]:
        examples = make_examples(model, contract)
        return {name: _export(step, examples[name], name, contract, shapes(name, contract)) for name, step in make_steps(model).items()}

    return trace


TRACERS = {  # (graph kind, cache mode) -> what is traced; optimize_graphs derives or copies the rest
    ("decoder", "dynamic"): _trace_decoder_dynamic,
    ("decoder", "static"): _trace_decoder_static,
    ("encoder-decoder", "dynamic"): _seq2seq_tracer(seq2seq_steps, seq2seq_examples, seq2seq_dynamic_shapes),
    ("encoder-decoder", "static"): _seq2seq_tracer(seq2seq_static_steps, seq2seq_static_examples, seq2seq_static_dynamic_shapes),
}


COPIES = {"decode": ("extend", "prefill"), VERIFY: ("extend", "prefill")}  # not traced: a copy of the first traced one of these


def optimize_graphs(programs: dict[str, Any], family: Family, contract: GraphContract, store: WeightStore) -> dict[str, onnx.ModelProto]:
    """Optimize each traced program (onnxscript: folding, fusions) and apply kvgraph's rewrites; check the contract.

    `programs` is emptied as it goes: each program's in-memory model is dropped once its graph is made, and the
    graph's weights move into `store` before any copy is made, so the weights are held once, not once per graph.
    """
    graphs = {name: _optimized(programs.pop(name), name, family, store) for name in list(programs)}
    if "prefill" not in graphs:
        graphs["prefill"] = prefill_from_extend(graphs["extend"], contract)
    for name in contract.graphs():
        if name not in graphs:
            graphs[name] = copy.deepcopy(next(graphs[source] for source in COPIES[name] if source in graphs))
    if contract.verify:  # a copy of the graph that runs Q tokens after a past
        keep_every_position(graphs[VERIFY], contract, step_adapter(contract).graph("extend"))
    share_embeddings_across_graphs(graphs, store)  # encoder-decoders: the encoder's embedding is the decoder's lm_head
    graphs = {name: graphs[name] for name in contract.graphs()}
    for name, proto in graphs.items():
        inputs, outputs = contract.graphs()[name]
        apply_shapes(proto, inputs, outputs)
        read_inputs, read_outputs = read_io(proto)
        reasons = io_mismatches(name, inputs, read_inputs) + io_mismatches(name, outputs, read_outputs)
        if reasons:
            raise TraceError(f"model type {family.model_type!r}: the traced graph breaks the contract: " + "; ".join(reasons))
    return graphs


def _optimized(program, graph: str, family: Family, store: WeightStore) -> onnx.ModelProto:
    try:
        with _quiet():
            optimize(program.model)
            _weights_into_store(program.model, store)
            proto = program.model_proto  # references only: no weight is copied into the protobuf
    except Exception as exc:  # the optimizer raises many types; all mean "cannot optimize this graph"
        raise TraceError(f"model type {family.model_type!r}: {graph} graph failed while optimizing: {_summary(exc)}") from exc
    proto.ir_version = IR_VERSION
    to_standard_tensor_scatter(proto)
    untie_transposed_copies(proto, store)
    store_embedding_transposed(proto, store)  # no session folds a second (H, V) copy of a tied embedding
    attend_grouped_heads_directly(proto)  # GQA: the Attention op reads Hkv heads, no per-step copy of the cache
    attend_packed_heads(proto)  # Q, K, V and the output (B, S, H·D); a dynamic cache's Concat inside the op
    drop_zero_additions(proto, store)  # BART-like final_logits_bias: zeros, neither stored nor added
    strip_exporter_metadata(proto)
    return proto


def _weights_into_store(model: ir.Model, store: WeightStore) -> None:
    """Every large initializer's bytes into the store (a parameter's own memory, not a copy), a reference in its place."""
    values = [value for value in model.graph.initializers.values() if value.const_value is not None
              and not isinstance(value.const_value, ir.ExternalTensor) and value.const_value.nbytes >= INLINE_LIMIT]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # hashing the bytes releases the GIL: ~2x on 2 cores
        keys = list(pool.map(lambda value: _put(store, value.const_value.numpy(), int(value.const_value.dtype)), values))
    for value, key in zip(values, keys):
        tensor = value.const_value
        value.const_value = ir.ExternalTensor(location(key), offset=0, length=tensor.nbytes, dtype=tensor.dtype, shape=tensor.shape,
                                              name=value.name)


def _put(store: WeightStore, array, data_type: int) -> str:
    """Into the store; a weight a file holds (a mapped checkpoint, a quantized export's relaid weights) leaves the
    process's memory again once hashed: its pages come back from the file when read."""
    key = store.put(array, data_type)
    memory.drop_file_pages(array.ctypes.data, array.nbytes)
    return key


def _prefill_example(contract: GraphContract):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, contract.vocab_size, (_BATCH, _PROMPT), generator=generator)
    mask = torch.ones(_BATCH, _PROMPT, dtype=torch.int64)
    mask[1, :2] = 0  # a left-padded row, so the traced graph sees a real padding mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return (ids, mask, positions)


def _extend_example(model: torch.nn.Module, contract: GraphContract):
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, contract.vocab_size, (_BATCH, _NEW), generator=generator)
    mask = torch.ones(_BATCH, _PAST + _NEW, dtype=torch.int64)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1)[:, -_NEW:]
    past = tuple(torch.randn(contract.cache_shape(kind, _BATCH, _PAST), generator=generator).to(dtype)
                 for _, kind in contract.cache_slots())  # (B, Hkv, P, D) each
    return (ids, mask, positions, *past)


def _static_example(model: torch.nn.Module, contract: GraphContract):
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, contract.vocab_size, (_BATCH, _NEW), generator=generator)
    mask = torch.zeros(_BATCH, contract.max_length, dtype=torch.int64)
    mask[:, : 1 + _NEW] = 1
    mask[1, 0] = 0  # a left-padded row
    positions = (mask.cumsum(-1) - 1)[:, 1 : 1 + _NEW]
    write_indices = torch.ones(_BATCH, dtype=torch.int64)
    buffers = tuple(torch.randn(contract.cache_shape(kind, _BATCH, contract.buffer_length(layer)), generator=generator).to(dtype)
                    for layer, kind in contract.cache_slots())  # (B, Hkv, N, D) each, (B, Hkv, W, D) for a ring
    return (ids, mask, positions, write_indices, *buffers)


def _static_shapes(contract: GraphContract):
    """Only Q and B vary; the buffers' N is fixed."""
    batch = torch.export.Dim(BATCH)
    new = {0: batch, 1: torch.export.Dim(SEQUENCE)}
    return (new, {0: batch}, new, {0: batch}, tuple({0: batch} for _ in contract.cache_slots()))


def _dynamic_shapes(graph: str, contract: GraphContract):
    batch = torch.export.Dim(BATCH)
    if graph == "prefill":
        sequence = torch.export.Dim(SEQUENCE)
        token = {0: batch, 1: sequence}
        return (token, token, token)
    cache = tuple({0: batch, 2: torch.export.Dim(PAST)} for _ in contract.cache_slots())
    new = {0: batch, 1: torch.export.Dim(NEW)}
    # torch.export cannot add two dims (past + new): the mask length gets a dim of its own
    return (new, {0: batch, 1: torch.export.Dim(PAST_PLUS_NEW.replace("+", "_plus_"))}, new, cache)


def _export(step: torch.nn.Module, example: tuple, graph: str, contract: GraphContract, dynamic_shapes=None):
    inputs, outputs = contract.graphs()[graph]
    model_type = step.model.config.model_type
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                step.eval(),
                example,
                dynamo=True,
                opset_version=OPSET,
                input_names=[spec.name for spec in inputs],
                output_names=[spec.name for spec in outputs],
                dynamic_shapes=dynamic_shapes if dynamic_shapes is not None else _dynamic_shapes(graph, contract),
                verbose=False,
                optimize=False,  # optimize_graphs does it, timed as its own phase
                custom_translation_table=custom_translations(),
            )
    except Exception as exc:  # torch.export / onnx translation raise many types; all mean "cannot trace"
        raise TraceError(f"model type {model_type!r}: {graph} graph failed at {_failing_step(exc)}: {_summary(exc)}") from exc
    return program


def _failing_step(exc: Exception) -> str:
    text = str(exc)
    if "torch.export" in text and "step 1/3" in text:
        return "step 1/3 (torch.export capture)"
    if "step 2/3" in text or "decompos" in text.lower():
        return "step 2/3 (decomposition)"
    if "step 3/3" in text or "translat" in text.lower():
        return "step 3/3 (translation to ONNX)"
    return f"tracing ({type(exc).__name__})"


def _summary(exc: BaseException) -> str:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0] if lines else ''}"[:500]


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings; kvgraph prints its own summary instead."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
