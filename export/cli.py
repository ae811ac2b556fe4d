"""`kvgraph export MODEL OUT`: the command-line face of export_model."""

from __future__ import annotations

import argparse
import sys

from kvgraph.graphs.manifest import MANIFEST_NAME
from kvgraph.graphs.quantization_options import add_scheme_arguments, scheme_from_arguments


HELP = "export a Hugging Face causal LM to prefill + decode ONNX graphs"  # shown by `kvgraph --help` (the command is registered in pyproject.toml)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local Hugging Face model directory or a hub id")
    parser.add_argument("out", help="the export directory to create")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="graph dtype (default float32)")
    parser.add_argument("--all-logits", action="store_true", help="prefill returns logits for every position (for scoring)")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                        help="dynamic: K/V grow by one position a step; static: fixed buffers of --max-length positions, written in place")
    parser.add_argument("--max-length", type=int, default=None, metavar="N",
                        help="static cache: positions per row (prompt + new tokens); requests beyond it are refused")
    parser.add_argument("--task", choices=("text-generation", "text2text-generation"), default=None,
                        help="refuse a model of the other kind (default: take the kind from the config)")
    parser.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    parser.add_argument("--verbose", action="store_true",
                        help="print the validation's max |diff| for every tensor and step (default: a line per graph; the table on failure)")
    parser.add_argument("--trace-every-layer", action="store_true",
                        help="trace every layer (default: repeated layers are traced once and copied, checked node by node)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow models that ship their own Python code")
    parser.add_argument("--quantize", choices=("int4", "int8"), default=None,
                        help="quantize the weights (blocked DequantizeLinear + MatMul, standard ONNX) and publish only if the "
                             "quality report against the float export passes")
    add_scheme_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        from kvgraph.export import export_model
    except ImportError as exc:
        print(f"kvgraph export needs the export extra (pip install 'kvgraph[export]'): {exc}", file=sys.stderr)
        return 2

    result = export_model(
        args.model,
        args.out,
        dtype=args.dtype,
        all_logits=args.all_logits,
        cache=args.cache,
        max_length=args.max_length,
        validate=not args.no_validate,
        force=args.force,
        trust_remote_code=args.trust_remote_code,
        task=args.task,
        quantize=scheme_from_arguments(args, int(args.quantize[3:]) if args.quantize else None, at_export=True),
        min_top1=args.min_top1,
        max_ppl_ratio=args.max_ppl_ratio,
        log=lambda message: print(message, file=sys.stderr),
        verbose=args.verbose,
        trace_every_layer=args.trace_every_layer,
    )
    print(f"exported to {result.directory} (see {result.directory / MANIFEST_NAME})")
    return 0
