"""How far a quantized export departs from the float export it was made from: the quality report.

    report = measure(float_dir, quantized_dir)              # the float side kept in float_dir/quality-reference/
    report.shortfalls(min_top1=0.9, max_ppl_ratio=1.1)   # reasons, empty when it passes

    workload = Workload.of(float_dir)                       # or piece by piece, for other systems' logits
    answers = answer(float_dir, workload, scratch_dir)      # one export at a time: logits on disk, greedy tokens
    other = answer(other_dir, workload, other_scratch, sequences=answers.sequences)  # the reference's targets
    compare(workload, answers, other)                       # -> QualityReport

- Next-token figures over a fixed public-domain text (quality_text.txt beside this module: the
  Declaration of Independence and two of Lincoln's addresses, about 2,900 SmolLM2 tokens): the text
  is cut into windows, each read from scratch by the prefill graph with logits at every position;
  top-1 agreement, mean KL(float || quantized) and the perplexity of both.
- Greedy agreement: 64 new tokens on 8 fixed prompts, through the runtime's own loop.
- An encoder-decoder is scored on teacher-forced targets: the text is cut into sources, the reference's
  greedy translation of each (NEW_TOKENS, end-of-sequence suppressed until then) is its target, and
  both exports read every target after the decoder's start token with logits at every position. The
  prompts are sources as well: the greedy agreement compares what each export writes for them.

An export without tokenizer.json is scored on fixed pseudo-random token ids instead (the report
says so): the comparison between the two exports stays exact, only the text is not language.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from kvgraph.graphs.contract import ATTENTION_MASK, ENCODER_HIDDEN, INPUT_IDS
from kvgraph.graphs.errors import KvgraphError
from kvgraph.graphs.manifest import Manifest, graph_file
from kvgraph.graphs.modes import step_adapter
from kvgraph.graphs.safety import check_graph_file
from kvgraph.runtime.core.sampling import log_softmax
from kvgraph.runtime.core.text import TextCodec

TEXT = Path(__file__).with_name("quality_text.txt")
WINDOW = 256  # tokens a window holds (fewer if the export holds fewer positions)
SOURCE_WINDOW = 64  # an encoder-decoder's sources: tokens each (fewer if the model holds fewer positions)
SOURCES = 16  # at most: each source is decoded greedily by the reference, then scored teacher-forced
NEW_TOKENS = 64
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "The three primary colors are",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "The most important lesson I learned in school was",
    "Water boils at a temperature of",
)


@dataclass(frozen=True)
class QualityReport:
    text: str  # what was scored
    tokens: int  # next-token predictions compared
    window: int
    top1_agreement: float
    mean_kl: float  # nats per token, KL(float || quantized)
    perplexity_float: float
    perplexity_quantized: float
    greedy_prompts: int
    greedy_new_tokens: int
    greedy_identical: int  # prompts whose new tokens are all the same
    greedy_common_prefix: float  # mean share of new tokens before the first difference

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_quantized / self.perplexity_float

    def to_json(self) -> dict:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio}

    def shortfalls(self, min_top1: float, max_ppl_ratio: float) -> list[str]:
        reasons = []
        if self.top1_agreement < min_top1:
            reasons.append(f"top-1 agreement {100 * self.top1_agreement:.2f} % is below {100 * min_top1:.2f} %")
        if self.perplexity_ratio > max_ppl_ratio:
            reasons.append(f"perplexity ratio {self.perplexity_ratio:.4f} is above {max_ppl_ratio:.4f}")
        return reasons

    def table(self, against: str = "the float export") -> str:
        return "\n".join([
            f"quality against {against} ({self.text}, {self.tokens} next-token predictions in windows of {self.window}):",
            f"  top-1 agreement   {100 * self.top1_agreement:.2f} %",
            f"  mean KL           {self.mean_kl:.5f} nats/token",
            f"  perplexity        {self.perplexity_float:.4f} float, {self.perplexity_quantized:.4f} quantized "
            f"({self.perplexity_ratio:.4f}x)",
            f"  greedy            {self.greedy_identical}/{self.greedy_prompts} prompts identical over {self.greedy_new_tokens} "
            f"new tokens; {100 * self.greedy_common_prefix:.1f} % of tokens before the first difference",
        ])


def measure(reference: str | Path, quantized: str | Path, threads: int | None = None,
            log: Callable[[str], None] = lambda message: None) -> QualityReport:
    """Score both exports of one model on the same text and prompts, one export at a time: the float reference's
    logits wait on disk while the quantized export runs, so the report holds one model's weights at a time (at 1B
    parameters the float weights and the quantized ones together would top the export's own peak)."""
    workload = Workload.of(reference)
    log(f"quality: scoring {workload.tokens} tokens of {workload.text} in windows of {workload.window}, "
        f"then greedy decoding of {len(workload.prompts)} prompts, on each export in turn")
    with tempfile.TemporaryDirectory(prefix="kvgraph-quality-") as scratch:
        first = reference_answers(reference, workload, Path(scratch) / "reference", threads, log)
        return compare(workload, first, answer(quantized, workload, Path(scratch) / "quantized", threads, first.sequences))


