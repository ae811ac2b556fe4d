"""How far a quantized export departs from the float export it was made from: the quality report.

    report = measure(float_dir, quantized_dir)
    report.shortfalls(min_top1=0.9, max_ppl_ratio=1.1)   # reasons, empty when it passes

    workload = Workload.of(float_dir)                       # or piece by piece, for other systems' logits
    answers = answer(float_dir, workload, scratch_dir)      # one export at a time: logits on disk, greedy tokens
    compare(workload, answers, other_answers)               # -> QualityReport

- Next-token figures over a fixed public-domain text (quality_text.txt beside this module: the
  Declaration of Independence and two of Lincoln's addresses, about 2,900 SmolLM2 tokens): the text
  is cut into windows, each read from scratch by the prefill graph with logits at every position;
  top-1 agreement, mean KL(float || quantized) and the perplexity of both.
- Greedy agreement: 64 new tokens on 8 fixed prompts, through the runtime's own loop.

An export without tokenizer.json is scored on fixed pseudo-random token ids instead (the report
says so): the comparison between the two exports stays exact, only the text is not language.
"""

from __future__ import annotations

import gc
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from kvgraph.graphs.errors import KvgraphError
from kvgraph.graphs.manifest import Manifest, graph_file
from kvgraph.graphs.modes import step_adapter
from kvgraph.graphs.safety import check_graph_file
from kvgraph.runtime.core.sampling import log_softmax
from kvgraph.runtime.core.text import TextCodec

TEXT = Path(__file__).with_name("quality_text.txt")
WINDOW = 256  # tokens a window holds (fewer if the export holds fewer positions)
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
        answers = [answer(directory, workload, Path(scratch) / label, threads)
                   for directory, label in ((reference, "reference"), (quantized, "quantized"))]
        return compare(workload, *answers)


@dataclass(frozen=True)
class Workload:
    """What one model is scored on: the text cut into windows, the prompts, how many new tokens each."""
    text: str
    window: int
    windows: list[list[int]]
    prompts: list[list[int]]
    new_tokens: int

    @property
    def tokens(self) -> int:
        return sum(len(w) - 1 for w in self.windows)

    @classmethod
    def of(cls, directory: str | Path) -> Workload:
        """The workload of an export (its tokenizer's ids of the text and prompts, cut to the positions it holds)."""
        directory = Path(directory)
        manifest = Manifest.load(directory)
        contract, model = manifest.contract, manifest.model
        codec = TextCodec(directory) if (directory / "tokenizer.json").is_file() else None
        ids, text = _text_ids(codec, contract.vocab_size)
        limits = [limit for limit in (step_adapter(contract).cache.capacity(contract), model.max_positions) if limit]
        window = min([WINDOW] + limits)
        windows = [ids[start: start + window] for start in range(0, len(ids) - 1, window)]
        prompts = _prompts(codec, contract.vocab_size)
        new = max(1, min([NEW_TOKENS] + [limit - max(map(len, prompts)) for limit in limits]))
        return cls(text, window, [w for w in windows if len(w) >= 2], prompts, new)


@dataclass(frozen=True)
class Answers:
    """One export's answers to a workload: the logits of every window (one .npy file each) and the greedy tokens."""
    logits_dir: Path
    greedy: list[list[int]]

    def logits(self, window: int) -> np.ndarray:
        """(W, V) logits of window `window`."""
        return np.load(self.logits_dir / f"window{window}.npy")


def answer(directory: str | Path, workload: Workload, logits_dir: Path, threads: int | None = None) -> Answers:
    """Run one export on the workload: the windows through its prefill graph with logits at every position, then the
    prompts through the runtime's own loop; each session is closed before the next opens."""
    from kvgraph.runtime.generator import Generator

    logits_dir.mkdir(parents=True, exist_ok=True)
    scorer = TextScorer(directory, threads)
    for i, window in enumerate(workload.windows):
        np.save(logits_dir / f"window{i}.npy", scorer.logits(np.array([window], dtype=np.int64)))
    del scorer
    gc.collect()
    generator = Generator.load(directory, threads=threads, max_cache_bytes=None, generation_config=False)  # greedy as such
    new = workload.new_tokens
    greedy = [generator.generate(prompt, max_new_tokens=new, min_new_tokens=new).token_ids for prompt in workload.prompts]
    del generator
    gc.collect()
    return Answers(logits_dir, greedy)


def compare(workload: Workload, reference: Answers, other: Answers) -> QualityReport:
    """The quality report of `other` against `reference`, both answers to `workload`."""
    scores = _Scores()
    for i, window in enumerate(workload.windows):
        scores.add(reference.logits(i), other.logits(i), np.array(window))
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
    onnxruntime's default kernels (as the export runs)."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        directory = Path(directory)
        manifest, model = every_position_prefill(directory, "score a text")
        self.steps = step_adapter(manifest.contract)
        self.session = prefill_session(model, directory, threads)
        self.names = [o.name for o in self.session.get_outputs()]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """(1, W) token ids -> (W, V) logits."""
        def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(self.names, self.session.run(None, feeds)))

        _, outputs = self.steps.run(run, "prefill", ids, np.ones_like(ids), [])
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
    """A CPU session of an edited graph header whose weights stay in the export's weights file."""
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
