"""Quantize an export: its graphs' weights rewritten (graphs/quantization.py), written with one shared weights file,
scored against the float export (quality.py), and published only if the report passes the thresholds.
Torch is not needed. `kvgraph quantize` and `kvgraph export --quantize` both run this."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable


from kvgraph.graphs.errors import KvgraphError
from kvgraph.graphs.manifest import MANIFEST_NAME, METADATA_KEY, WEIGHTS_FILE, WEIGHTS_INDEX, Manifest, graph_file
from kvgraph.graphs.modes import step_adapter
from kvgraph.graphs.onnx_files import embed_metadata, write_graphs
from kvgraph.graphs.quantization import QuantReport, QuantScheme, Quantizer, thresholds
from kvgraph.graphs.safety import check_graph_file
from kvgraph.graphs.staging import check_destination, staged
from kvgraph.graphs.weight_store import WeightStore
from kvgraph.runtime.tools.calibrate import plan
from kvgraph.runtime.tools.quality import QualityReport, measure


def quantize_export(source: str | Path, out: str | Path, scheme: QuantScheme, *, min_top1: float | None = None,
                    max_ppl_ratio: float | None = None, threads: int | None = None, force: bool = False,
                    log: Callable[[str], None] = lambda message: None) -> Path:
    """Write a quantized copy of the float export `source` into `out`, or raise KvgraphError and write nothing."""
    scheme.check()
    source = Path(source)
    manifest = Manifest.load(source)
    limits = thresholds(scheme.bits, min_top1, max_ppl_ratio)
    _check_source(source, manifest)
    out = check_destination(Path(out), force)
    models = _load_graphs(source, manifest)  # without their weights: the quantizer reads them tensor by tensor
    found = plan(source, scheme, threads, log)  # calibration: the rounding's evidence, the int8 matrices, AWQ's values
    store = WeightStore(source)
    report = Quantizer(scheme, store, found.rounding, found.bits_of, found.replaced).quantize(models)
    del found
    log(quantized_log_line(report, scheme))
    with staged(out, force) as staging:
        _write(models, manifest, source, staging, store)
        del models, store
        quality = measure(source, staging, threads, log)
        log(quality.table())
        gate(quality, limits)
        publish_quantized(manifest, staging, scheme, report, quality, limits)
    return out


def quantized_log_line(report: QuantReport, scheme: QuantScheme) -> str:
    eights = sum(1 for name in report.matmul if report.bits.get(name) == 8) if scheme.bits == 4 else 0
    mixed = f" ({eights} of them int8)" if eights else ""
    return (f"quantized {len(report.matmul)} matrices to int{scheme.bits}{mixed} and {len(report.gathered)} gathered ones to "
            f"int{scheme.embedding_bits} (block {scheme.block_size}): {report.float_bytes / 1e6:.1f} MB -> {report.quantized_bytes / 1e6:.1f} MB")


def gate(quality: QualityReport, limits: tuple[float, float]) -> None:
    """Refuse a quantized export whose quality report falls short of the thresholds."""
    reasons = quality.shortfalls(*limits)
    if reasons:
        raise KvgraphError(f"quantized export refused: {'; '.join(reasons)} (change with --min-top1 / --max-ppl-ratio); "
                           "nothing was written")


def publish_quantized(manifest: Manifest, staging: Path, scheme: QuantScheme, report: QuantReport, quality: QualityReport,
                      limits: tuple[float, float], reference: str = "float export") -> None:
    """The float manifest with the quantization record (scheme, tensors, quality against `reference`, thresholds),
    written beside the graphs and into them."""
    record = {"scheme": {**_scheme_json(scheme), "format": "qdq"}, "source_dtype": manifest.contract.dtype,
              "tensors": report.to_json(), "quality": quality.to_json(), "reference": reference,
              "thresholds": {"min_top1": limits[0], "max_ppl_ratio": limits[1]}}
    _publish_manifest(replace(manifest, quantization=record, versions={**manifest.versions, **_versions()}), staging)


def _check_source(source: Path, manifest: Manifest) -> None:
    if manifest.quantization is not None:
        scheme = manifest.quantization.get("scheme", {})
        raise KvgraphError(f"{source} is already quantized (int{scheme.get('bits')}, block {scheme.get('block_size')}); "
                           "quantize its float export instead")
    reason = step_adapter(manifest.contract).quantization()
    if reason:
        raise KvgraphError(f"{source}: {reason}")


def _load_graphs(source: Path, manifest: Manifest) -> dict:
    """Each graph's header (nodes and initializer references; check_graph_file refuses a file at fault in one line)."""
    return {name: check_graph_file(source, graph_file(name)) for name in manifest.contract.graphs()}


def _write(models: dict, manifest: Manifest, source: Path, staging: Path, store: WeightStore) -> None:
    write_graphs(models, staging, WEIGHTS_FILE, WEIGHTS_INDEX, store)
    written = {graph_file(name) for name in models} | {WEIGHTS_FILE, WEIGHTS_INDEX, MANIFEST_NAME}
    for name in manifest.files.values():
        if name not in written and (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    manifest.write(staging)  # the float manifest, until the report passes: the loader needs one


def _publish_manifest(manifest: Manifest, staging: Path) -> None:
    manifest.write(staging)
    for name in manifest.contract.graphs():
        embed_metadata(staging / graph_file(name), {METADATA_KEY: manifest.dumps()})


def _scheme_json(scheme: QuantScheme) -> dict:
    return {"bits": scheme.bits, "block_size": scheme.block_size, "symmetric": scheme.symmetric, "embedding_bits": scheme.embedding_bits,
            "float_min": scheme.float_min, "rounding": scheme.rounding_name, "mix": "auto" if scheme.mixed else "none",
            "budget_mb": scheme.budget_mb, "awq": scheme.awq}


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime_quantizer": onnxruntime.__version__}
