"""Golden vectors: what every graph call of a greedy run must be fed and must return.

    vectors/vectors.json             cases, steps, int inputs inline, top-5 logits, greedy tokens
    vectors/tensors/<case>/<NN>-<graph>/<in|out>.<tensor>.npy    every input and output, as .npy

Two cases: "single" (one prompt) and "batch" (two prompts of different lengths, padded), and with a
verify graph a third, "verify": the batch's prompts, then one verify call fed each row's first
DRAFT_TOKENS greedy tokens of the batch case (logits at every position). A runtime that reproduces
them implements the contract (graphs/README.md, "Golden vectors").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvgraph.graphs.contract import GraphContract
from kvgraph.graphs.errors import KvgraphError
from kvgraph.graphs.manifest import Manifest
from kvgraph.graphs.report import VECTOR_TOLERANCES, excess
from kvgraph.graphs.staging import staged
from kvgraph.runtime.tools.step_trace import Step, Trace

VECTORS_NAME = "vectors.json"
VECTORS_FORMAT = "kvgraph-vectors"
VECTORS_VERSION = "1.1"  # 1.1: a "verify" case (exports with verify.onnx): prefill, then one verify call fed the case's draft
TOP_K = 5
PROMPT_TEXTS = ("The capital of France is", "Hello")  # for exports with a tokenizer
DRAFT_TOKENS = 4  # the verify case's Q
class VectorsMismatch(KvgraphError):
    """A run disagrees with golden vectors; the message names the first differing step and tensor."""


@dataclass
class Vectors:
    contract: dict
    cases: dict[str, Trace]


def default_prompts(vocab_size: int, encode=None) -> dict[str, list[list[int]]]:
    """The fixed prompts: the tokenizer's ids of PROMPT_TEXTS, or fixed ids spread over the vocabulary."""
    if encode is not None:
        first, second = (encode(text) for text in PROMPT_TEXTS)
    else:
        first = [(37 * i + 11) % vocab_size for i in range(1, 8)]
        second = [(53 * i + 5) % vocab_size for i in range(1, 4)]
    return {"single": [first], "batch": [first, second]}


# -- writing ------------------------------------------------------------------------------------


def write_vectors(manifest: Manifest, cases: dict[str, Trace], out: Path, force: bool = False) -> Path:
    """Write vectors.json and the tensors into `out`, which appears only when complete."""
    with staged(Path(out), force) as staging:
        doc = {
            "format": VECTORS_FORMAT,
            "format_version": VECTORS_VERSION,
            "export": {"family": manifest.model.family, "manifest_format_version": manifest.format_version},
            "contract": _contract_json(manifest.contract),
            "tolerance": VECTOR_TOLERANCES[manifest.contract.dtype],
            "cases": [_case_json(name, trace, staging) for name, trace in cases.items()],
        }
        (staging / VECTORS_NAME).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return Path(out).expanduser().absolute()


def _contract_json(contract: GraphContract) -> dict:
    return json.loads(json.dumps(asdict(contract)))  # as a file holds it (tuples become lists)


def _case_json(name: str, trace: Trace, root: Path) -> dict:
    return {
        "name": name,
        "prompts": trace.prompts,
        "max_new_tokens": trace.max_new_tokens,
        "pad_id": trace.pad_id,
        "eos_token_ids": trace.eos_token_ids,
        "greedy_tokens": trace.tokens,
        **({"draft": trace.draft} if trace.draft is not None else {}),
        **({"settings": trace.settings} if trace.settings else {}),
        "steps": [_step_json(name, index, step, root) for index, step in enumerate(trace.steps)],
    }


def _step_json(case: str, index: int, step: Step, root: Path) -> dict:
    folder = Path("tensors") / case / f"{index:02d}-{step.graph}"
    (root / folder).mkdir(parents=True)
    entry = {"index": index, "graph": step.graph, "inputs": [], "outputs": []}
    for role, tensors in (("inputs", step.inputs), ("outputs", step.outputs)):
        for name, array in tensors.items():
            file = folder / f"{'in' if role == 'inputs' else 'out'}.{name}.npy"
            np.save(root / file, array, allow_pickle=False)
            item = {"name": name, "dtype": str(array.dtype), "shape": list(array.shape), "file": file.as_posix()}
            if array.dtype == np.int64:
                item["values"] = array.tolist()
            if name == "logits":
                ids = np.argsort(-array, axis=-1, kind="stable")[..., :TOP_K]  # (B, 5) or (B, Q, 5), lowest id first on ties
                item["top5"] = {"ids": ids.tolist(), "values": np.take_along_axis(array, ids, -1).tolist()}
                item["argmax"] = np.argmax(array, axis=-1).tolist()
            entry[role].append(item)
    return entry


# -- reading ------------------------------------------------------------------------------------


