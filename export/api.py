"""export_model: a Hugging Face causal LM in, an export directory (graphs + manifest + tokenizer) out."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from kvgraph.graphs import GraphContract, KvgraphError, Manifest, ModelInfo, SpecialTokens, ValidationError
from kvgraph.graphs.contract import CACHE_MODES
from kvgraph.graphs.manifest import METADATA_KEY, WEIGHTS_FILE, WEIGHTS_INDEX, graph_file
from kvgraph.graphs.modes import CACHE_MODES as MODE_ADAPTERS
from kvgraph.graphs.modes import step_adapter
from kvgraph.graphs.onnx_files import embed_metadata, write_graphs
from kvgraph.graphs.quantization import QuantReport, QuantScheme, Quantizer, thresholds
from kvgraph.graphs.staging import check_destination, staged
from kvgraph.graphs.weight_store import WeightStore
from kvgraph.graphs.report import TOLERANCES, DiffRow, failures, format_table, graph_summaries
from kvgraph.export import memory
from kvgraph.export.config import ModelDims
from kvgraph.export.families import family_for
from kvgraph.export.layout import transposed_storage
from kvgraph.export.load import Source, first_line, library_versions, load_source
from kvgraph.export.scatter import SCATTER_OPSET
from kvgraph.export.stream import WeightStream
from kvgraph.export.trace import IR_VERSION, OPSET, optimize_graphs, trace_graphs
from kvgraph.export.validate import DECODE_STEPS, PROMPT_LENGTHS, SOURCE_LENGTHS
from kvgraph.export.validate import check_cases, reference_cases
from kvgraph.export.reference import torch_answers
from kvgraph.runtime.tools.quality import Workload, answer, compare
from kvgraph.runtime.tools.quantize_export import gate, publish_quantized, quantized_log_line

OPSETS = {"dynamic": OPSET, "static": SCATTER_OPSET}  # cache mode -> the opset its graphs need (TensorScatter: 24)
VALIDATION_BATCHES = {  # graph kind -> the batch export validation runs, as the manifest records it
    "decoder": f"2 rows, prompt lengths {PROMPT_LENGTHS[0]} and {PROMPT_LENGTHS[1]} (left-padded)",
    "encoder-decoder": f"2 sources, lengths {SOURCE_LENGTHS[0]} and {SOURCE_LENGTHS[1]} (right-padded)",
}

WEIGHTS_SLACK = 1.1  # the weights file may exceed the parameter bytes by at most 10 %
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    manifest: Manifest
    validation: list[DiffRow]
    phases: dict[str, dict[str, float | None]] = field(default_factory=dict)  # phase -> {"seconds", "peak_rss"}


def export_model(
    model_or_path: PreTrainedModel | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    all_logits: bool = False,
    cache: str = "dynamic",
    max_length: int | None = None,
    validate: bool = True,
    force: bool = False,
    trust_remote_code: bool = False,
    task: str | None = None,
    tokenizer: Any | None = None,
    quantize: QuantScheme | None = None,
    min_top1: float | None = None,
    max_ppl_ratio: float | None = None,
    log: Callable[[str], None] = lambda message: None,
    verbose: bool = False,
    trace_every_layer: bool = False,
) -> ExportResult:
    """Export prefill.onnx, decode.onnx and extend.onnx (+ weights, manifest, tokenizer files) into `out_dir`.

    cache="static" writes prefill.onnx and decode.onnx over fixed (B, Hkv, max_length, D) buffers
    instead (no extend.onnx: prefill at a write index past 0 is the extend step).

    quantize: quantize the weights (graphs/quantization.py) as the graphs are made, without writing float graphs or
    holding every float weight at once, and publish only if the quality report against the PyTorch model passes
    (min_top1 / max_ppl_ratio; defaults by bit width).

    trace_every_layer: trace each layer instead of tracing repeated layers once and copying them
    (export/repeated_layers.py), which is as exact and takes a fraction of the time.

    log gets the progress and one validation line per graph; verbose (or a failure) adds the table of every
    tensor and step. The directory appears only when everything succeeded: output is assembled in a temporary
    directory beside it and renamed at the end. Raises KvgraphError for user errors and
    ValidationError when the graphs disagree with PyTorch beyond the dtype's tolerance.
    """
    out = check_destination(Path(out_dir), force)
    _check_cache_options(cache, max_length)
    if quantize is not None:
        quantize.check()
        thresholds(quantize.bits, min_top1, max_ppl_ratio)
    source = load_source(model_or_path, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    family = family_for(source.model.config.model_type)
    dims = ModelDims.from_model(source.model)
    _check_task(dims, task, source.description)
    _check_static_fits(dims, max_length)
    if dims.encoder_decoder:
        _check_seq2seq_options(dims, cache, all_logits)
    kind = "encoder-decoder" if dims.encoder_decoder else "decoder"
    rings = _rings(dims, cache, max_length)
    contract = GraphContract(dims.num_layers, dims.num_kv_heads, dims.head_dim, dims.vocab_size, dtype, all_logits, cache, max_length,
                             kind, dims.hidden_size if dims.encoder_decoder else None, dims.value_head_dim, rings,
                             verify=not dims.encoder_decoder and not rings)
    mode = step_adapter(contract).cache.describe(contract)
    log(f"exporting {family.model_type} ({contract.num_layers} layers, {contract.num_kv_heads} KV heads, head dim {contract.head_dim}) as {dtype}, {mode}")
    if quantize is not None:
        _check_quantizable(source.model, contract, quantize, validate)
        limits = thresholds(quantize.bits, min_top1, max_ppl_ratio)
        return _export_quantized(source, family, contract, out, force, quantize, limits, log, not trace_every_layer)
    with staged(out, force) as staging, _remembered_interrupts() as interrupts:  # nothing half-written, also on Ctrl-C
        manifest, rows, phases = _build(source, family, contract, staging, validate, log, interrupts, verbose, not trace_every_layer)
    return ExportResult(out, manifest, rows, phases)


def _export_quantized(source: Source, family, contract: GraphContract, out: Path, force: bool, scheme: QuantScheme,
                      limits: tuple[float, float], log, repeat: bool = True) -> ExportResult:
    """Traced, optimized and quantized in memory, the float weights never all resident: the relaid weights live in a
    scratch file (export/layout.py) and each one leaves memory once it is quantized. No float graph is written; the
    quality report compares the quantized export with the PyTorch model itself (export/reference.py)."""
    with tempfile.TemporaryDirectory(prefix="kvgraph-quantize-") as scratch, staged(out, force) as staging, \
            _remembered_interrupts() as interrupts:
        phase = Phases(log, family.model_type, interrupts)
        parameter_bytes = _model_bytes(source.model)[0]
        with contextlib.ExitStack() as layout:
            with phase("layout"):
                layout.enter_context(transposed_storage(source.model, restore=not source.owned, scratch=Path(scratch)))
            report, manifest = _quantized_graphs(source, family, contract, staging, scheme, phase, parameter_bytes, repeat)
            log(quantized_log_line(report, scheme))
            workload = Workload.of(staging)
            with phase("reference"):  # the float side of the quality report: PyTorch, a layer of weights at a time
                reference = torch_answers(source.model, workload, Path(scratch) / "reference")
        source.release_weights()
        with phase("quality"):
            quality = compare(workload, reference, answer(staging, workload, Path(scratch) / "quantized", sequences=reference.sequences))
        log(quality.table("PyTorch"))
        gate(quality, limits)
        publish_quantized(manifest, staging, scheme, report, quality, limits, reference="pytorch")
    return ExportResult(out, Manifest.load(out), [], phase.measured)


def _quantized_graphs(source: Source, family, contract: GraphContract, staging: Path, scheme: QuantScheme, phase: Phases,
                      parameter_bytes: int, repeat: bool = True) -> tuple[QuantReport, Manifest]:
    """Trace, optimize, quantize and write the graphs (the float manifest, until the quality report passes)."""
    with phase("trace"):
        programs = trace_graphs(source.model, family, contract, phase.log, repeat)
    store = WeightStore()
    with phase("optimize"):
        graphs = optimize_graphs(programs, family, contract, store)
        del programs
    with phase("quantize"):
        report = Quantizer(scheme, _PagedStore(store)).quantize(graphs)
        store.release_unreferenced(graphs)  # the float weights' blobs: the transposed embedding's memory goes here
    with phase("write"):
        write_graphs(graphs, staging, WEIGHTS_FILE, WEIGHTS_INDEX, store)
        del graphs, store
        files = _copy_tokenizer(source, staging)
    manifest = _manifest(source, contract, files, [], False, parameter_bytes)
    manifest.write(staging)
    return report, manifest


class _PagedStore:
    """The weight store as the quantizer reads it: a float matrix a file holds leaves the process's memory as soon as
    the next one is read (its pages stay in the file)."""

    def __init__(self, store: WeightStore) -> None:
        self.store, self.last = store, None

    def array(self, tensor):
        if self.last is not None:
            memory.drop_file_pages(self.last.ctypes.data, self.last.nbytes)
        self.last = self.store.array(tensor)
        return self.last

    def tensor(self, array, name: str):
        return self.store.tensor(array, name)

    def key(self, tensor) -> str | None:
        return self.store.key(tensor)


def _check_quantizable(model: torch.nn.Module, contract: GraphContract, scheme: QuantScheme, validate: bool) -> None:
    """Before tracing: the cache mode takes quantized weights, --no-validate is not asked for (a quantized export is
    always scored against PyTorch), and the blocks fit."""
    reason = step_adapter(contract).quantization()
    if reason:
        raise KvgraphError(reason)
    if not validate:
        raise KvgraphError("--no-validate does not apply to --quantize: a quantized export is always scored against PyTorch "
                           "(to publish whatever the score, add --min-top1 0 --max-ppl-ratio 1e9)")
    _check_blocks(model, scheme)


def _check_blocks(model: torch.nn.Module, scheme: QuantScheme) -> None:
    """Every linear layer's input width is a whole number of blocks (a gathered table that is not, such as T5's relative
    position buckets, stays float: the quantizer records it under `kept`)."""
    widths = {f"{name} (in_features {module.in_features})": module.in_features for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear)}
    bad = [name for name, width in widths.items() if width % scheme.block_size]
    if bad:
        raise KvgraphError(f"block size {scheme.block_size} does not divide the input dimension of {bad[0]}"
                           f"{f' and {len(bad) - 1} more layers' if len(bad) > 1 else ''}; choose a block size that does")


def _build(source: Source, family, contract: GraphContract, staging: Path, validate: bool, log,
           interrupts: list[int], verbose: bool = False, repeat: bool = True) -> tuple[Manifest, list[DiffRow], dict]:
    phase = Phases(log, family.model_type, interrupts)
    model_bytes = _model_bytes(source.model)
    cases = []
    if validate:
        with phase("reference"):  # PyTorch's side of validation, while the model is whole
            cases = reference_cases(source.model, family, contract)
    with contextlib.ExitStack() as layout:
        with phase("layout"):  # linear weights stored as the graphs read them: the graphs' weights are the model's memory
            laid_out = layout.enter_context(transposed_storage(source.model, restore=not source.owned))
        store = WeightStore()  # the weights, once, while the graphs are copied and rewritten
        stream = layout.enter_context(WeightStream(staging / WEIGHTS_FILE, laid_out, store))  # written while tracing
        with phase("trace"):
            programs = trace_graphs(source.model, family, contract, phase.log, repeat)
        with phase("optimize"):
            graphs = optimize_graphs(programs, family, contract, store)
            del programs
        with phase("write"):
            weights_bytes = write_graphs(graphs, staging, WEIGHTS_FILE, WEIGHTS_INDEX, store, stream.join())
            del graphs, store
            _check_weights_once(model_bytes, weights_bytes)
            files = _copy_tokenizer(source, staging)
    log(f"wrote {', '.join(graph_file(name) for name in contract.graphs())} and {WEIGHTS_FILE} ({weights_bytes / 1e6:.1f} MB)")
    source.release_weights()  # onnxruntime's side of validation, and what follows, need only the config
    rows: list[DiffRow] = []
    if validate:
        with phase("validate"):
            rows = check_cases(staging, family, contract, cases)
        _gate(rows, contract, log, verbose)
    manifest = _manifest(source, contract, files, rows, validate, model_bytes[0])
    manifest.write(staging)
    for name in contract.graphs():
        embed_metadata(staging / graph_file(name), {METADATA_KEY: manifest.dumps()})
    return manifest, rows, phase.measured


def _gate(rows: list[DiffRow], contract: GraphContract, log, verbose: bool = False) -> None:
    """The one check every kind and cache mode passes before anything is published. Logs a line per graph; the
    table of every tensor and step too when something fails, or when verbose."""
    bad = failures(rows)
    log("validation against PyTorch:\n" + "\n".join(graph_summaries(rows, TOLERANCES[contract.dtype])))
    if bad or verbose:
        log("max |diff| per tensor and step:\n" + format_table(rows))
    if bad:
        raise ValidationError(
            f"validation failed: {len(bad)} tensors exceed the {contract.dtype} tolerance {TOLERANCES[contract.dtype]} "
            f"(first: {bad[0].graph} step {bad[0].step} {bad[0].tensor}, max |diff| {bad[0].max_abs_diff:.3e}); nothing was written"
        )


def _model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter bytes, tied weights counted once; buffer bytes)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()), sum(b.numel() * b.element_size() for b in model.buffers())


def _check_weights_once(model_bytes: tuple[int, int], weights_bytes: int) -> None:
    """The weights file holds each parameter once; buffers the graphs keep as constants count too
    (GPT-Neo's per-layer causal-mask buffer: 4 MB a layer, more than a tiny model's weights)."""
    parameter_bytes, buffer_bytes = model_bytes
    if weights_bytes > WEIGHTS_SLACK * (parameter_bytes + buffer_bytes):
        raise KvgraphError(f"{WEIGHTS_FILE} is {weights_bytes} bytes for {parameter_bytes} parameter bytes and {buffer_bytes} buffer "
                           "bytes: weights are duplicated")


@contextlib.contextmanager
def _remembered_interrupts():
    """Ctrl-C raises KeyboardInterrupt as usual, and is also remembered: a KeyboardInterrupt raised while
    Python runs an object finaliser is printed and dropped, and tracing runs thousands of them. The
    next phase boundary raises it again, so an interrupted export always stops."""
    interrupts: list[int] = []  # the signals seen
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield interrupts  # not ours to handle: another thread, or the application has its own handler
        return

    def interrupted(signum, frame):
        interrupts.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Phases:
    """Times each phase of an export, with the phase's peak resident memory, and logs it:
    `trace done in 12.3 s, peak RSS 2.6 GB (12.3 s so far)`.

    An unexpected error inside a phase becomes one line naming the model type and the phase
    (`kvgraph --debug export ...` shows the traceback); kvgraph's own errors already name more.
    """

    def __init__(self, log: Callable[[str], None], model_type: str, interrupts: list[int]) -> None:
        self.log, self.model_type, self.start = log, model_type, time.perf_counter()
        self.interrupts = interrupts  # Ctrl-C seen during the export (_remembered_interrupts)
        self.measured: dict[str, dict[str, float | None]] = {}  # phase -> {"seconds", "peak_rss"} (bytes; None off Linux)

    @contextlib.contextmanager
    def __call__(self, name: str):
        begin = time.perf_counter()
        memory.reset_peak()
        self.log(f"{name}...")
        try:
            if self.interrupts:
                raise KeyboardInterrupt
            yield
        except KvgraphError:
            raise
        except Exception as exc:
            raise KvgraphError(f"model type {self.model_type!r}: export failed during {name}: {type(exc).__name__}: "
                               f"{first_line(exc)}") from exc
        if self.interrupts:
            raise KeyboardInterrupt
        now, peak = time.perf_counter(), memory.peak_resident()
        self.measured[name] = {"seconds": now - begin, "peak_rss": peak}
        self.log(f"{name} done in {now - begin:.1f} s, peak RSS {memory.size_text(peak)} ({now - self.start:.1f} s so far)")


def _manifest(source: Source, contract: GraphContract, files: dict, rows: list[DiffRow], validated: bool, parameter_bytes: int) -> Manifest:
    dims = ModelDims.from_hf(source.model.config)  # config reads only; cheap
    windows = list(dims.windows) if any(w is not None for w in dims.windows) else None
    info = ModelInfo(dims.family, type(source.model).__name__, source.description, dims.max_positions, parameter_bytes, windows)
    validation = None
    if validated:
        validation = {
            "passed": not failures(rows),
            "batch": VALIDATION_BATCHES[contract.kind],
            "decode_steps": DECODE_STEPS,
            "tolerance": TOLERANCES[contract.dtype],
            "rows": [row.to_json() for row in rows],
        }
    files = {**{name: graph_file(name) for name in contract.graphs()}, "weights": WEIGHTS_FILE, "weights_index": WEIGHTS_INDEX, **files}
    return Manifest(contract, info, _special_tokens(source), OPSETS[contract.cache], IR_VERSION, library_versions(), files, validation)


def _special_tokens(source: Source) -> SpecialTokens:
    generation = source.model.generation_config
    config = source.model.config
    eos = generation.eos_token_id if generation.eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    bos = generation.bos_token_id if generation.bos_token_id is not None else getattr(config, "bos_token_id", None)
    pad = generation.pad_token_id if generation.pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None and source.tokenizer is not None:
        pad = source.tokenizer.pad_token_id
    start = getattr(generation, "decoder_start_token_id", None)
    start = start if start is not None else getattr(config, "decoder_start_token_id", None)
    return SpecialTokens(bos, tuple(int(t) for t in eos_ids), pad, start if config.is_encoder_decoder else None)


def _copy_tokenizer(source: Source, staging: Path) -> dict[str, str]:
    """Save tokenizer files and generation_config.json beside the graphs; returns role -> file."""
    scratch = staging / ".tokenizer"
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(str(scratch))
    source.model.generation_config.save_pretrained(str(scratch))
    files = {}
    for name in TOKENIZER_FILES:
        if (scratch / name).is_file():
            shutil.move(str(scratch / name), str(staging / name))
            files[name.rsplit(".", 1)[0]] = name
    shutil.rmtree(scratch)
    return files



def _check_cache_options(cache: str, max_length: int | None) -> None:
    if cache not in CACHE_MODES:
        raise KvgraphError(f"--cache must be one of {list(CACHE_MODES)}, got {cache!r}")
    problem = MODE_ADAPTERS[cache].option_problem(max_length)
    if problem:
        raise KvgraphError(problem)


TASKS = {"text-generation": False, "text2text-generation": True}  # task -> is encoder-decoder


def _check_task(dims: ModelDims, task: str | None, description: str) -> None:
    if task is None:
        return
    if task not in TASKS:
        raise KvgraphError(f"--task must be one of {sorted(TASKS)}, got {task!r}")
    if TASKS[task] != dims.encoder_decoder:
        kind = "an encoder-decoder (text2text-generation)" if dims.encoder_decoder else "a causal LM (text-generation)"
        raise KvgraphError(f"{description}: --task {task} was asked for, but model type {dims.family!r} is {kind}")


def _check_seq2seq_options(dims: ModelDims, cache: str, all_logits: bool) -> None:
    if all_logits:
        raise KvgraphError(f"model type {dims.family!r} is an encoder-decoder: --all-logits is not available for it yet")
    if dims.decoder_start_token_id is None:
        raise KvgraphError(f"model type {dims.family!r}: the config has no decoder_start_token_id; the decoder cannot start "
                           "(set it in config.json)")


def _rings(dims: ModelDims, cache: str, max_length: int | None) -> tuple[int | None, ...] | None:
    """Static decoder cache: windowed layers whose window W < N keep a ring of W positions."""
    if dims.encoder_decoder or len(dims.windows) != dims.num_layers:
        return None
    return MODE_ADAPTERS[cache].rings(tuple(dims.windows), max_length)


def _check_static_fits(dims: ModelDims, max_length: int | None) -> None:
    if max_length is None:
        return
    if dims.max_positions and max_length > dims.max_positions:
        raise KvgraphError(f"--max-length {max_length} exceeds the model's max positions ({dims.max_positions})")
