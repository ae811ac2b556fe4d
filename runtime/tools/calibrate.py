"""Calibration for quantization: what the float export's activations say about its matrices.

    calibration = Calibration(float_dir)                  # the prefill graph, weights fed as inputs, on calibration text
    importance = calibration.importance()                 # {matrix: mean squared activation of each input channel}
    inputs = calibration.inputs()                         # {matrix: (tokens, K) its inputs on the calibration text}
    costs = calibration.costs(quantize)                   # {matrix: KL(float || the model with only it quantized)}

Each matrix is measured and chosen alone, not with its siblings (q, k and v; gate and up): the quantizer multiplies
the siblings that end at one width as one matrix (graphs/rewrites/fused_projections.py), and choosing per group cost
1.3 points of top-1 agreement on SmolLM2 at the same size for no measurable decode speed.

The text is calibration_text.txt beside this module: prose written for this project (no copyright of others), a
different text from the quality report's, so a quantization is never tuned on what scores it. One session serves
every measurement: the matrices are graph inputs, so measuring a matrix is one run with its quantized values fed in
place of the float ones (the others are the float export's own bytes, read from its weights file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kvgraph.graphs.awq_folds import Fold, apply_fold, awq_folds, awq_scale
from kvgraph.graphs.block_rounding import BlockRounding, block_bytes
from kvgraph.graphs.contract import ATTENTION_MASK, ENCODER_HIDDEN, INPUT_IDS
from kvgraph.graphs.errors import KvgraphError
from kvgraph.graphs.manifest import Manifest, graph_file
from kvgraph.graphs.modes import step_adapter
from kvgraph.graphs.quantization import MIX_ROOM, QuantScheme, check_block, choose_bits, expose, gathered_weights, matmul_weights
from kvgraph.graphs.safety import check_graph_file
from kvgraph.graphs.weight_store import SharedNames
from kvgraph.runtime.core.sampling import log_softmax
from kvgraph.runtime.core.text import TextCodec
from kvgraph.runtime.tools.quality import every_position_prefill, prefill_session

TEXT = Path(__file__).with_name("calibration_text.txt")
WINDOW = 128  # tokens a calibration window holds (fewer if the export holds fewer)
WINDOWS = 24  # at most: the importance and GPTQ's inputs see every window (GPTQ's Hessians need thousands of tokens)
COST_WINDOWS = 2  # the windows each matrix's KL is measured on (one run per matrix)
BATCH = 2  # windows per run
AWQ_WINDOWS = 4  # the windows whose inputs AWQ's scale search reads (512 tokens)


class _Part:
    """One graph of the calibration (the prefill graph; an encoder-decoder's encoder too): a session with every
    MatMul's activation an output (under `graph:name`) and its matrices and AWQ's constants inputs, fed by shared name
    (graphs/weight_store.py's SharedNames)."""

    def __init__(self, directory: Path, name: str, model, names: SharedNames, threads: int | None) -> None:
        graph = model.graph
        shared = names.graph(name, graph)
        activations = matmul_weights(graph)  # local weight -> local activation
        gathered = gathered_weights(graph)
        self.name = name
        self.qualified = {a: f"{name}:{a}" for a in activations.values()}  # local activation -> its name in run()'s outputs
        self.activation_of = {shared[w]: self.qualified[a] for w, a in activations.items()}
        matrices = [w for w in activations if w not in gathered]
        self.matrices = [shared[w] for w in matrices]
        tensors = {t.name: t for t in graph.initializer}
        self.gathered = {shared[n]: tuple(tensors[n].dims) for n in gathered if n in tensors and len(tensors[n].dims) == 2}
        folds = awq_folds(graph)
        self.folds = [Fold(f"{name}:{f.activation}", tuple(shared[m] for m in f.matrices), tuple((shared[c], axis) for c, axis in f.divided))
                      for f in folds]
        constants = sorted({c for f in folds for c, _ in f.divided} - set(matrices))
        self.fed = {shared[w]: w for w in matrices + constants}  # shared -> local
        self.floats = {s: _mapped(directory, tensors[w]) for s, w in self.fed.items()}  # read from the file as runs need them
        self.taken = set(shared.values())
        inputs = {i.name for i in graph.input}
        shown = sorted(set(activations.values()) - inputs)  # a graph input MatMuls read (the encoder's states) is in the feeds
        expose(model, shown, list(self.fed.values()))
        self.session = prefill_session(model, directory, threads)
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's outputs by name, its activations by `graph:name`."""
        outputs = dict(zip(self.names, self.session.run(None, {**feeds, **{w: weights[s] for s, w in self.fed.items()}})))
        values = {**feeds, **outputs}
        return {**outputs, **{q: values[a] for a, q in self.qualified.items()}}


class Calibration:
    """The float export's prefill graph with logits at every position (an encoder-decoder's encoder before it), every
    MatMul's activation as an output and its weight as an input, run on the calibration windows. An encoder-decoder
    reads each window as a source, and its decoder the float export's own greedy target for it."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        directory = Path(directory)
        manifest, model = every_position_prefill(directory, "calibrate")
        contract = manifest.contract
        self.steps = step_adapter(contract)
        self.graph = self.steps.graph("prefill")
        names = SharedNames()
        encoder = "encoder" in contract.graphs()  # an encoder-decoder's encoder reads the windows
        first = [_Part(directory, "encoder", check_graph_file(directory, graph_file("encoder")), names, threads)] if encoder else []
        self.parts = [*first, _Part(directory, self.graph, model, names, threads)]
        self.activation_of = {w: a for part in self.parts for w, a in part.activation_of.items()}
        self.matrices = sorted(w for part in self.parts for w in part.matrices)  # what mixed precision may choose
        self.gathered = {w: shape for part in self.parts for w, shape in part.gathered.items()}
        self.folds = _private_folds(self.parts)  # where AWQ's scales fold into the graph
        self.floats = {w: v for part in self.parts for w, v in part.floats.items()}
        self.windows = _windows(directory, contract, manifest.model.max_positions)
        self.targets = _targets(directory, manifest, self.windows, threads) if encoder else None  # the decoder's inputs
        self.cost_windows = self.windows[:COST_WINDOWS]
        self._reference: np.ndarray | None = None  # (cost windows, W, V) float log-probabilities
        self._squares: dict[str, np.ndarray] = {}  # activation -> (K,) mean squared activation
        self._inputs: dict[str, np.ndarray] | None = None  # activation -> (tokens, K) float16, when asked for

    @property
    def tokens(self) -> int:
        return self.windows.size if self.targets is None else self.windows.size + self.targets.size

    def run_window(self, rows: slice, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Calibration windows `rows` through the graphs, one batch, with these weights fed: the outputs by name."""
        prefill, found = self.parts[-1], {}
        ids = self.windows[rows]
        mask, other = np.ones_like(ids), {}
        if self.targets is not None:  # the encoder reads the window; the decoder its target after the start token
            found = self.parts[0].run({INPUT_IDS: ids, ATTENTION_MASK: mask}, weights)
            ids, other = self.targets[rows], {ENCODER_HIDDEN: found[ENCODER_HIDDEN]}

        def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return prefill.run(feeds, weights)

        _, outputs = self.steps.run(run, "prefill", ids, mask, [], other)
        return {**found, **outputs}

    def gathered_bytes(self, bits: int, block: int) -> int:
        """The gathered matrices' bytes at `bits` (their blocks run along the features: the shorter side of a tied (H, V))."""
        return sum(block_bytes(min(shape), max(shape), bits, block, False) for shape in self.gathered.values())

    def awq(self, bits: int, block: int) -> dict[str, np.ndarray]:
        """AWQ: each fold's scale searched on the first AWQ_WINDOWS windows' inputs and applied to the values the runs
        feed (the float function is unchanged); the changed values by name, for the quantizer to store."""
        outputs = self.run_window(slice(0, AWQ_WINDOWS), self.floats)
        changed: set[str] = set()
        for fold in self.folds:
            x = outputs[fold.activation].reshape(-1, outputs[fold.activation].shape[-1]).astype(np.float32)
            s = awq_scale(x, [np.asarray(self.floats[m], np.float32) for m in fold.matrices], bits, block)
            apply_fold(fold, s, self.floats)
            changed |= set(fold.matrices) | {name for name, _ in fold.divided}
        self._reference, self._inputs, self._squares = None, None, {}  # the activations are x / s now
        return {name: self.floats[name] for name in changed}

    def importance(self) -> dict[str, np.ndarray]:
        """Each MatMul weight's input channels' mean squared activation over the calibration tokens (float run)."""
        self._float_runs(keep_inputs=False)
        return {w: self._squares[a] for w, a in self.activation_of.items() if a in self._squares}

    def inputs(self) -> dict[str, np.ndarray]:
        """Each MatMul weight's inputs over the calibration tokens, (tokens, K) float16 (weights reading one activation
        share one array)."""
        self._float_runs(keep_inputs=True)
        return {w: self._inputs[a] for w, a in self.activation_of.items() if a in self._inputs}

    def _float_runs(self, keep_inputs: bool) -> None:
        """The float model over every window, BATCH at a time: the mean squared activations, the inputs if asked for,
        and the cost windows' log-probabilities (kept for costs())."""
        if self._reference is not None and (self._inputs is not None or not keep_inputs):
            return
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        kept: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(self.windows), BATCH):
            outputs = self.run_window(slice(start, start + BATCH), self.floats)
            if start == 0:
                self._reference = log_softmax(outputs["logits"][:COST_WINDOWS], np.float64)
            for a in set(self.activation_of.values()) & set(outputs):
                x = outputs[a].reshape(-1, outputs[a].shape[-1])
                sums[a] = sums.get(a, 0.0) + np.square(x, dtype=np.float64).sum(axis=0)
                counts[a] = counts.get(a, 0) + len(x)
                if keep_inputs:
                    kept.setdefault(a, []).append(x.astype(np.float16))
        self._squares = {a: (total / counts[a]).astype(np.float32) for a, total in sums.items()}
        if keep_inputs:
            self._inputs = {a: np.concatenate(parts) for a, parts in kept.items()}

    def costs(self, quantize: Callable[[str, np.ndarray], np.ndarray], log: Callable[[str], None] = lambda m: None,
              matrices: list[str] | None = None) -> dict[str, float]:
        """{matrix: mean KL(float || the model with only that matrix replaced by quantize(name, float matrix))},
        for every matrix mixed precision may choose (or the ones given)."""
        self._float_runs(keep_inputs=False)
        reference = self._reference
        costs = {}
        chosen = self.matrices if matrices is None else matrices
        for i, name in enumerate(chosen):
            weights = {**self.floats, name: np.ascontiguousarray(quantize(name, np.asarray(self.floats[name])))}
            lp = log_softmax(self.run_window(slice(0, COST_WINDOWS), weights)["logits"], np.float64)
            costs[name] = float((np.exp(reference) * (reference - lp)).sum(axis=-1).mean())
            if (i + 1) % 50 == 0:
                log(f"mixed precision: measured {i + 1} of {len(chosen)} matrices")
        return costs


def _mapped(directory: Path, tensor) -> np.ndarray:
    """A read-only map of an initializer's bytes in the export's weights file (or its own bytes when it has them)."""
    from onnx import helper, numpy_helper

    if tensor.data_location != tensor.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    return np.memmap(directory / info["location"], dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type), mode="r",
                     offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))


