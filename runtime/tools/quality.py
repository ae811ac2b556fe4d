"""How far a quantized export departs from the float export it was made from: the quality report.

    report = measure(float_dir, quantized_dir)
    report.shortfalls(min_top1=0.9, max_ppl_ratio=1.1)   # reasons, empty when it passes

- Next-token figures over a fixed public-domain text (quality_text.txt beside this module: the
  Declaration of Independence and two of Lincoln's addresses, about 2,900 SmolLM2 tokens): the text
  is cut into windows, each read from scratch by the prefill graph with logits at every position;
  top-1 agreement, mean KL(float || quantized) and the perplexity of both.
- Greedy agreement: 64 new tokens on 8 fixed prompts, through the runtime's own loop.

An export without tokenizer.json is scored on fixed pseudo-random token ids instead (the report
says so): the comparison between the two exports stays exact, only the text is not language.
"""

from __future__ import annotations

import math
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

    def table(self) -> str:
        return "\n".join([
            f"quality against the float export ({self.text}, {self.tokens} next-token predictions in windows of {self.window}):",
            f"  top-1 agreement   {100 * self.top1_agreement:.2f} %",
            f"  mean KL           {self.mean_kl:.5f} nats/token",
            f"  perplexity        {self.perplexity_float:.4f} float, {self.perplexity_quantized:.4f} quantized "
            f"({self.perplexity_ratio:.4f}x)",
            f"  greedy            {self.greedy_identical}/{self.greedy_prompts} prompts identical over {self.greedy_new_tokens} "
            f"new tokens; {100 * self.greedy_common_prefix:.1f} % of tokens before the first difference",
        ])


def measure(reference: str | Path, quantized: str | Path, threads: int | None = None,
            log: Callable[[str], None] = lambda message: None) -> QualityReport:
    """Score both exports of one model on the same text and prompts."""
    from kvgraph.runtime.generator import Generator

    # The float reference maps its weights once for all its sessions (no prepacked copy per session): at 1B parameters
    # the report then holds the float weights once, not three times. The quantized export runs as it will be run.
    generators = [Generator.load(reference, threads=threads, max_cache_bytes=None, weights="mapped"),
                  Generator.load(quantized, threads=threads, max_cache_bytes=None)]
    ids, text = _text_ids(generators[0])
    window = _window(generators[0])
    log(f"quality: scoring {len(ids)} tokens of {text} in windows of {window}")
    scores = _Scores()
    scorers = [_Scorer(generator) for generator in generators]
    for start in range(0, len(ids) - 1, window):
        chunk = np.array([ids[start: start + window]], dtype=np.int64)  # (1, W)
        if chunk.shape[1] >= 2:
            scores.add(*(scorer.logits(chunk) for scorer in scorers), chunk[0])
    log(f"quality: greedy decoding of {len(PROMPTS)} prompts on both exports")
    greedy = _greedy(generators)
    return QualityReport(text, scores.count, window, scores.top1 / scores.count, scores.kl / scores.count,
                         math.exp(scores.nll[0] / scores.count), math.exp(scores.nll[1] / scores.count), *greedy)


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


class _Scorer:
    """The export's prefill graph, changed in memory to return logits at every position; it reads the weights as the
    export's other sessions do (the same mapped memory, where the generator maps them)."""

    def __init__(self, generator) -> None:
        from kvgraph.graphs.rewrites.every_position import keep_every_position

        graphs = generator.graphs
        directory, manifest = graphs.directory, graphs.manifest
        self.steps = step_adapter(manifest.contract)
        graph = self.steps.graph("prefill")
        name = graph_file(graph)
        model = check_graph_file(directory, name)  # the header, without the weights
        try:
            keep_every_position(model, manifest.contract, "prefill")
        except ValueError as exc:
            raise KvgraphError(f"{directory / name}: cannot score a text with it: {exc}") from exc
        options = graphs.options(graph)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """(1, W) token ids -> (W, V) logits."""
        def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(self.names, self.session.run(None, feeds)))

        _, outputs = self.steps.run(run, "prefill", ids, np.ones_like(ids), [])
        return outputs["logits"][0]


def _text_ids(generator) -> tuple[list[int], str]:
    if generator.codec is not None:
        return generator.codec.encode(TEXT.read_text(encoding="utf-8")), f"{TEXT.name} (public domain)"
    vocab = generator.graphs.contract.vocab_size
    return np.random.default_rng(0).integers(0, vocab, size=2048).tolist(), "2048 fixed pseudo-random token ids (no tokenizer.json)"


def _window(generator) -> int:
    contract, model = generator.graphs.contract, generator.graphs.manifest.model
    limits = [WINDOW, step_adapter(contract).cache.capacity(contract), model.max_positions]
    return min(limit for limit in limits if limit)


def _prompts(generator) -> list[list[int]]:
    if generator.codec is not None:
        return [generator.codec.encode(prompt) for prompt in PROMPTS]
    rng = np.random.default_rng(1)
    return [rng.integers(0, generator.graphs.contract.vocab_size, size=6 + i).tolist() for i in range(len(PROMPTS))]


def _greedy(generators) -> tuple[int, int, int, float]:
    """(prompts, new tokens each, prompts with identical tokens, mean share before the first difference)."""
    prompts = _prompts(generators[0])
    contract, model = generators[0].graphs.contract, generators[0].graphs.manifest.model
    limits = [limit for limit in (step_adapter(contract).cache.capacity(contract), model.max_positions) if limit]
    new = max(1, min([NEW_TOKENS] + [limit - max(map(len, prompts)) for limit in limits]))
    identical, shares = 0, []
    for prompt in prompts:
        a, b = (g.generate(prompt, max_new_tokens=new, min_new_tokens=new).token_ids for g in generators)
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        identical += same == len(a)
        shares.append(same / len(a))
    return len(prompts), new, identical, float(np.mean(shares))