def read_vectors(directory: Path) -> Vectors:
    """vectors.json and its tensors; KvgraphError naming the file and field when anything is off."""
    path = Path(directory) / VECTORS_NAME
    if not path.is_file():
        raise KvgraphError(f"{directory}: no {VECTORS_NAME} here; make one with `kvgraph vectors EXPORT {directory}`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != VECTORS_FORMAT:
            raise KvgraphError(f"{path}: field format is {doc.get('format')!r}, expected {VECTORS_FORMAT!r}")
        if int(str(doc["format_version"]).split(".")[0]) > int(VECTORS_VERSION.split(".")[0]):
            raise KvgraphError(f"{path}: format_version {doc['format_version']} is newer than this kvgraph reads ({VECTORS_VERSION})")
        return Vectors(doc["contract"], {case["name"]: _read_case(case, Path(directory)) for case in doc["cases"]})
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as exc:
        if isinstance(exc, KvgraphError):
            raise
        raise KvgraphError(f"{path}: malformed golden vectors ({type(exc).__name__}: {exc})") from exc


def _read_case(case: dict, root: Path) -> Trace:
    steps = [Step(step["graph"], _read_tensors(step["inputs"], root), _read_tensors(step["outputs"], root)) for step in case["steps"]]
    return Trace(case["prompts"], case["max_new_tokens"], case["pad_id"], case["eos_token_ids"], steps, case["greedy_tokens"],
                 case.get("draft"), case.get("settings"))


def _read_tensors(items: list[dict], root: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for item in items:
        file = (root / item["file"]).resolve()
        if root.resolve() not in file.parents:
            raise KvgraphError(f"{root / VECTORS_NAME}: tensor {item['name']} points outside the vectors directory ({item['file']})")
        try:
            tensors[item["name"]] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise KvgraphError(f"{file}: cannot read tensor {item['name']}: {exc}") from exc
    return tensors


# -- comparing ----------------------------------------------------------------------------------


def contract_mismatch(expected: Vectors, contract: GraphContract) -> str | None:
    """Why the vectors cannot be for this export (the contract fields that differ), or None."""
    mine = _contract_json(contract)
    fields = [f"{key} {expected.contract.get(key)!r} vs {mine[key]!r}" for key in mine if expected.contract.get(key) != mine[key]]
    return "the vectors were made for a different export (contract " + ", ".join(fields) + ")" if fields else None


def first_mismatch(expected: Vectors, contract: GraphContract, actual: dict[str, Trace]) -> str | None:
    """The first difference between golden vectors and a run, in step order, or None."""
    tolerance = VECTOR_TOLERANCES[contract.dtype]
    for name, want in expected.cases.items():
        reason = _trace_mismatch(want, actual[name], tolerance)
        if reason:
            return f"case {name!r}, {reason}"
    return None


def _trace_mismatch(want: Trace, got: Trace, tolerance: dict) -> str | None:
    if want.prompts != got.prompts:
        return f"prompts differ: {want.prompts} vs {got.prompts}"
    for index, (a, b) in enumerate(zip(want.steps, got.steps)):
        where = f"step {index} ({a.graph})"
        if a.graph != b.graph:
            return f"{where}: the run called {b.graph}"
        for role, expected, actual in (("input", a.inputs, b.inputs), ("output", a.outputs, b.outputs)):
            if list(expected) != list(actual):
                return f"{where}: {role} names differ: {list(expected)} vs {list(actual)}"
            for tensor in expected:
                reason = tensor_mismatch(expected[tensor], actual[tensor], tolerance)
                if reason:
                    return f"{where}: {role} {tensor} {reason}"
    if len(want.steps) != len(got.steps):
        return f"the vectors have {len(want.steps)} steps, the run took {len(got.steps)}"
    if want.tokens != got.tokens:
        return f"greedy tokens differ: {want.tokens} vs {got.tokens}"
    return None


def tensor_mismatch(expected: np.ndarray, actual: np.ndarray, tolerance: dict) -> str | None:
    """Why `actual` is not `expected` (shape, dtype, or the worst element beyond atol + rtol * |expected|)."""
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return f"is {actual.dtype}{list(actual.shape)}, expected {expected.dtype}{list(expected.shape)}"
    if expected.dtype.kind in "iub":
        wrong = np.argwhere(expected != actual)
        if len(wrong):
            at = tuple(int(i) for i in wrong[0])
            return f"differs at {at}: {actual[at]} instead of {expected[at]}"
        return None
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    over = excess(actual, expected, tolerance)
    if over.size and over.max() > 0:
        at = np.unravel_index(int(np.argmax(over)), over.shape)
        at = tuple(int(i) for i in at)
        return f"differs at {at}: {a[at]:.6g} instead of {e[at]:.6g} (max |diff| {np.nanmax(np.abs(a - e)):.3g}, atol {tolerance['atol']}, rtol {tolerance['rtol']})"
    return None
