"""`kvgraph generate DIR --prompt ...`: generation from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from kvgraph.graphs import KvgraphError
from kvgraph.runtime.decoding.constrained import Constraint, read_schema
from kvgraph.runtime.core.session import WEIGHT_POLICIES
from kvgraph.runtime.generator import GenerationInterrupted, GenerationResult, Generator


HELP = "generate text from an export directory with onnxruntime"  # shown by `kvgraph --help` (the command is registered in pyproject.toml)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="an export directory (from kvgraph export)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the model's chat template")
    # Decoding options left out come from the export's generation_config.json, as transformers' generate() takes them,
    # then kvgraph's defaults (greedy, 64 new tokens): `kvgraph inspect DIR` lists the ones in force.
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the generation config's, else 64")
    parser.add_argument("--min-new-tokens", type=int, default=None, help="eos cannot end the text before this many new tokens")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy (the default unless the generation config samples)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--forced-bos-token", type=int, default=None, metavar="ID", help="the first new token (mBART-50, NLLB: the target language)")
    parser.add_argument("--target-lang", default=None, metavar="CODE", help="the same by its token, e.g. de_DE or deu_Latn")
    parser.add_argument("--ignore-generation-config", action="store_true", help="kvgraph's defaults, not the export's generation_config.json")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams (as transformers' num_beams)")
    parser.add_argument("--length-penalty", type=float, default=None, help="beam search: score = sum log p / length ** this")
    parser.add_argument("--early-stopping", type=_early_stopping, default=None, metavar="true|false|never",
                        help="beam search: when to stop (transformers' early_stopping)")
    parser.add_argument("--num-return-sequences", type=int, default=None, help="beam search: the best N beams per prompt")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None, help="no n-gram of this size occurs twice")
    parser.add_argument("--speculative", default=None, metavar="prompt-lookup|DRAFT_DIR",
                        help="speculative decoding: draft with prompt lookup or a smaller export of the same tokenizer (same tokens, faster)")
    parser.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per step with --speculative (default 4)")
    parser.add_argument("--json-schema", default=None, metavar="SCHEMA_OR_FILE", help="structured output: a JSON schema (text or a file)")
    parser.add_argument("--regex", default=None, help="structured output: the text matches this regular expression")
    parser.add_argument("--grammar", default=None, metavar="GRAMMAR_OR_FILE", help="structured output: a Lark or GBNF grammar (text or a file)")
    parser.add_argument("--stop", action="append", default=[], help="stop when this text appears (cut before it); repeatable")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument("--no-cache", action="store_true", help="recompute every step with the prefill graph (no KV cache)")
    parser.add_argument("--provider", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--max-cache-memory", type=parse_size, default="auto", metavar="SIZE",
                        help="refuse requests whose KV cache needs more, e.g. 2GB or 512MB; 'none' for no limit "
                             "(default: half of physical memory)")
    parser.add_argument("--weights", choices=WEIGHT_POLICIES, default="auto",
                        help="how sessions hold the weights: one-session (one prepacked copy; the default for decoder-only "
                             "exports), mapped (one mapped copy read unpacked by every session), per-session (a prepacked copy each)")
    parser.add_argument("--no-share-weights", action="store_true", help="the same as --weights per-session")


NOT_DECODING = ("chat", "stop", "use_cache", "target_lang", "speculative", "draft_tokens", "constraint")


def run(args: argparse.Namespace) -> int:
    generator = Generator.load(args.directory, provider=args.provider, threads=args.threads, max_cache_bytes=args.max_cache_memory,
                               weights="per-session" if args.no_share_weights else args.weights,
                               generation_config=not args.ignore_generation_config)
    options = dict(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, chat=args.chat, stop=args.stop, use_cache=not args.no_cache,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, no_repeat_ngram_size=args.no_repeat_ngram_size,
        forced_bos_token_id=args.forced_bos_token, target_lang=args.target_lang,
    )
    if args.speculative:
        options.update(speculative=args.speculative, draft_tokens=args.draft_tokens)
    constraint = Constraint.build(generator, json_schema=read_schema(args.json_schema) if args.json_schema else None, regex=args.regex,
                                  grammar=read_schema(args.grammar) if args.grammar else None)
    if constraint is not None:
        options["constraint"] = constraint
    beams = dict(num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=args.early_stopping,
                 num_return_sequences=args.num_return_sequences)
    searched = generator.resolve({**{k: v for k, v in options.items() if k not in NOT_DECODING}, **beams}, args.target_lang).beams
    if args.stream and (args.num_beams or 1) > 1:
        raise KvgraphError("--stream does not combine with --num-beams: the beams are ranked when the search ends")
    if (searched.search or searched.num_return_sequences > 1) and not args.stream:  # streaming: Generator.stream says what it leaves out
        for ranked in generator.generate(list(args.prompt), **options, **beams):
            for result in ranked if isinstance(ranked, list) else [ranked]:
                _print(result, args.json)
        return 0
    if args.stream and not args.json:
        for prompt in args.prompt:
            try:
                for piece in generator.stream(prompt, **options):
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:  # Ctrl-C: what was generated is printed, then the interrupt is reported
                print()
                raise
            print()
        return 0
    try:
        results = generator.generate(list(args.prompt), **options)
    except GenerationInterrupted as interrupted:
        for result in interrupted.results:
            _print(result, args.json)
        raise
    for result in results:
        _print(result, args.json)
    return 0


def _early_stopping(text: str) -> bool | str:
    value = text.strip().lower()
    if value not in ("true", "false", "never"):
        raise argparse.ArgumentTypeError(f"not one of true, false, never: {text!r}")
    return {"true": True, "false": False}.get(value, "never")


def parse_size(text: str) -> int | None | str:
    """'2GB', '512MB', '1.5GiB', '1000000' -> bytes; 'none' -> None (no limit); 'auto' stays 'auto'."""
    value = text.strip().lower()
    if value in ("none", "auto"):
        return None if value == "none" else "auto"
    units = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1, "": 1}
    number = value.rstrip("gimkb")
    try:
        count = float(number) * units[value[len(number):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 512MB, or none)") from None
    if count <= 0:
        raise argparse.ArgumentTypeError(f"the cache budget must be positive, got {text!r}")
    return int(count)


def _print(result: GenerationResult, as_json: bool) -> None:
    if as_json:
        extra = {} if result.score is None else {"score": result.score}
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason, **extra, "stats": asdict(result.stats)}))
    else:
        print(result.text)
        print(f"[{result.finish_reason}] {result.stats.summary()}", file=sys.stderr)
