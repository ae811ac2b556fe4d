"""Structured output: a JSON schema, a regular expression or a grammar (Lark, or GBNF/EBNF) decides which
tokens may come next, through llguidance over the export's own tokenizer.json (the `structured` extra).

    constraint = Constraint.build(generator, json_schema={"type": "object"})   # or regex=..., grammar=...
    generator.generate(prompt, constraint=constraint)                         # or json_schema=... directly

Each row gets a matcher; before every choice its mask sets the logits of disallowed tokens to -inf
(greedy and sampling alike, after min_new_tokens and n-gram bans), and the chosen token is fed back.
Once the grammar is complete, only the eos ids are allowed, so the row ends there. A bad schema, regex
or grammar, or one that no text of the tokenizer can start, is refused before anything runs.
Unconstrained generation never touches this module.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvgraph.graphs import KvgraphError

KINDS = ("json_schema", "regex", "grammar")
_TOKENIZERS: dict[tuple[str, int, tuple[int, ...]], object] = {}  # (tokenizer.json, vocab, eos) -> llguidance's tokenizer
_LOCK = threading.Lock()


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError as exc:
        raise KvgraphError(f"structured output needs llguidance (pip install 'kvgraph[structured]'): {exc}") from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar and the tokenizer it is matched against; `matcher()` gives a row its own state."""

    kind: str
    grammar: str  # llguidance's grammar text
    tokenizer: object
    vocab_size: int

    @classmethod
    def build(cls, generator, json_schema=None, regex: str | None = None, grammar: str | None = None) -> Constraint | None:
        """From exactly one of json_schema (a dict, or JSON text), regex, grammar (Lark or GBNF); None for none."""
        given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None}
        if not given:
            return None
        if len(given) > 1:
            raise KvgraphError(f"give one of json_schema, regex and grammar, not {' and '.join(given)}")
        (kind, text), = given.items()
        llg = _llguidance()
        compiled = _compile(llg, kind, text)
        tokenizer = _tokenizer(llg, generator)
        problem = llg.LLMatcher.validate_grammar(compiled, tokenizer)
        if problem:
            raise KvgraphError(f"the {kind.replace('_', ' ')} is not usable: {_one_line(problem)}")
        constraint = cls(kind, compiled, tokenizer, generator.graphs.contract.vocab_size)
        first = constraint.matcher()
        text_tokens = first.allowed()
        text_tokens[[t for t in generator.eos_ids if t < len(text_tokens)]] = False
        if not text_tokens.any() and not first.matcher.is_accepting():  # llguidance then offers eos alone
            raise KvgraphError(f"no text this tokenizer can produce satisfies the {kind.replace('_', ' ')}")
        return constraint

    def matcher(self) -> RowMatcher:
        return RowMatcher(self)


class RowMatcher:
    """One row's place in the grammar: the allowed next tokens, and the tokens fed so far."""

    def __init__(self, constraint: Constraint) -> None:
        llg = _llguidance()
        self.matcher = llg.LLMatcher(constraint.tokenizer, constraint.grammar, log_level=0)
        self.vocab_size = constraint.vocab_size
        self.bitmask = llg.numpy.allocate_token_bitmask(1, constraint.vocab_size)
        self._fill = llg.numpy.fill_next_token_bitmask

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens the grammar allows next (the eos ids once it is complete)."""
        self._fill(self.matcher, self.bitmask)
        return np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)

    def feed(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise KvgraphError(f"the grammar refused token {token}: {_one_line(self.matcher.get_error())}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


def read_schema(value: str) -> str:
    """--json-schema's or --grammar's value: a file's path, or the text itself."""
    path = Path(value)
    try:
        if not value.lstrip().startswith("{") and path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, ValueError):  # a long grammar text is not a path
        pass
    return value


def _compile(llg, kind: str, text) -> str:
    if kind == "json_schema":
        if isinstance(text, str):
            try:
                text = json.loads(text)
            except json.JSONDecodeError as exc:
                raise KvgraphError(f"the JSON schema is not JSON: {exc}") from None
        if not isinstance(text, dict):
            raise KvgraphError(f"a JSON schema is a JSON object, got {type(text).__name__}")
        return llg.LLMatcher.grammar_from_json_schema(text)
    if not isinstance(text, str) or not text:
        raise KvgraphError(f"the {kind} must be a non-empty string")
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(text)
    try:
        return llg.grammar_from("grammar", text)  # Lark, or GBNF / EBNF converted to Lark
    except ValueError as exc:
        raise KvgraphError(f"the grammar is not usable: {_one_line(str(exc))}") from None


def _tokenizer(llg, generator):
    """llguidance's view of the export's tokenizer.json (built once per file, vocabulary and eos ids)."""
    path = generator.graphs.directory / "tokenizer.json"
    if not path.is_file():
        raise KvgraphError(f"{generator.graphs.directory}: structured output needs the export's tokenizer.json")
    key = (str(path.resolve()), generator.graphs.contract.vocab_size, tuple(sorted(generator.eos_ids)))
    with _LOCK:
        if key not in _TOKENIZERS:
            try:
                _TOKENIZERS[key] = llg.LLTokenizer(path.read_text(encoding="utf-8"), n_vocab=key[1], eos_token=list(key[2]) or None)
            except ValueError as exc:
                raise KvgraphError(f"{path}: llguidance cannot read this tokenizer for structured output: {_one_line(str(exc))}") from None
        return _TOKENIZERS[key]


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines[:2])[:300]
