"""`kvgraph quantize FLOAT_EXPORT OUT --bits 4|8`: a weight-only quantized export, with its quality report.

Torch is not needed: the float export's graphs are rewritten (graphs/quantize.py), written with one
shared weights file, scored against the float export (quality.py), and published only if the
report passes the thresholds. `kvgraph export --quantize` runs the same after its float export.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..graphs.errors import KvgraphError
from ..graphs.manifest import MANIFEST_NAME, METADATA_KEY, WEIGHTS_FILE, WEIGHTS_INDEX, Manifest, graph_file
from ..graphs.quantize import BITS, QuantScheme, add_scheme_arguments, scheme_from_arguments, thresholds
from ..graphs.staging import check_destination, staged

HELP = "quantize an export's weights to int4 or int8 (standard ONNX), with a quality report"  # registered in pyproject.toml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a float export directory (kvgraph export)")
    parser.add_argument("out", help="the quantized export directory to create")
    parser.add_argument("--bits", type=int, required=True, help=f"weight bits, one of {list(BITS)}")
    add_scheme_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the quality report")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    scheme = scheme_from_arguments(args, args.bits)
    out = quantize_export(args.source, args.out, scheme, min_top1=args.min_top1, max_ppl_ratio=args.max_ppl_ratio,
                          threads=args.threads, force=args.force, log=lambda message: print(message, file=sys.stderr))
    print(f"quantized export in {out} (see {out / MANIFEST_NAME})")
    return 0


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
    models = _load_graphs(source, manifest)
    from ..graphs.quantize import Quantizer

    report = Quantizer(scheme).quantize(models)
    log(f"quantized {len(report.matmul)} matrices to int{scheme.bits} and {len(report.gathered)} gathered ones to "
        f"int{scheme.embedding_bits} (block {scheme.block_size}): {report.float_bytes / 1e6:.1f} MB -> {report.quantized_bytes / 1e6:.1f} MB")
    with staged(out, force) as staging:
        _write(models, manifest, source, staging)
        del models
        from .quality import measure

        quality = measure(source, staging, threads, log)
        log(quality.table())
        reasons = quality.shortfalls(*limits)
        if reasons:
            raise KvgraphError(f"quantized export refused: {'; '.join(reasons)} (change with --min-top1 / --max-ppl-ratio); "
                               "nothing was written")
        record = {"scheme": {**_scheme_json(scheme), "format": "qdq"}, "source_dtype": manifest.contract.dtype,
                  "tensors": report.to_json(), "quality": quality.to_json(),
                  "thresholds": {"min_top1": limits[0], "max_ppl_ratio": limits[1]}}
        _publish_manifest(replace(manifest, quantization=record, versions={**manifest.versions, **_versions()}), staging)
    return out


def _check_source(source: Path, manifest: Manifest) -> None:
    if manifest.quantization is not None:
        scheme = manifest.quantization.get("scheme", {})
        raise KvgraphError(f"{source} is already quantized (int{scheme.get('bits')}, block {scheme.get('block_size')}); "
                           "quantize its float export instead")
    if manifest.contract.seq2seq:
        raise KvgraphError(f"{source} is an encoder-decoder export; quantization covers decoder-only exports for now")


def _load_graphs(source: Path, manifest: Manifest) -> dict:
    import onnx

    from ..graphs.safety import check_graph_file

    models = {}
    for name in manifest.contract.graphs():
        check_graph_file(source, graph_file(name))
        try:
            models[name] = onnx.load_model(str(source / graph_file(name)))
        except Exception as exc:  # protobuf / external data errors: the file at fault, in one line
            raise KvgraphError(f"{source / graph_file(name)}: cannot read the graph and its weights: {str(exc).splitlines()[0][:200]}") from exc
    return models


def _write(models: dict, manifest: Manifest, source: Path, staging: Path) -> None:
    from ..graphs.onnx_files import write_graphs

    write_graphs(models, staging, WEIGHTS_FILE, WEIGHTS_INDEX)
    written = {graph_file(name) for name in models} | {WEIGHTS_FILE, WEIGHTS_INDEX, MANIFEST_NAME}
    for name in manifest.files.values():
        if name not in written and (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    manifest.write(staging)  # the float manifest, until the report passes: the loader needs one


def _publish_manifest(manifest: Manifest, staging: Path) -> None:
    from ..graphs.onnx_files import embed_metadata

    manifest.write(staging)
    for name in manifest.contract.graphs():
        embed_metadata(staging / graph_file(name), {METADATA_KEY: manifest.dumps()})


def _scheme_json(scheme: QuantScheme) -> dict:
    return {"bits": scheme.bits, "block_size": scheme.block_size, "symmetric": scheme.symmetric, "embedding_bits": scheme.embedding_bits}


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime_quantizer": onnxruntime.__version__}
