"""Generator: text (or token ids) in, text out, over the prefill and decode graphs.

    gen = Generator.load("out/", provider="cpu")
    gen.generate("Once upon a time", max_new_tokens=64).text
    for piece in gen.stream("Tell me a story"): print(piece, end="")
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from kvgraph.graphs import KvgraphError
from kvgraph.graphs.contract import VERIFY
from kvgraph.graphs.modes import Positions
from kvgraph.graphs.generation_config import GenerationDefaults
from kvgraph.runtime.core.budget import cache_need, default_cache_budget, size_text
from kvgraph.runtime.core.loop import BatchRun, Request, RowState
from kvgraph.runtime.core.sampling import Sampling, TokenLogprob, token_logprob
from kvgraph.runtime.core.session import LoadedGraphs, load_graphs
from kvgraph.runtime.core.steppers import CachedSteps, stepper_for
from kvgraph.runtime.core.steps import KVCache, extend, new_cache, run_step
from kvgraph.runtime.core.text import IncrementalText, TextCodec
from kvgraph.runtime.decoding.beam import BeamOptions, beam_search
from kvgraph.runtime.decoding.constrained import Constraint
from kvgraph.runtime.decoding.speculative import DraftModel, PromptLookup, SpeculativeSteps, checked_draft, common_prefix


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_tokens_per_s: float
    drafted: int = 0  # speculative decoding: tokens drafted, and drafted tokens the loop chose
    accepted: int = 0

    def summary(self) -> str:
        drafts = f", {self.accepted}/{self.drafted} drafted tokens accepted" if self.drafted else ""
        return (f"{self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens, prefill {self.prefill_ms:.1f} ms, "
                f"decode {self.decode_tokens_per_s:.1f} tok/s{drafts}")


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only (an eos that ended the row included)
    finish_reason: str  # "eos", "stop" or "length"
    stats: GenerationStats
    score: float | None = None  # beam search: sum of log-probs / (generated length ** length_penalty), as transformers' sequences_scores
    logprobs: list[TokenLogprob] | None = None  # each generated token's, when the request asked for them (Request.logprobs)


DEFAULT_NEW_TOKENS = 64  # kvgraph's own length when neither the caller nor the generation config sets one
BEAM_KEYS = ("num_beams", "length_penalty", "early_stopping", "num_return_sequences")


@dataclass(frozen=True)
class Decoding:
    """One call's settings once resolved (Generator.resolve): lengths, sampling and processors, beams."""

    max_new_tokens: int | None  # None: from max_length, else DEFAULT_NEW_TOKENS
    max_length: int | None  # transformers' max_length: the decoder's whole sequence, prompt (or start token) included
    min_new_tokens: int
    sampling: Sampling
    beams: BeamOptions

    def sized(self, requests: list[Request], decoder_length: int) -> list[Request]:
        """The requests with their max_new_tokens: given, or max_length less the decoder's (padded) input length."""
        if self.max_new_tokens is not None:
            new = self.max_new_tokens
        elif self.max_length is not None:
            new = max(1, self.max_length - decoder_length)
        else:
            new = DEFAULT_NEW_TOKENS
        return [replace(r, max_new_tokens=new) for r in requests]


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generate(): `results` hold what each row had generated (finish_reason "interrupted")."""

    def __init__(self, results: list[GenerationResult]) -> None:
        super().__init__("generation interrupted")
        self.results = results


class Generator:
    """One loaded export. Thread-safe: every call owns its own cache.

    max_cache_bytes: refuse, before running, a request whose KV cache would need more (default:
    half of physical memory; None: no limit).
    """

    def __init__(self, graphs: LoadedGraphs, codec: TextCodec | None, max_cache_bytes: int | None = None) -> None:
        self.graphs = graphs
        self.codec = codec
        self.max_cache_bytes = max_cache_bytes
        tokens = graphs.manifest.special_tokens
        self.eos_ids = frozenset(tokens.eos_token_ids)
        self.pad_id = tokens.feed_pad_id
        self._drafts: dict = {}  # speculative decoding: draft exports opened so far, by directory
        self.defaults = GenerationDefaults()  # the export's generation config (load() reads it)

    @classmethod
    def load(cls, directory: str | Path, provider: str = "cpu", threads: int | None = None, share_weights: bool = True,
             cuda_graph: bool = False, max_cache_bytes: int | None | str = "auto", weights: str | None = None,
             exact: bool = False, generation_config: bool = True) -> Generator:
        """weights: how sessions hold the weights, one of session.WEIGHT_POLICIES (default: one copy, prepacked where possible).
        exact: quantized exports without onnxruntime's int8-activation kernel (see session.load_graphs).
        generation_config: apply the export's generation_config.json as generate() defaults (False: kvgraph's own)."""
        graphs = load_graphs(directory, provider, threads, share_weights, cuda_graph, weights, exact)
        has_tokenizer = (Path(directory) / "tokenizer.json").is_file()
        budget = default_cache_budget() if max_cache_bytes == "auto" else max_cache_bytes
        generator = cls(graphs, TextCodec(Path(directory)) if has_tokenizer else None, budget)
        if generation_config:
            generator.defaults = GenerationDefaults.read(directory)
        return generator

    # -- public API --------------------------------------------------------------------------

    def generate(self, prompt, max_new_tokens: int | None = None, *, chat: bool = False, stop: Sequence[str] = (),
                 use_cache: bool = True, min_new_tokens: int | None = None, json_schema=None, regex: str | None = None,
                 grammar: str | None = None, constraint: Constraint | None = None, speculative=None, draft_tokens: int = 4,
                 target_lang: str | None = None, **options):
        """One prompt -> one result; a list of prompts -> a left-padded batch, one result each.

        options: the decoding settings transformers' generate() takes (num_beams, length_penalty, early_stopping,
        num_return_sequences, max_length, min_length, temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff,
        eta_cutoff, repetition_penalty, no_repeat_ngram_size, bad_words_ids, forced_bos_token_id, suppress_tokens, ...,
        seed). Those not passed come from the export's generation_config.json, as in transformers (Generator.defaults),
        then kvgraph's defaults (greedy, 64 new tokens). temperature 0 is greedy whatever the config says.
        target_lang: the target language's token (e.g. "de_DE") forced first, for mBART-50 / NLLB exports.
        min_new_tokens: eos cannot end a row before this many new tokens (as in Hugging Face generate).
        num_beams > 1: beam search, as transformers' generate(num_beams=..., length_penalty=..., early_stopping=...)
        (runtime/decoding/beam.py); num_return_sequences > 1 makes each prompt's result a list of that many, best first.
        json_schema / regex / grammar (or a prebuilt constraint): structured output (runtime/decoding/constrained.py).
        speculative: "prompt-lookup" or a draft export's directory, drafting draft_tokens tokens a step
        (runtime/decoding/speculative.py); the tokens are those of decoding without it.
        """
        batch = isinstance(prompt, list) and prompt and not isinstance(prompt[0], (int, np.integer))
        prompts = list(prompt) if batch else [prompt]
        decoding = self.resolve({"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, **options}, target_lang)
        requests = [self.request(p, 1, chat, stop, decoding.min_new_tokens) for p in prompts]
        requests = decoding.sized(requests, max(len(self.decoder_prefix(r)) for r in requests))
        beams, settings = decoding.beams, decoding.sampling
        constraint = constraint or Constraint.build(self, json_schema, regex, grammar)
        speculation = self._speculation(speculative, draft_tokens, use_cache, beams)
        if beams.search:
            if constraint is not None:
                raise KvgraphError("structured output (json_schema, regex, grammar) does not combine with num_beams > 1")
            results = self._beam_search(requests, settings, beams, use_cache)
        elif speculation is not None:  # one row at a time: each row accepts drafts at its own pace
            results = [self._run([r], settings, use_cache, constraint, speculation)[0] for r in requests]
        else:
            results = self._run(requests, settings, use_cache, constraint)
        return results if batch else results[0]

    def resolve(self, caller: dict, target_lang: str | None = None, beams: bool = True, warn_beams: bool = False) -> Decoding:
        """The caller's settings over the export's generation config over kvgraph's defaults (generation_config.py).
        beams=False (streaming, serving): a num_beams from the generation config is not applied; one the caller asks for
        is refused."""
        if target_lang is not None:
            caller = {**caller, "forced_bos_token_id": self.token_id(target_lang, "target_lang")}
        merged = self.defaults.merged(caller)
        if not beams:
            if (caller.get("num_beams") or 1) > 1:
                raise KvgraphError("num_beams > 1 runs a beam search, which does not stream; use generate()")
            if merged.get("num_beams", 1) > 1 and caller.get("num_beams") is None and warn_beams:
                warnings.warn(f"{self.defaults.source}: num_beams={merged['num_beams']} is not applied while streaming (a beam "
                              "search ranks its beams when it ends); pass num_beams=1 to silence this", stacklevel=3)
            for key in BEAM_KEYS:
                merged.pop(key, None)
        beam_options = BeamOptions(**{key: merged.pop(key) for key in BEAM_KEYS if key in merged})
        max_new, max_length = merged.pop("max_new_tokens", None), merged.pop("max_length", None)
        if caller.get("max_new_tokens") is None and caller.get("max_length") is not None:
            max_new = None  # the caller's max_length wins over the config's max_new_tokens
        min_new = merged.pop("min_new_tokens", None) or 0
        return Decoding(max_new, max_length, min_new, Sampling.of(merged), beam_options)

    def token_id(self, token: str, option: str) -> int:
        """The id of one token of the vocabulary (a language code such as "de_DE" or "deu_Latn")."""
        token_id = self.need_codec().token_to_id(token)
        if token_id is None:
            raise KvgraphError(f"{option}: {token!r} is not a token of this export's vocabulary")
        return token_id

    def stream(self, prompt, max_new_tokens: int | None = None, *, chat: bool = False, stop: Sequence[str] = (),
               use_cache: bool = True, min_new_tokens: int | None = None, json_schema=None, regex: str | None = None,
               grammar: str | None = None, constraint: Constraint | None = None, speculative=None, draft_tokens: int = 4,
               target_lang: str | None = None, **options) -> Iterator[str]:
        """Yield text pieces as tokens arrive; their concatenation equals generate(...).text (greedy or sampled: a
        generation config's num_beams is not applied here)."""
        decoding = self.resolve({"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, **options}, target_lang, beams=False,
                                warn_beams=True)
        request = self.request(prompt, 1, chat, stop, decoding.min_new_tokens)
        request = decoding.sized([request], len(self.decoder_prefix(request)))[0]
        text = IncrementalText(self.need_codec(), hold=max((len(s) for s in stop), default=1) - 1)
        constraint = constraint or Constraint.build(self, json_schema, regex, grammar)
        speculation = self._speculation(speculative, draft_tokens, use_cache, BeamOptions())
        with self.graphs.request_turn():
            run, _ = self.start([request], decoding.sampling, use_cache, constraint, speculation)
            try:
                for b, token in run:
                    if run.rows[b].finish_reason != "stop":  # the stop string's token: the cut text is released below
                        piece = text.push(token)
                        if piece:
                            yield piece
            except KeyboardInterrupt:
                yield text.finish(self.text_of(run.rows[0].tokens))  # what was held back, then the interrupt goes on
                raise
        yield text.finish(run.rows[0].text)

    def chat(self, **options) -> Conversation:
        _refuse(self.graphs.steps.chat(), f"{self.graphs.directory}: ")
        _refuse(self.graphs.captured("a conversation keeps its cache between turns"))
        return Conversation(self, self.resolve(options, beams=False).sampling)

    # -- internals ---------------------------------------------------------------------------

    def need_codec(self) -> TextCodec:
        if self.codec is None:
            raise KvgraphError(f"{self.graphs.directory}: no tokenizer.json in this export; pass token ids")
        return self.codec

    def request(self, prompt, max_new_tokens: int = 64, chat: bool = False, stop: Sequence[str] = (),
                min_new_tokens: int = 0) -> Request:
        """A prompt (text, encoded with the chat template when chat, or token ids) as the loop's Request."""
        if isinstance(prompt, str):
            if not prompt:
                raise KvgraphError("the prompt is empty")
            codec = self.need_codec()
            ids = codec.encode_chat([{"role": "user", "content": prompt}]) if chat else codec.encode(prompt)
        elif isinstance(prompt, Sequence) and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        return Request(ids, max_new_tokens, tuple(stop), min_new_tokens)

    def _speculation(self, speculative, draft_tokens: int, use_cache: bool, beams: BeamOptions):
        """(drafter, k) for speculative decoding, or None; refusals before anything runs."""
        if speculative is None:
            return None
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, (int, np.integer)) or not 1 <= draft_tokens <= 64:
            raise KvgraphError(f"draft_tokens must be an integer between 1 and 64, got {draft_tokens!r}")
        _refuse(self.graphs.steps.speculation())
        if beams.search or not use_cache:
            raise KvgraphError("speculative decoding does not combine with num_beams > 1 or use_cache=False")
        _refuse(self.graphs.captured("speculative decoding rolls the cache back"))
        drafter = self._drafter(speculative)
        self.graphs.session(VERIFY)  # opened now, not inside the first step's timing
        return drafter, int(draft_tokens)

    def _drafter(self, speculative):
        """"prompt-lookup", a draft export's directory, or a loaded Generator -> the drafter."""
        if speculative == "prompt-lookup":
            return PromptLookup()
        if isinstance(speculative, Generator):
            return DraftModel(checked_draft(speculative, self))
        if not isinstance(speculative, (str, Path)):
            raise KvgraphError(f"speculative must be 'prompt-lookup', a draft export's directory or a Generator, "
                               f"got {type(speculative).__name__}")
        if not Path(speculative, "kvgraph.json").is_file():
            raise KvgraphError(f"speculative must be 'prompt-lookup' or a draft export's directory; {speculative} has no kvgraph.json")
        key = str(Path(speculative).resolve())
        if key not in self._drafts:  # loaded and checked once
            loaded = Generator.load(speculative, provider=self.graphs.device.provider, threads=self.graphs.threads)
            self._drafts[key] = checked_draft(loaded, self)
        return DraftModel(self._drafts[key])

    def _run(self, requests: list[Request], sampling: Sampling, use_cache: bool, constraint: Constraint | None = None,
             speculation=None) -> list[GenerationResult]:
        with self.graphs.request_turn():
            run, prefill_s = self.start(requests, sampling, use_cache, constraint, speculation)
            try:
                run.run()
            except KeyboardInterrupt:
                for row in run.rows:
                    if not row.finished:
                        row.finish_reason, row.text = "interrupted", self.text_of(row.tokens)
                raise GenerationInterrupted([self.result(r, row, prefill_s, run) for r, row in zip(requests, run.rows)]) from None
        return [self.result(r, row, prefill_s, run) for r, row in zip(requests, run.rows)]

    def _beam_search(self, requests: list[Request], sampling: Sampling, beams: BeamOptions, use_cache: bool) -> list:
        beams.refuse(sampling, requests, use_cache)
        _refuse(self.graphs.captured("beam search reorders the cache between steps"))
        k = beams.num_beams
        self.check([r for r in requests for _ in range(k)])  # k rows per prompt
        ids, mask = self.graphs.steps.kind.pad([r.prompt_ids for r in requests], self.pad_id)
        ids, mask = np.repeat(ids, k, axis=0), np.repeat(mask, k, axis=0)
        decoder_prompt = np.array([self.decoder_prefix(Request(list(row), 1)) for row in ids], dtype=np.int64)
        with self.graphs.request_turn():
            found = beam_search(stepper_for(self.graphs, use_cache), ids, decoder_prompt, mask, requests[0],
                                sampling, beams, self.eos_ids, len(requests), self.graphs.contract.kind == "encoder-decoder")
        rate = found.decode_steps / found.decode_seconds if found.decode_seconds > 0 else 0.0
        results = []
        for request, ranked, scores in zip(requests, found.tokens, found.scores):
            out = []
            for tokens, score in zip(ranked[: beams.num_return_sequences], scores):
                stats = GenerationStats(len(request.prompt_ids), len(tokens), found.prefill_s * 1e3, rate)
                reason = "eos" if tokens and tokens[-1] in self.eos_ids else "length"
                out.append(GenerationResult(self.text_of(tokens), tokens, reason, stats, float(score)))
            results.append(out if beams.num_return_sequences > 1 else out[0])
        return results

    def start(self, requests: list[Request], sampling: Sampling, use_cache: bool = True,
              constraint: Constraint | None = None, speculation=None) -> tuple[BatchRun, float]:
        """Check the requests, run the prefill: (the BatchRun that generates when iterated, the prefill's seconds).
        The caller holds graphs.request_turn() while it runs (the serving engines do)."""
        self.check(requests)
        ids, mask = self.graphs.steps.kind.pad([r.prompt_ids for r in requests], self.pad_id)
        if speculation is not None:
            stepper = SpeculativeSteps(self.graphs, *speculation, requests[0].prompt_ids)
        else:
            stepper = stepper_for(self.graphs, use_cache)
        start = time.perf_counter()
        logits = stepper.first(ids, mask)
        seq2seq = self.graphs.contract.kind == "encoder-decoder"
        run = BatchRun(requests, logits, stepper.mask, stepper.next, sampling, self, constraint,
                       stepper if speculation is not None else None, sequences=None if seq2seq else ids, sources=ids if seq2seq else None)
        return run, time.perf_counter() - start

    def check(self, requests: list[Request]) -> None:
        """Refuse, before anything runs, requests that are empty, out of the vocabulary or do not fit."""
        contract = self.graphs.contract
        self._check_cache_budget(requests)
        for request in requests:
            if not request.prompt_ids:
                raise KvgraphError("the prompt is empty (no tokens)")
            if request.max_new_tokens < 1:
                raise KvgraphError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
            if request.min_new_tokens < 0:
                raise KvgraphError(f"min_new_tokens must be >= 0, got {request.min_new_tokens}")
            bad = [t for t in request.prompt_ids if not 0 <= t < contract.vocab_size]
            if bad:
                raise KvgraphError(f"token id {bad[0]} is outside the vocabulary [0, {contract.vocab_size})")
            self._check_positions(self.graphs.steps.kind.positions(len(request.prompt_ids), request.max_new_tokens))

    def room(self, prompt_tokens: int) -> int | None:
        """The most new tokens a prompt of this length can have (the static cache's or the model's positions); None: no limit known."""
        limits = [n for n in (self.graphs.steps.cache.capacity(self.graphs.contract), self.graphs.manifest.model.max_positions) if n]
        return max(0, min(limits) - self.graphs.steps.kind.positions(prompt_tokens, 0).decoder) if limits else None

    def _check_positions(self, need: Positions) -> None:
        capacity = self.graphs.steps.cache.capacity(self.graphs.contract)
        max_positions = self.graphs.manifest.model.max_positions
        if capacity and need.decoder > capacity:
            raise KvgraphError(f"{need.decoder_text} exceeds the static cache's {capacity} positions (export with a larger --max-length)")
        if max_positions and need.source > max_positions:
            raise KvgraphError(f"{need.source_text} exceeds the encoder's max positions ({max_positions})")
        if max_positions and need.decoder > max_positions:
            whose = "decoder's" if need.source_text else "model's"
            raise KvgraphError(f"{need.decoder_text} exceeds the {whose} max positions ({max_positions})")

    def _check_cache_budget(self, requests: list[Request]) -> None:
        """Refuse up front a request whose KV cache would not fit the budget (rather than dying mid-way)."""
        if self.max_cache_bytes is None:
            return
        need, how = cache_need(self.graphs.contract, [len(r.prompt_ids) for r in requests], max(r.max_new_tokens for r in requests))
        if need > self.max_cache_bytes:
            raise KvgraphError(f"this request needs {size_text(need)} of KV cache ({how}), over the cache budget of "
                               f"{size_text(self.max_cache_bytes)} (Generator.load(max_cache_bytes=...), kvgraph generate --max-cache-memory)")

    def decoder_prefix(self, request: Request) -> list[int]:
        """The decoder's sequence before the first new token: the prompt, or an encoder-decoder's start token."""
        return self.graphs.steps.kind.decoder_prefix(request.prompt_ids, self.graphs.manifest.special_tokens.decoder_start_token_id)

    def text_of(self, token_ids: list[int]) -> str:
        return self.codec.decode(token_ids) if self.codec is not None else ""

    def result(self, request: Request, row: RowState, prefill_s: float, run: BatchRun) -> GenerationResult:
        """One row of a finished (or interrupted) run as a GenerationResult."""
        rate = run.decode_steps / run.decode_seconds if run.decode_seconds > 0 else 0.0
        drafts = run.speculation
        stats = GenerationStats(len(request.prompt_ids), len(row.tokens), prefill_s * 1e3, rate,
                                drafts.proposed if drafts else 0, drafts.accepted if drafts else 0)
        logprobs = list(row.logprobs) if request.logprobs is not None else None
        return GenerationResult(row.text, list(row.tokens), row.finish_reason, stats, logprobs=logprobs)

    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first), with the `top` best
        alternatives: one call of the verify graph (logits at every position) on an empty cache of its own."""
        _refuse(self.graphs.steps.speculation(), "prompt log-probabilities need the verify graph: ")
        self.check([Request(list(ids), 1)])
        tokens = np.array([ids], dtype=np.int64)
        logits, _, _ = run_step(self.graphs, new_cache(self.graphs, 1), VERIFY, tokens, np.ones_like(tokens))
        return [None] + [token_logprob(logits[0, i], ids[i + 1], top) for i in range(len(ids) - 1)]


def _refuse(reason: str | None, prefix: str = "") -> None:
    """Raise a capability's refusal (None: allowed)."""
    if reason:
        raise KvgraphError(prefix + reason)


