"""`kvgraph inspect DIR`: what an export directory holds, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvgraph.graphs.contract import format_shape
from kvgraph.graphs.generation_config import GenerationDefaults
from kvgraph.graphs.manifest import Manifest


HELP = "show what an export directory holds"  # shown by `kvgraph --help` (the command is registered in pyproject.toml)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="an export directory (with kvgraph.json)")
    parser.add_argument("--json", action="store_true", help="print the manifest plus file sizes as JSON")


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    manifest = Manifest.load(directory)
    sizes = {file: (directory / file).stat().st_size for file in manifest.files.values() if (directory / file).is_file()}
    if args.json:
        print(json.dumps({**manifest.to_json(), "file_sizes": sizes}, indent=2))
    else:
        print(describe(manifest, sizes))
        print("\n".join(["", *GenerationDefaults.read(directory, warn=False).describe()]))
    return 0


def describe(manifest: Manifest, sizes: dict[str, int]) -> str:
    c, m, t = manifest.contract, manifest.model, manifest.special_tokens
    lines = [
        f"kvgraph export, format {manifest.format_version}",
        f"model        {m.family} ({m.architecture}) from {m.source}",
        f"shape        {c.num_layers} layers, {c.num_kv_heads} KV heads, head dim {c.head_dim}{f' (values {c.value_head_dim})' if c.value_head_dim else ''}, vocab {c.vocab_size}, {c.dtype}",
        f"positions    max {m.max_positions}; cache {c.cache_bytes_per_token()} bytes per token per row",
        f"cache        {_cache_line(c)}",
        f"tokens       bos {t.bos_token_id}, eos {list(t.eos_token_ids)}, pad {t.pad_token_id}",
        f"onnx         opset {manifest.opset}, IR {manifest.ir_version}; " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()),
        "",
    ]
    for name, (inputs, outputs) in c.graphs().items():
        lines.append(f"{name}.onnx")
        for role, specs in (("in ", inputs), ("out", outputs)):
            lines += [f"  {role} {spec.name:20} {spec.dtype:8} {format_shape(spec.shape)}" for spec in _folded(specs)]
    lines += ["", "files"] + [f"  {file:28} {size / 1e6:10.2f} MB" for file, size in sorted(sizes.items())]
    lines.append("")
    lines.append(_validation_line(manifest.validation).replace("validation  ", "validation   (float graphs, before quantization)"
                                                                 if manifest.quantization else "validation  ", 1))
    lines += _quantization_lines(manifest.quantization, c.dtype)
    return "\n".join(lines)


def _quantization_lines(record, dtype: str) -> list[str]:
    if not record:
        return []
    scheme, tensors = record.get("scheme", {}), record.get("tensors", {})
    weights = tensors.get("float_bytes", 0) / (2 if dtype == "float16" else 4)
    per_weight = tensors.get("quantized_bytes", 0) / weights if weights else 0.0
    lines = [f"quantized    int{scheme.get('bits')} weights, block {scheme.get('block_size')}, "
             f"{'float minimum' if scheme.get('float_min') else 'symmetric' if scheme.get('symmetric') else 'asymmetric'} ({scheme.get('format')}); gathered matrices "
             f"int{scheme.get('embedding_bits')}: {len(tensors.get('matmul', []))} + {len(tensors.get('gathered', []))} matrices, "
             f"{tensors.get('float_bytes', 0) / 1e6:.1f} MB {dtype} -> {tensors.get('quantized_bytes', 0) / 1e6:.1f} MB "
             f"({per_weight:.3f} bytes per weight, scales and zero points included)"]
    quality = record.get("quality")
    if quality:
        lines.append(f"quality      vs the float export: top-1 {100 * quality['top1_agreement']:.2f} %, mean KL {quality['mean_kl']:.5f}, "
                     f"perplexity {quality['perplexity_float']:.3f} -> {quality['perplexity_quantized']:.3f} "
                     f"({quality['perplexity_ratio']:.4f}x), greedy {quality['greedy_identical']}/{quality['greedy_prompts']} "
                     f"identical over {quality['greedy_new_tokens']} tokens")
    return lines


def _cache_line(c) -> str:
    kind = "encoder-decoder: self-attention " if c.seq2seq else ""
    if c.static:
        rings = f", windowed layers in rings of {sorted({w for w in c.ring_windows if w})}" if c.ring_windows else ""
        return f"{kind}static, buffers of {c.max_length} positions per row{rings} ({c.buffer_bytes_per_row() / 1e6:.1f} MB per row)"
    cross = "; cross-attention K/V computed once per source by prefill, decode inputs only" if c.seq2seq else ""
    return f"{kind}dynamic, grows by one position per decode step{cross}"


def _folded(specs):
    """Show layer 0's cache tensors of each kind and elide the rest ("... N more")."""
    out, kinds = [], {}
    for spec in specs:
        prefix = spec.name.split(".")[0]
        if prefix in ("past", "present", "cross"):
            kinds.setdefault(prefix, []).append(spec)
        else:
            out.append(spec)
    for group in kinds.values():
        out += group if len(group) <= 4 else [*group[:2], type(group[0])(f"... {len(group) - 2} more", group[0].dtype, group[0].shape)]
    return out


def _validation_line(validation) -> str:
    if validation is None:
        return "validation   skipped (--no-validate)"
    worst = max((row["max_abs_diff"] for row in validation["rows"]), default=0.0)
    verdict = "passed" if validation["passed"] else "FAILED"
    graphs = sorted({row["graph"] for row in validation["rows"]})
    return (f"validation   {verdict}: {len(validation['rows'])} tensor checks over {', '.join(graphs)} "
            f"({validation['decode_steps']} decode steps), worst max |diff| {worst:.2e}")
