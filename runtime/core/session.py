"""Loading an export directory into onnxruntime sessions, checked against its manifest."""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from kvgraph.graphs import GraphContract, KvgraphError, Manifest, TensorSpec, io_mismatches
from kvgraph.graphs.contract import VERIFY
from kvgraph.graphs.manifest import graph_file
from kvgraph.graphs.modes import StepAdapter, step_adapter
from kvgraph.graphs.safety import check_graph_file
from kvgraph.runtime.core.weights import SharedWeights, WeightsIndex

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


@dataclass(frozen=True)
class Device:
    """Where the cache lives: the session's device, as onnxruntime's OrtValue APIs name it."""

    provider: str  # "cpu" or "cuda"
    ort_type: str  # "cpu" or "cuda"
    index: int = 0

    @classmethod
    def for_provider(cls, provider: str) -> Device:
        return cls(provider, "cuda" if provider == "cuda" else "cpu")


def resolve_provider(provider: str) -> str:
    """"cpu"/"cuda" -> onnxruntime's provider name, or a clear error listing what is available."""
    available = ort.get_available_providers()
    name = PROVIDERS.get(provider)
    if name is None:
        raise KvgraphError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)} (available here: {available})")
    if name not in available:
        hint = " (install kvgraph[gpu] and run on a machine with a GPU)" if provider == "cuda" else ""
        raise KvgraphError(f"provider {provider!r} is not available{hint}; available providers: {available}")
    return name


LAZY = ("extend", VERIFY)  # open on first use (a chat's next turn, speculation; without shared weights each holds its own copy)

# How the sessions of an export hold its weights:
#   one-session  one session runs every step (decoder-only: the graph that serves prefill, decode and
#                extend), and onnxruntime loads and prepacks the weights once: one copy, prepacked speed
#   mapped       model.onnx.data mapped once, every session reads that memory (unpacked: slower steps)
#   per-session  each session loads and prepacks its own copy
#   auto         one-session where the export allows it, else mapped, else per-session
WEIGHT_POLICIES = ("auto", "one-session", "mapped", "per-session")


