"""Coverage, measured: every causal-LM and seq2seq-LM model type in transformers, exported and checked.

    python benchmarks/coverage.py [--jobs 2] [--only gpt2,bloom] [--layers 2]

For each model type of transformers' MODEL_FOR_CAUSAL_LM and MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM auto
mappings, a tiny random-init model is built from the type's default config by one generic shrinker
(`shrink`: 2 layers, hidden 64, 4 query heads over 16-wide heads, the config's own KV layout scaled
to 2 KV heads (1 stays 1), up to 8 experts, a sliding window of 8 where the config has one, and the
config's real vocabulary). Each is exported with a dynamic and with a static cache (48 positions),
which validates the graphs against PyTorch; then the export's greedy tokens (kvgraph's runtime,
7-token prompt, 24 new tokens: past 2x the window) must equal transformers `generate`.

`--layers 4` builds the tiny models 4 layers deep (per-layer settings: one layer of each kind, then the first kind
again) and records how each export traced its layers: traced once and copied (export/repeated_layers.py), or every
layer with the reason. Its table goes to results/coverage-4-layers.md.

Each model type runs in its own process (a crash or hang costs one row). The table goes to
benchmarks/results/coverage.md (and .json); the README links it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
STATIC_LENGTH = 48
PROMPT, NEW_TOKENS = 7, 24
KINDS = ("decoder", "encoder-decoder")  # by is-encoder-decoder
MARKS = {True: "✓", False: "✗"}
MODE_OPTIONS = {"dynamic": {}, "static": {"cache": "static", "max_length": STATIC_LENGTH}}  # cache mode -> export_model options

# The shrinker: config fields set to a tiny value when the default config has them.
WIDTH = {"hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "word_embed_proj_dim": 64}
FFN = {"intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
       "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64}
DEPTH = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers", "n_layers")
HEADS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads", "n_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_kv_heads")
HEAD_DIMS = {"head_dim": 16, "d_kv": 16, "kv_channels": 16, "rotary_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
             "qk_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 32, "q_lora_rank": 32}
WINDOWS = ("sliding_window", "attention_chunk_size")
EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")
INIT = {"initializer_range": 0.1, "init_std": 0.1}  # top-2 logit gaps well above float noise
ONE = ("n_group", "topk_group", "first_k_dense_replace")
LAYERS = 2  # --layers


def shrink(defaults: dict) -> dict:
    """Overrides that make a default config tiny; only fields the config has are touched."""
    out = {k: v for k, v in {**WIDTH, **FFN, **INIT}.items() if isinstance(defaults.get(k), (int, float)) and defaults.get(k)}
    layers = next((defaults[k] for k in DEPTH if isinstance(defaults.get(k), int)), None)
    out.update({k: LAYERS for k in DEPTH if isinstance(defaults.get(k), int)})
    heads = next((defaults[k] for k in HEADS if isinstance(defaults.get(k), int)), None)
    out.update({k: 4 for k in HEADS if isinstance(defaults.get(k), int)})
    for k in KV_HEADS:
        if isinstance(defaults.get(k), int):
            out[k] = 1 if defaults[k] == 1 else 4 if defaults[k] == heads else 2
    out.update({k: v for k, v in HEAD_DIMS.items() if isinstance(defaults.get(k), int) and defaults.get(k)})
    if "head_dim" in out and defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]  # latent attention (DeepSeek): head_dim names the rotary part
    out.update({k: 8 for k in WINDOWS if isinstance(defaults.get(k), int) and defaults[k] > 0})
    for k in EXPERTS:
        if isinstance(defaults.get(k), int) and defaults[k] > 1:
            out[k] = min(defaults[k], 8)
    for k in TOP_K:
        if isinstance(defaults.get(k), int) and defaults[k] > 1:
            out[k] = min(defaults[k], 2)
    out.update({k: 1 for k in ONE if isinstance(defaults.get(k), int) and defaults[k] > 1})
    if defaults.get("is_encoder_decoder") and defaults.get("decoder_start_token_id") is None:
        start = defaults.get("pad_token_id") if defaults.get("pad_token_id") is not None else defaults.get("bos_token_id")
        if start is not None:
            out["decoder_start_token_id"] = start  # what the real checkpoints' config.json sets (t5-small: pad id 0)
    if "is_decoder" in defaults and not defaults.get("is_encoder_decoder"):
        out["is_decoder"] = True  # a causal-LM head on an encoder family (BERT-like): its decoder checkpoints set this
    for key, value in defaults.items():  # composite configs: the text (and other) sub-configs shrink alike
        if isinstance(value, dict) and "model_type" in value:
            out[key] = {**value, **shrink(value)}
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # per-layer overrides by index
            out[key] = {k: v for k, v in value.items() if int(k) < LAYERS}
    if layers:  # per-layer lists (layer types, no-rope layers, ...): one layer of each kind, in order
        for key, value in defaults.items():
            if isinstance(value, list) and len(value) == layers and key not in out:
                out[key] = _one_of_each(value)
    return out


def _no_zero_matrices(model) -> None:
    """Some inits leave matrices at exactly zero (AFMoE's router gate): every expert then ties, and a tie's
    winner is any implementation's choice. No trained checkpoint has an all-zero matrix; give them values."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, 0.1)


def _one_of_each(values: list) -> list:
    kinds = []
    for value in values:
        if value not in kinds:
            kinds.append(value)
    return (kinds + [values[0]] * LAYERS)[:LAYERS]


# -- one model type (in a child process) ---------------------------------------------------------

def check(model_type: str, seq2seq: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    try:
        config = AutoConfig.for_model(model_type)
        config = AutoConfig.for_model(model_type, **shrink(config.to_dict()))
        torch.manual_seed(0)
        model = (AutoModelForCausalLM, AutoModelForSeq2SeqLM)[seq2seq].from_config(config).eval()
        _no_zero_matrices(model)
    except Exception as exc:  # the shrinker's limit, not kvgraph's: say so
        return _failed(model_type, seq2seq, f"no tiny model from the default config: {_reason(exc)}")
    try:
        theirs = _transformers_greedy(model)
    except Exception as exc:
        return _failed(model_type, seq2seq, f"the tiny model does not generate in transformers itself: {_reason(exc)}")
    row = {"family": model_type, "kind": KINDS[seq2seq], "vocab": config.get_text_config().vocab_size,
           "class": type(model).__name__}
    for mode in ("dynamic", "static"):
        started = time.perf_counter()
        row[mode], row[f"{mode}_reason"] = _check_mode(model, mode, theirs)
        row[f"{mode}_seconds"] = round(time.perf_counter() - started, 1)
        row[f"{mode}_tracing"] = TRACING.pop() if TRACING else ""
    return row


def _check_mode(model, mode: str, theirs: list[int]) -> tuple[bool, str]:
    from kvgraph.export import export_model
    from kvgraph.runtime import Generator

    options = MODE_OPTIONS[mode]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_model(model, Path(tmp) / "out", **options, log=_note_tracing)
            ours = Generator.load(Path(tmp) / "out").generate(_prompt(model), NEW_TOKENS, min_new_tokens=NEW_TOKENS).token_ids
        except Exception as exc:  # the row records any failure, with its one-line reason
            return False, _reason(exc)
    if ours != theirs:
        step = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        return False, f"greedy tokens differ from transformers generate at new token {step}"
    return True, ""


TRACING: list[str] = []  # the export's line on how it traced the layers


def _note_tracing(message: str) -> None:
    if message.startswith(("traced ", "tracing all ")):
        TRACING.append(message)


def _prompt(model) -> list[int]:
    import numpy as np

    vocab = model.config.get_text_config().vocab_size
    return np.random.default_rng(0).integers(3, vocab, size=PROMPT).tolist()


def _transformers_greedy(model) -> list[int]:
    import torch

    from transformers import GenerationConfig

    ids = torch.tensor([_prompt(model)])
    own = model.generation_config
    start = own.decoder_start_token_id if own.decoder_start_token_id is not None else getattr(model.config, "decoder_start_token_id", None)
    plain = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id, bos_token_id=own.bos_token_id,
                             decoder_start_token_id=start)  # greedy only: no forced or suppressed tokens, no n-gram bans
    forced, own.forced_eos_token_id, own.forced_bos_token_id = (own.forced_eos_token_id, own.forced_bos_token_id), None, None
    try:  # generate merges the model's own generation config into `plain`: BART's forced eos would end every row
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=plain)
    finally:
        own.forced_eos_token_id, own.forced_bos_token_id = forced
    return out[0, 0 if model.config.is_encoder_decoder else ids.shape[1]:].tolist()[-NEW_TOKENS:]


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return (text if type(exc).__name__ in ("KvgraphError", "TraceError", "ValidationError") else f"{type(exc).__name__}: {text}")[:300]


