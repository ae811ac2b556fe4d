"""The command-line options of a quantization scheme, shared by `kvgraph quantize` and `kvgraph export --quantize`."""

from __future__ import annotations

import argparse

from kvgraph.graphs.errors import KvgraphError
from kvgraph.graphs.quantization import BLOCK_SIZES, MIX_ROOM, MIXES, ROUNDINGS, THRESHOLDS, QuantScheme


def add_scheme_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `kvgraph quantize` and `kvgraph export --quantize` share (besides the bit width)."""
    parser.add_argument("--block-size", type=int, default=None,
                        help=f"weights per scale along the input dimension, one of {list(BLOCK_SIZES)} (default 32)")
    parser.add_argument("--symmetric", action="store_true", help="no zero points (signed integers around 0)")
    parser.add_argument("--float-min", action="store_true",
                        help="each block's minimum as a float, not an integer zero point (w = scale * code + minimum, as "
                             "llama.cpp's Q4_1 and k-quants): one more small MatMul per layer, and a grid that holds such models exactly")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=None,
                        help="search (default): each block's scale and offset searched for the least error, weighted by "
                             "the input channels' activations on calibration text; gptq: the searched grids, and each "
                             "input row's rounding error compensated on the rows after it (GPTQ, from the calibration "
                             "inputs' Hessian); nearest: plain min/max rounding")
    parser.add_argument("--mix", choices=MIXES, default=None,
                        help="int4: auto (default) measures what quantizing each matrix alone costs in KL on calibration "
                             f"text and keeps the costliest at int8 within --budget-mb (default {100 * MIX_ROOM:.0f} %% over "
                             "all-int4); none: every matrix int4")
    parser.add_argument("--awq", action="store_true",
                        help="activation-aware scaling (AWQ): each matrix's input rows scaled by a power of its activations' "
                             "mean magnitude searched on calibration text, the inverse folded into the norm (or up "
                             "projection) before it; the graphs keep their nodes")
    parser.add_argument("--budget-mb", type=float, default=None, metavar="MB",
                        help="int4 with --mix auto: megabytes the quantized matrices may take")
    parser.add_argument("--min-top1", type=float, default=None, metavar="FRACTION",
                        help="refuse below this next-token top-1 agreement with the float export "
                             f"(default {THRESHOLDS[8][0]} for int8, {THRESHOLDS[4][0]} for int4)")
    parser.add_argument("--max-ppl-ratio", type=float, default=None, metavar="RATIO",
                        help=f"refuse above this perplexity ratio to the float export (default {THRESHOLDS[8][1]} for int8, "
                             f"{THRESHOLDS[4][1]} for int4)")


def scheme_from_arguments(args: argparse.Namespace, bits: int | None, at_export: bool = False) -> QuantScheme | None:
    """The scheme of `kvgraph quantize` / `export --quantize` (at_export); None when not quantizing (then no scheme option
    may be given). At export no float graph exists to measure each matrix on: mixed precision is `kvgraph quantize`'s."""
    given = [flag for flag, value in (("--block-size", args.block_size), ("--symmetric", args.symmetric or None),
                                      ("--float-min", args.float_min or None), ("--rounding", args.rounding),
                                      ("--mix", args.mix), ("--budget-mb", args.budget_mb), ("--awq", args.awq or None),
                                      ("--min-top1", args.min_top1), ("--max-ppl-ratio", args.max_ppl_ratio)) if value is not None]
    if bits is None:
        if given:
            raise KvgraphError(f"{given[0]} applies to quantized exports only; add --quantize int4 or int8")
        return None
    calibrated = [flag for flag, on in (("--budget-mb", args.budget_mb is not None), ("--mix auto", args.mix == "auto"),
                                        ("--rounding gptq", args.rounding == "gptq"), ("--awq", args.awq)) if on]
    if at_export and calibrated:
        flag = calibrated[0]
        raise KvgraphError(f"{flag} calibrates on the float export, which export --quantize does not write: run "
                           "kvgraph export, then kvgraph quantize FLOAT_EXPORT OUT --bits 4")
    return QuantScheme(bits, args.block_size or 32, args.symmetric, float_min=args.float_min, rounding=args.rounding or "search",
                       mix=args.mix or ("none" if at_export else "auto"), budget_mb=args.budget_mb, awq=args.awq)