@dataclass
class Conversation:
    """A multi-turn chat that keeps its cache: a follow-up turn processes only its new tokens."""

    generator: Generator
    sampling: Sampling
    messages: list[dict[str, str]] = field(default_factory=list)
    cached_ids: list[int] = field(default_factory=list)  # tokens whose K/V are in `cache`
    cache: KVCache | None = None
    processed_tokens: list[int] = field(default_factory=list)  # per turn: tokens run through a graph before generating

    def send(self, text: str, max_new_tokens: int = 64, stop: Sequence[str] = ()) -> GenerationResult:
        if not text:
            raise KvgraphError("the message is empty")
        codec = self.generator.need_codec()
        self.messages.append({"role": "user", "content": text})
        ids = codec.encode_chat(self.messages)
        request = Request(ids, max_new_tokens, tuple(stop))
        self.generator.check([request])
        start = time.perf_counter()
        stepper, logits, mask = self._resume(ids)
        prefill_s = time.perf_counter() - start
        run = BatchRun([request], logits, mask, stepper.next, self.sampling, self.generator).run()
        row = run.rows[0]
        self.cache = stepper.cache
        self.cached_ids = ids + row.tokens[:-1]  # the last token was sampled, never fed
        self.messages.append({"role": "assistant", "content": row.text})
        return self.generator.result(request, row, prefill_s, run)

    def _resume(self, ids: list[int]):
        """Reuse the cache for the longest common prefix; run only the new tokens through the graphs."""
        common = common_prefix(self.cached_ids, ids[:-1])
        common = self.cache.reusable(common) if self.cache is not None else 0
        graphs = self.generator.graphs
        if common == 0 or self.cache is None:
            stepper = CachedSteps(graphs)
            array = np.array([ids], dtype=np.int64)
            logits = stepper.first(array, np.ones_like(array))
            self.processed_tokens.append(len(ids))
            return stepper, logits, np.ones_like(array)
        mask = np.ones((1, len(ids)), dtype=np.int64)
        new = np.array([ids[common:]], dtype=np.int64)
        logits, cache = extend(graphs, self.cache.truncated(common), new, mask)  # all new tokens in one call
        stepper = CachedSteps(graphs, cache)
        logits = logits[:, -1]
        self.processed_tokens.append(len(ids) - common)
        return stepper, logits, mask
