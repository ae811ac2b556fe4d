"""`kvgraph quantize FLOAT_EXPORT OUT --bits 4|8`: a weight-only quantized export, with its quality report
(runtime/tools/quantize_export.py does the work)."""

from __future__ import annotations

import argparse
import sys

from kvgraph.graphs.manifest import MANIFEST_NAME
from kvgraph.graphs.quantization import BITS
from kvgraph.graphs.quantization_options import add_scheme_arguments, scheme_from_arguments

HELP = "quantize an export's weights to int4 or int8 (standard ONNX), with a quality report"  # registered in pyproject.toml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a float export directory (kvgraph export)")
    parser.add_argument("out", help="the quantized export directory to create")
    parser.add_argument("--bits", type=int, required=True, help=f"weight bits, one of {list(BITS)}")
    add_scheme_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the quality report")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    from kvgraph.runtime.tools.quantize_export import quantize_export

    scheme = scheme_from_arguments(args, args.bits)
    out = quantize_export(args.source, args.out, scheme, min_top1=args.min_top1, max_ppl_ratio=args.max_ppl_ratio,
                          threads=args.threads, force=args.force, log=lambda message: print(message, file=sys.stderr))
    print(f"quantized export in {out} (see {out / MANIFEST_NAME})")
    return 0