CACHE_DIR = "quality-reference"  # inside a float export: its answers to the quality workload, made once
CACHE_FORMAT = 1


def reference_answers(directory: str | Path, workload: Workload, scratch: Path, threads: int | None = None,
                      log: Callable[[str], None] = lambda message: None) -> Answers:
    """The float export's answers, kept in its quality-reference/ directory: every quantization of one float export
    scores against the same answers, made once. They are made again when the workload or any of the export's files
    (their sizes and modification times) change; an export that cannot be written to is answered in a scratch
    directory each time, and the log says so."""
    directory = Path(directory)
    cache, key = directory / CACHE_DIR, _cache_key(directory, workload)
    if (cache / "key.json").is_file() and json.loads((cache / "key.json").read_text()) == key:
        kept = json.loads((cache / "answers.json").read_text())
        log(f"quality: the float side read from {cache} (made once for this export and workload)")
        return Answers(cache, kept["greedy"], kept["sequences"])
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_DIR}-", dir=directory))
    except OSError as exc:
        log(f"quality: cannot keep the float side in {directory} ({exc.strerror}): answering it in a scratch directory")
        return answer(directory, workload, scratch, threads)
    made = answer(directory, workload, staging, threads)
    (staging / "answers.json").write_text(json.dumps({"greedy": made.greedy, "sequences": made.sequences}))
    (staging / "key.json").write_text(json.dumps(key))  # last: a directory with its key is complete
    shutil.rmtree(cache, ignore_errors=True)
    try:
        staging.rename(cache)
    except OSError:  # another process kept its answers first: these are used once and go
        shutil.move(staging, scratch)
        return Answers(scratch, made.greedy, made.sequences)
    return Answers(cache, made.greedy, made.sequences)