# -- the walk ------------------------------------------------------------------------------------

def model_types() -> dict[str, bool]:
    """model_type -> is encoder-decoder, for every type in the two auto mappings."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    types = {name: False for name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    types.update({name: True for name in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES})
    return dict(sorted(types.items()))


def run_child(model_type: str, seq2seq: bool, timeout: float) -> dict:
    command = [sys.executable, __file__, "--one", model_type, "--layers", str(LAYERS)] + ["--seq2seq"] * seq2seq
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
    except subprocess.TimeoutExpired:
        return _failed(model_type, seq2seq, f"no result within {timeout:.0f} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        row = json.loads(lines[-1])
    else:
        errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith((" ", "Traceback"))]
        row = _failed(model_type, seq2seq, _child_reason(errors))
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _child_reason(errors: list[str]) -> str:
    last = errors[-1] if errors else "the process ended without a result"
    return last.replace("kvgraph.graphs.errors.", "").replace("ValueError: ", "")[:300]


def _failed(model_type: str, seq2seq: bool, reason: str) -> dict:
    return {"family": model_type, "kind": KINDS[seq2seq], "dynamic": False, "static": False,
            "dynamic_reason": reason, "static_reason": reason}


def table(rows: list[dict]) -> str:
    both = sum(r["dynamic"] and r["static"] for r in rows)
    lines = [f"**{both} of {len(rows)} model types pass in both cache modes** "
             f"({sum(r['dynamic'] for r in rows)} dynamic, {sum(r['static'] for r in rows)} static).", "",
             "| family | kind | dynamic | static | reason |" + " tracing |" * (LAYERS != 2), "|---|---|---|---|---|" + "---|" * (LAYERS != 2)]
    for r in rows:
        reasons = [r["dynamic_reason"]] if r["dynamic_reason"] == r["static_reason"] else [
            f"{mode}: {r[f'{mode}_reason']}" for mode in ("dynamic", "static") if r[f"{mode}_reason"]]
        reason = "; ".join(x for x in reasons if x).replace("|", "\\|")
        tracing = f" {r.get('dynamic_tracing', '')} |" if LAYERS != 2 else ""
        lines.append(f"| {r['family']} | {r['kind']} | {MARKS[r['dynamic']]} | {MARKS[r['static']]} | {reason} |{tracing}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--seq2seq", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--merge", action="store_true", help="with --only: replace those rows in the saved results, rewrite the table")
    parser.add_argument("--layers", type=int, default=2, help="layers of each tiny model (default 2)")
    args = parser.parse_args()
    global LAYERS
    LAYERS = args.layers
    if args.one:
        print(json.dumps(check(args.one, args.seq2seq)))
        return
    types = model_types()
    if args.only:
        unknown = [name for name in args.only.split(",") if name not in types]
        if unknown:
            parser.error(f"--only: not in transformers' causal-LM or seq2seq-LM mappings: {', '.join(unknown)}")
        types = {name: types[name] for name in args.only.split(",")}
    started = time.perf_counter()
    rows = run_all(types, args.jobs, args.timeout)
    note = f"\nMeasured by `python benchmarks/coverage.py{_layers_option()}` in {(time.perf_counter() - started) / 60:.0f} min ({args.jobs} jobs).\n"
    if args.only and args.merge:  # a partial rerun: the saved rows, these replaced, and the full run's note kept
        rerun = {r["family"] for r in rows}
        rows += [r for r in json.loads(_results(".json").read_text()) if r["family"] not in rerun]
        note = "\nMeasured by" + _results(".md").read_text().split("\n\nMeasured by", 1)[1]
    rows.sort(key=lambda r: r["family"])
    text = table(rows) + note
    if not args.only or args.merge:
        save(rows, text)
    print(text)


def _layers_option() -> str:
    return f" --layers {LAYERS}" if LAYERS != 2 else ""


def _results(suffix: str) -> Path:
    return RESULTS / (f"coverage-{LAYERS}-layers{suffix}" if LAYERS != 2 else f"coverage{suffix}")


def run_all(types: dict[str, bool], jobs: int, timeout: float) -> list[dict]:
    rows = []
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_child, name, seq2seq, timeout) for name, seq2seq in types.items()]
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            rows.append(r)
            print(f"[{len(rows)}/{len(types)}] {r['family']}: " + "; ".join(f"{mode} {_status(r, mode)} [{r.get(mode + '_tracing', '')}]" for mode in MODE_OPTIONS), flush=True)
    return rows


def _status(row: dict, mode: str) -> str:
    return "ok" if row[mode] else row[f"{mode}_reason"]


def save(rows: list[dict], text: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    _results(".json").write_text(json.dumps(rows, indent=1) + "\n")
    _results(".md").write_text(text)


if __name__ == "__main__":
    main()