def _private_folds(parts: list[_Part]) -> list[Fold]:
    """The folds whose matrices and divided constants no other graph of the calibration holds: an encoder's norm
    stored once with a decoder's (the same bytes) cannot be divided for one of them only."""
    folds = []
    for part in parts:
        others = set().union(*(p.taken for p in parts if p is not part))
        folds += [f for f in part.folds if not others & ({*f.matrices} | {c for c, _ in f.divided})]
    return folds


def _targets(directory: Path, manifest: Manifest, windows: np.ndarray, threads: int | None) -> np.ndarray:
    """(windows, T): an encoder-decoder's decoder input for each window, its start token and the float export's greedy
    target for it (T as long as the window, or as the decoder holds)."""
    from kvgraph.runtime.tools.quality import greedy_tokens

    contract = manifest.contract
    limits = [limit for limit in (step_adapter(contract).cache.capacity(contract), manifest.model.max_positions) if limit]
    length = min([windows.shape[1]] + [limit - 1 for limit in limits])
    start = manifest.special_tokens.decoder_start_token_id
    return np.array([[start, *target] for target in greedy_tokens(directory, windows.tolist(), length - 1, threads)], dtype=np.int64)


def _windows(directory: Path, contract, max_positions: int | None) -> np.ndarray:
    """(windows, W): the calibration text's full windows, WINDOWS at most (pseudo-random ids without tokenizer.json)."""
    limits = [limit for limit in (step_adapter(contract).cache.capacity(contract), max_positions) if limit]
    window = min([WINDOW] + limits)
    if (directory / "tokenizer.json").is_file():
        ids = TextCodec(directory).encode(TEXT.read_text(encoding="utf-8"))
    else:
        ids = np.random.default_rng(2).integers(0, contract.vocab_size, size=WINDOW * COST_WINDOWS).tolist()
    count = max(1, min(WINDOWS, len(ids) // window))
    return np.array([ids[start: start + window] for start in range(0, window * count, window)], dtype=np.int64)


@dataclass
class QuantPlan:
    """What calibration tells the quantizer."""

    rounding: BlockRounding  # with the search's weights and GPTQ's inputs
    bits_of: dict[str, int] = field(default_factory=dict)  # the matrices mixed precision keeps at 8 bits
    replaced: dict[str, np.ndarray] = field(default_factory=dict)  # AWQ's scaled matrices and divided norms


def plan(source: str | Path, scheme: QuantScheme, threads: int | None = None,
         log: Callable[[str], None] = lambda message: None) -> QuantPlan:
    """Calibrate for `scheme` on the float export `source`. Nothing is run for a scheme that needs no calibration."""
    found = QuantPlan(BlockRounding(scheme.rounding_name, scheme.symmetric, scheme.block_size))
    if not (scheme.searched or scheme.mixed or scheme.awq):
        return found
    calibration = Calibration(source, threads)
    for name in calibration.matrices:
        shape = calibration.floats[name].shape
        check_block(scheme.block_size, shape[0], name, list(shape), calibration.graph)
    log(f"calibration: {calibration.tokens} tokens of {TEXT.name} ({calibration.cost_windows.size} for each matrix's KL), "
        f"{len(calibration.activation_of)} matrices' activations")
    if scheme.awq:
        found.replaced = calibration.awq(scheme.bits, scheme.block_size)
        log(f"AWQ: {len(calibration.folds)} activations scaled, folded into {len(found.replaced)} tensors")
    if scheme.rounding_name == "gptq":  # first: the one float pass that keeps the inputs also gives the importance
        found.rounding.inputs = calibration.inputs()
    found.rounding.importance = calibration.importance()
    if scheme.mixed:
        found.bits_of = _mixed_bits(calibration, scheme, found.rounding, log)
    return found


def _mixed_bits(calibration: Calibration, scheme: QuantScheme, rounding: BlockRounding, log: Callable[[str], None]) -> dict[str, int]:
    """The matrices to keep at int8: the costliest in KL alone at int4 per extra byte, within the scheme's budget."""
    block, float_min = scheme.block_size, scheme.float_min
    costs = calibration.costs(lambda name, matrix: rounding.dequantized(name, matrix, 4, float_min), log)
    shapes = {name: calibration.floats[name].shape for name in calibration.matrices}
    size = {name: {bits: block_bytes(*shape, bits, block, float_min and bits == 4, calibration.floats[name].itemsize)
                   for bits in (4, 8)} for name, shape in shapes.items()}
    all_int4 = sum(s[4] for s in size.values()) + calibration.gathered_bytes(scheme.embedding_bits, block)
    room = (scheme.budget_mb * 1e6 if scheme.budget_mb is not None else (1 + MIX_ROOM) * all_int4) - all_int4
    if room < 0:
        raise KvgraphError(f"--budget-mb {scheme.budget_mb:g} is below the all-int4 size of the quantized matrices, "
                           f"{all_int4 / 1e6:.1f} MB; give at least that, or --mix none")
    extra = {name: s[8] - s[4] for name, s in size.items()}
    bits_of = choose_bits(costs, extra, int(room))
    for name in bits_of:
        rounding.forget(name)  # measured at int4, stored at int8
    added = sum(extra[name] for name in bits_of)
    log(f"mixed precision: {len(bits_of)} of {len(costs)} matrices at int8 (+{added / 1e6:.2f} MB over all-int4's "
        f"{all_int4 / 1e6:.1f} MB), chosen by the KL each costs alone at int4 on calibration text")
    return bits_of