def _cache_key(directory: Path, workload: Workload) -> dict:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    digest = hashlib.sha256(json.dumps(asdict(workload), sort_keys=True).encode()).hexdigest()
    return {"format": CACHE_FORMAT, "workload": digest,
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


@dataclass(frozen=True)
class Workload:
    """What one model is scored on: the text cut into windows, the prompts, how many new tokens each. An
    encoder-decoder's windows are sources: what is scored is the decoder's target for each, after `start`."""
    text: str
    window: int
    windows: list[list[int]]
    prompts: list[list[int]]
    new_tokens: int
    kind: str = "decoder"  # the contract's graph kind: how its text is scored (TEXTS)
    start: int | None = None  # encoder-decoder: the decoder's start token

    @property
    def tokens(self) -> int:
        """Next-token predictions scored."""
        return TEXTS[self.kind].tokens(self)

    def sources(self) -> list[list[int]]:
        """What the reference decodes greedily to make the scored sequences (an encoder-decoder's sources)."""
        return TEXTS[self.kind].sources(self)

    def source(self, i: int) -> list[int] | None:
        """The encoder's input for scored sequence i (a decoder-only export has none)."""
        return TEXTS[self.kind].source(self, i)

    def sequences(self, decode: Callable[[list[int]], list[int]]) -> list[list[int]]:
        """The token sequences scored (logits at each position predict the next), `decode` giving a source's target."""
        return TEXTS[self.kind].sequences(self, decode)

    @classmethod
    def of(cls, directory: str | Path) -> Workload:
        """The workload of an export (its tokenizer's ids of the text and prompts, cut to the positions it holds)."""
        directory = Path(directory)
        manifest = Manifest.load(directory)
        contract, model = manifest.contract, manifest.model
        codec = TextCodec(directory) if (directory / "tokenizer.json").is_file() else None
        ids, text = _text_ids(codec, contract.vocab_size)
        capacity = step_adapter(contract).cache.capacity(contract)
        limits = [limit for limit in (capacity, model.max_positions) if limit]
        prompts = _prompts(codec, contract.vocab_size)
        return TEXTS[contract.kind].workload(ids, text, prompts, limits, manifest)


class _DecoderText:
    """A decoder-only export reads the text's windows itself, each position predicting the next token."""

    def workload(self, ids: list[int], text: str, prompts: list[list[int]], limits: list[int], manifest: Manifest) -> Workload:
        window = min([WINDOW] + limits)
        windows = [ids[start: start + window] for start in range(0, len(ids) - 1, window)]
        new = max(1, min([NEW_TOKENS] + [limit - max(map(len, prompts)) for limit in limits]))
        return Workload(text, window, [w for w in windows if len(w) >= 2], prompts, new)

    def tokens(self, workload: Workload) -> int:
        return sum(len(w) - 1 for w in workload.windows)

    def sources(self, workload: Workload) -> list[list[int]]:
        return []

    def source(self, workload: Workload, i: int) -> None:
        return None

    def sequences(self, workload: Workload, decode: Callable[[list[int]], list[int]]) -> list[list[int]]:
        return list(workload.windows)

    def generated(self, row: list[int], prompt: list[int]) -> list[int]:
        """The new tokens of a transformers generate() row."""
        return row[len(prompt):]


class _Seq2SeqText:
    """An encoder-decoder reads each window as a source; its decoder is scored on the reference's greedy target for
    it, teacher-forced after the start token."""

    def workload(self, ids: list[int], text: str, prompts: list[list[int]], limits: list[int], manifest: Manifest) -> Workload:
        positions = manifest.model.max_positions
        window = min([SOURCE_WINDOW] + ([positions] if positions else []))
        new = max(1, min([NEW_TOKENS] + [limit - 1 for limit in limits]))  # the decoder holds the start token and the new ones
        sources = [s for s in (ids[start: start + window] for start in range(0, window * SOURCES, window)) if s]
        return Workload(f"{text}: {len(sources)} sources, their targets teacher-forced", window, sources, prompts, new,
                        "encoder-decoder", manifest.special_tokens.decoder_start_token_id)

    def tokens(self, workload: Workload) -> int:
        return len(workload.windows) * workload.new_tokens

    def sources(self, workload: Workload) -> list[list[int]]:
        return list(workload.windows)

    def source(self, workload: Workload, i: int) -> list[int]:
        return workload.windows[i]

    def sequences(self, workload: Workload, decode: Callable[[list[int]], list[int]]) -> list[list[int]]:
        return [[workload.start, *decode(w)] for w in workload.windows]

    def generated(self, row: list[int], prompt: list[int]) -> list[int]:
        return row[1:]  # after the decoder's start token


TEXTS = {"decoder": _DecoderText(), "encoder-decoder": _Seq2SeqText()}


@dataclass(frozen=True)
class Answers:
    """One export's answers to a workload: the logits of every scored sequence (one .npy file each), the sequences,
    and the greedy tokens."""
    logits_dir: Path
    greedy: list[list[int]]
    sequences: list[list[int]]

    def logits(self, window: int) -> np.ndarray:
        """(W, V) logits of scored sequence `window`."""
        return np.load(self.logits_dir / f"window{window}.npy")


def answer(directory: str | Path, workload: Workload, logits_dir: Path, threads: int | None = None,
           sequences: list[list[int]] | None = None) -> Answers:
    """Run one export on the workload: the prompts (and an encoder-decoder's sources, unless the reference's
    `sequences` are given) through the runtime's own greedy loop, then every sequence through its prefill graph with
    logits at every position; each session is closed before the next opens."""
    logits_dir.mkdir(parents=True, exist_ok=True)
    sources = workload.sources() if sequences is None else []
    tokens = greedy_tokens(directory, workload.prompts + sources, workload.new_tokens, threads)
    targets = iter(tokens[len(workload.prompts):])
    tokens = tokens[:len(workload.prompts)]
    sequences = workload.sequences(lambda source: next(targets)) if sequences is None else sequences
    scorer = TextScorer(directory, threads)
    for i, sequence in enumerate(sequences):
        np.save(logits_dir / f"window{i}.npy", scorer.logits(np.array([sequence], dtype=np.int64), workload.source(i)))
    del scorer
    gc.collect()
    return Answers(logits_dir, tokens, sequences)


def greedy_tokens(directory: str | Path, prompts: list[list[int]], new: int, threads: int | None = None) -> list[list[int]]:
    """Each prompt's `new` greedy tokens (end-of-sequence suppressed until then) through the runtime's own loop, without
    the export's generation config; the session is closed on return."""
    from kvgraph.runtime.generator import Generator

    generator = Generator.load(directory, threads=threads, max_cache_bytes=None, generation_config=False)  # greedy as such
    tokens = [generator.generate(prompt, max_new_tokens=new, min_new_tokens=new).token_ids for prompt in prompts]
    del generator
    gc.collect()
    return tokens


def compare(workload: Workload, reference: Answers, other: Answers) -> QualityReport:
    """The quality report of `other` against `reference`, both answers to `workload`."""
    if other.sequences != reference.sequences:
        raise ValueError("the answers scored different sequences: score the other export on the reference's")
    scores = _Scores()
    for i, sequence in enumerate(reference.sequences):
        scores.add(reference.logits(i), other.logits(i), np.array(sequence))
    identical, shares = 0, []
    for a, b in zip(reference.greedy, other.greedy):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        identical += same == len(a)
        shares.append(same / len(a))
    return QualityReport(workload.text, scores.count, workload.window, scores.top1 / scores.count, scores.kl / scores.count,
                         math.exp(scores.nll[0] / scores.count), math.exp(scores.nll[1] / scores.count),
                         len(workload.prompts), workload.new_tokens, identical, float(np.mean(shares)))


class _Scores:
    def __init__(self) -> None:
        self.count, self.top1, self.kl, self.nll = 0, 0, 0.0, [0.0, 0.0]

    def add(self, reference: np.ndarray, quantized: np.ndarray, ids: np.ndarray) -> None:
        # logits (W, V) at positions 0 .. W-1 predict ids 1 .. W
        targets = ids[1:]
        lp = [log_softmax(logits[:-1], np.float64) for logits in (reference, quantized)]
        rows = np.arange(len(targets))
        self.count += len(targets)
        self.top1 += int((lp[0].argmax(-1) == lp[1].argmax(-1)).sum())
        self.kl += float((np.exp(lp[0]) * (lp[0] - lp[1])).sum())
        for i in (0, 1):
            self.nll[i] -= float(lp[i][rows, targets].sum())


class TextScorer:
    """An export's prefill graph, changed in memory to return logits at every position, in a session of its own with
    onnxruntime's default kernels (as the export runs); an encoder-decoder's encoder beside it."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        directory = Path(directory)
        manifest, model = every_position_prefill(directory, "score a text")
        self.steps = step_adapter(manifest.contract)
        self.session = prefill_session(model, directory, threads)
        self.names = [o.name for o in self.session.get_outputs()]
        encoder = "encoder" in manifest.contract.graphs()  # an encoder-decoder's: the sources go through it first
        self.encoder = encoder and prefill_session(check_graph_file(directory, graph_file("encoder")), directory, threads)

    def logits(self, ids: np.ndarray, source: list[int] | None = None) -> np.ndarray:
        """(1, W) token ids (an encoder-decoder's decoder tokens, after reading `source`) -> (W, V) logits."""
        def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(self.names, self.session.run(None, feeds)))

        mask, other = np.ones_like(ids), {}
        if source is not None:
            mask = np.ones((1, len(source)), dtype=np.int64)
            other = {ENCODER_HIDDEN: self.encoder.run(None, {INPUT_IDS: np.array([source], dtype=np.int64), ATTENTION_MASK: mask})[0]}
        _, outputs = self.steps.run(run, "prefill", ids, mask, [], other)
        return outputs["logits"][0]


def every_position_prefill(directory: Path, purpose: str):
    """(manifest, the header of the export's prefill graph changed in memory to give logits at every position)."""
    from kvgraph.graphs.rewrites.every_position import keep_every_position

    manifest = Manifest.load(directory)
    name = graph_file(step_adapter(manifest.contract).graph("prefill"))
    model = check_graph_file(directory, name)  # the header, without the weights
    try:
        keep_every_position(model, manifest.contract, "prefill")
    except ValueError as exc:
        raise KvgraphError(f"{directory / name}: cannot {purpose} with it: {exc}") from exc
    return manifest, model


def prefill_session(model, directory: Path, threads: int | None) -> ort.InferenceSession:
    """A CPU session of a graph header (edited or not) whose weights stay in the export's weights file."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _text_ids(codec: TextCodec | None, vocab: int) -> tuple[list[int], str]:
    if codec is not None:
        return codec.encode(TEXT.read_text(encoding="utf-8")), f"{TEXT.name} (public domain)"
    return np.random.default_rng(0).integers(0, vocab, size=2048).tolist(), "2048 fixed pseudo-random token ids (no tokenizer.json)"


def _prompts(codec: TextCodec | None, vocab: int) -> list[list[int]]:
    if codec is not None:
        return [codec.encode(prompt) for prompt in PROMPTS]
    rng = np.random.default_rng(1)
    return [rng.integers(0, vocab, size=6 + i).tolist() for i in range(len(PROMPTS))]