@dataclass
class LoadedGraphs:
    directory: Path
    manifest: Manifest
    device: Device
    threads: int | None
    provider_name: str
    weights: SharedWeights | None = None  # None: each session loads the weights file itself
    cuda_graph: bool = False  # static decode captured as a CUDA graph: requests take turns on pooled buffers
    one_graph: str | None = None  # one-session: the graph that runs every step
    # Quantized exports: onnxruntime fuses DequantizeLinear + MatMul into a kernel that also rounds the
    # activations to int8 (its accuracy_level 4), an approximation the quality report measures. exact
    # keeps the graphs' own float semantics (no fusion), as golden vectors and other runtimes define them.
    exact: bool = False
    sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    pool: dict[int, object] = field(default_factory=dict)  # cuda_graph: batch size -> its StaticCache, reused
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _request_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @functools.cached_property
    def reorder_session(self) -> ort.InferenceSession:
        """The beam reorder graph (graphs/reorder.py) on this export's device, made on first use."""
        from kvgraph.graphs.reorder import reorder_model

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        return ort.InferenceSession(reorder_model(self.contract).SerializeToString(), options, providers=[self.provider_name])

    def request_turn(self):
        """Held for a whole request when requests share pooled buffers (cuda_graph); otherwise free."""
        return self._request_lock if self.cuda_graph else contextlib.nullcontext()

    def captured(self, what: str) -> str | None:
        """Why `what` (a cache that moves between steps) cannot run on these sessions (None: it can)."""
        return f"{what}; with cuda_graph the buffers are captured and pooled: load without it" if self.cuda_graph else None

    @property
    def contract(self) -> GraphContract:
        return self.manifest.contract

    @functools.cached_property
    def steps(self) -> StepAdapter:
        """The contract's step adapter: which graph a step runs and what it is fed (built once)."""
        return step_adapter(self.manifest.contract)

    def graph_for(self, role: str) -> str:
        """The graph a step of this role runs: the contract's, or under one-session the one graph."""
        if role == VERIFY:
            return VERIFY
        return self.one_graph or self.steps.graph(role)

    def session(self, graph: str) -> ort.InferenceSession:
        """The graph's session, opened and checked against the manifest on first use."""
        with self._lock:
            if graph not in self.sessions:
                derived = graph == VERIFY and not self.contract.verify  # an export from before verify.onnx
                self.sessions[graph] = self._derived_verify() if derived else self._open_checked([graph])[graph]
            return self.sessions[graph]

    def _derived_verify(self) -> ort.InferenceSession:
        """An export written before verify.onnx (format < 1.4): its verify graph (graphs/README.md section 4.2),
        derived in memory from the graph that runs Q new tokens after a past (extend, or a static export's prefill)."""
        from kvgraph.graphs.rewrites.every_position import keep_every_position

        reason = self.steps.speculation()
        if reason:
            raise KvgraphError(f"{self.directory}: {reason}")
        base = self.steps.graph("extend")
        model = check_graph_file(self.directory, graph_file(base))
        try:
            keep_every_position(model, self.contract, base)
        except ValueError as exc:
            raise KvgraphError(f"{self.directory / graph_file(base)}: cannot verify drafted tokens with it: {exc}") from exc
        options = self.options(VERIFY, weights_of=base)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.directory))
        return ort.InferenceSession(model.SerializeToString(), options, providers=[(self.provider_name, self.provider_options(base))])

    def options(self, graph: str, weights_of: str | None = None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.weights is not None:
            self.weights.add_to(options, weights_of or graph)
        if self.exact and self.manifest.quantization is not None:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if graph == VERIFY:  # beside the step session: no second busy-waiting thread pool
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def provider_options(self, graph: str) -> dict[str, str]:
        # A static-cache decode step has the same shapes and buffers every step: on CUDA it can be
        # captured once as a CUDA graph and replayed (all its inputs are bound on the device).
        # Replays reuse the captured addresses, so the buffers are pooled per batch size and
        # each batch size is its own graph (run option gpu_graph_id, see steps._StaticDecode).
        if self.cuda_graph and graph == "decode":
            return {"enable_cuda_graph": "1"}
        return {}

    def _open_checked(self, graphs: list[str]) -> dict[str, ort.InferenceSession]:
        sessions = {name: _open(self.directory, graph_file(name), self.options(name), self.provider_name, self.provider_options(name))
                    for name in graphs}
        reasons = []
        for name, session in sessions.items():
            inputs, outputs = self.contract.graphs()[name]
            reasons += io_mismatches(graph_file(name), inputs, [_spec(i) for i in session.get_inputs()])
            reasons += io_mismatches(graph_file(name), outputs, [_spec(o) for o in session.get_outputs()])
        _refuse_mismatches(self.directory, reasons)
        return sessions


def load_graphs(directory: str | Path, provider: str = "cpu", threads: int | None = None, share_weights: bool = True,
                cuda_graph: bool = False, weights: str | None = None, exact: bool = False) -> LoadedGraphs:
    """Read the manifest, open the sessions on the provider, and check them against the manifest.

    weights: one of WEIGHT_POLICIES (default "auto": one copy of the weights, prepacked where the
    export allows one session for every step); share_weights=False means "per-session".
    cuda_graph: capture the static-cache decode step as a CUDA graph (provider "cuda" only).
    exact: quantized exports run their DequantizeLinear + MatMul as written, without onnxruntime's
    int8-activation kernel (slower; golden vectors are made and checked this way).
    """
    directory = Path(directory)
    manifest = Manifest.load(directory)
    reason = step_adapter(manifest.contract).cuda_graph(provider) if cuda_graph else None
    if reason:
        raise KvgraphError(reason)
    provider_name = resolve_provider(provider)
    _check_graph_files(directory, manifest)
    index = WeightsIndex(directory, manifest.files["weights_index"]) if manifest.files.get("weights_index") else None
    policy = _policy(manifest, weights or ("auto" if share_weights else "per-session"), cuda_graph, index)
    mapped = SharedWeights(index) if policy == "mapped" else None
    graphs = LoadedGraphs(directory, manifest, Device.for_provider(provider), threads, provider_name, mapped, cuda_graph,
                          step_adapter(manifest.contract).one_graph() if policy == "one-session" else None, exact)
    first = [graphs.one_graph] if graphs.one_graph else [name for name in manifest.contract.graphs() if name not in LAZY]
    graphs.sessions.update(graphs._open_checked(first))
    return graphs


def _check_graph_files(directory: Path, manifest: Manifest) -> None:
    """Every graph, opened now or later: nothing read outside the directory, I/O as the manifest says."""
    from kvgraph.graphs.onnx_files import read_io

    reasons = []
    for name, (inputs, outputs) in manifest.contract.graphs().items():
        declared_inputs, declared_outputs = read_io(check_graph_file(directory, graph_file(name)))
        reasons += io_mismatches(graph_file(name), inputs, declared_inputs) + io_mismatches(graph_file(name), outputs, declared_outputs)
    _refuse_mismatches(directory, reasons)


def _refuse_mismatches(directory: Path, reasons: list[str]) -> None:
    if reasons:
        more = f"; and {len(reasons) - 4} more" if len(reasons) > 4 else ""
        raise KvgraphError(f"{directory}: the graphs do not match kvgraph.json: " + "; ".join(reasons[:4]) + more)


def _policy(manifest: Manifest, policy: str, cuda_graph: bool, index: WeightsIndex | None) -> str:
    """The weights policy to use: the one asked for, or what "auto" picks, or a KvgraphError saying why not."""
    if policy not in WEIGHT_POLICIES:
        raise KvgraphError(f"unknown weights policy {policy!r}; choose one of {list(WEIGHT_POLICIES)}")
    one_graph = step_adapter(manifest.contract).one_graph()
    mappable = index is not None and index.mappable and manifest.quantization is None
    if policy == "one-session" and (one_graph is None or cuda_graph):
        why = "cuda_graph captures the decode graph alone" if cuda_graph else "an encoder-decoder runs several graphs"
        raise KvgraphError(f"weights policy 'one-session' is not available here: {why}")
    if policy == "mapped" and not mappable:
        why = "its integer weights are repacked by each session" if manifest.quantization else "the export has no weights index"
        raise KvgraphError(f"weights policy 'mapped' is not available for this export: {why}")
    if policy != "auto":
        return policy
    if one_graph is not None and not cuda_graph:
        return "one-session"
    return "mapped" if mappable else "per-session"


def _open(directory: Path, name: str, options: ort.SessionOptions, provider: str, provider_options: dict[str, str]) -> ort.InferenceSession:
    path = directory / name  # load_graphs checked every graph file before any session opens (_check_graph_files)
    try:
        return ort.InferenceSession(str(path), options, providers=[(provider, provider_options)])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types for unreadable files
        raise KvgraphError(f"{path}: onnxruntime cannot load this graph: {str(exc).splitlines()[0][:300]}") from exc


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, (int, str)) else "?" for d in node.shape)
    return TensorSpec(node.name, _ORT_DTYPES.get(node.type, node.type), shape)
