"""Speculative decoding: a drafter guesses the next k tokens, the export checks them all in one call.

    generator.generate(prompt, speculative="prompt-lookup", draft_tokens=4)
    generator.generate(prompt, speculative="small-export/", draft_tokens=4)

The token loop (loop.BatchRun) is unchanged: it asks its stepper for the logits after each token
it chose, and chooses as always (greedy, sampling, stops, bans, grammars). The speculative stepper
answers from a verify call when it can. Fed token t, it asks the drafter for d1..dk, runs the
verify graph once over [t, d1..dk] (the extend graph with logits at every new position) and
returns the logits after t, keeping those after each d_i. If the loop then chooses d1, the logits
after d1 are already there, with no graph call, and so on. At the first token that differs from the
draft, the cache is rolled back past the rejected drafts (a static cache moves its write index
back; a dynamic one is truncated) and a new verify call starts from the chosen token.

Every token is chosen from the export's own logits for exactly the sequence so far, so greedy
output is the output of plain greedy decoding, and sampling draws from the export's distribution:
with a deterministic drafter (prompt lookup, or a draft model's greedy guess) "the sample equals the
draft" accepts with probability p(draft), which is the standard rejection rule for a one-hot draft
distribution; a rejected position keeps the sample already drawn, distributed as p without the draft
renormalised, which is that rule's residual. With a seed, the random draws are even the same as
without speculation. Floating-point results of a Q-token call and of single-token calls differ in
the last bits, so a near-tie can still break the other way (the tests measure it never does on the
suite's models).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvgraph.graphs import KvgraphError
from kvgraph.graphs.contract import VERIFY
from kvgraph.runtime.core.steps import decode_one, extend, prefill, run_step

MAX_NGRAM = 3
MIN_NGRAM = 2


class PromptLookup:
    """Drafts by looking the last n tokens (n = 3, then 2) up earlier in the prompt and the text so far, and
    proposing what followed their most recent earlier occurrence. No second model. A single matching token
    predicts too little to be worth a verify call (measured on free-form chat)."""

    name = "prompt-lookup"

    def propose(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(MAX_NGRAM, len(tokens) - 1), MIN_NGRAM - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []


class DraftModel:
    """Drafts with a smaller export of the same tokenizer: its greedy guess of the next k tokens. Its own cache
    follows the accepted text (truncated to the common prefix, then extended), so a step costs k small decodes."""

    def __init__(self, generator) -> None:  # checked against the target by checked_draft
        self.generator, self.name = generator, str(generator.graphs.directory)
        self.cache, self.fed = None, []

    def propose(self, tokens: list[int], k: int) -> list[int]:
        graphs = self.generator.graphs
        capacity = graphs.steps.cache.capacity(graphs.contract)
        if capacity and len(tokens) + k > capacity:
            return []  # the draft's static cache is full: the target goes on alone
        keep = min(common_prefix(self.fed, tokens), len(tokens) - 1)
        if self.cache is None or keep == 0:
            ids = np.array([tokens], dtype=np.int64)
            logits, cache = prefill(graphs, ids, np.ones_like(ids))
        else:
            new = np.array([tokens[keep:]], dtype=np.int64)
            logits, cache = extend(graphs, self.cache.truncated(keep), new, np.ones((1, len(tokens)), dtype=np.int64))
        fed, drafts = list(tokens), []
        for i in range(k):
            drafts.append(int(logits[0, -1].argmax()))
            if i == k - 1:
                break
            logits, cache = decode_one(graphs, cache, np.array([[drafts[-1]]], dtype=np.int64), np.ones((1, len(fed) + 1), dtype=np.int64))
            fed.append(drafts[-1])
        self.cache, self.fed = cache, fed
        return drafts


class SpeculativeSteps:
    """The loop's stepper for one row: first() prefills, next(token) answers from verified drafts or a verify call."""

    def __init__(self, graphs, drafter, draft_tokens: int, prompt: list[int]) -> None:
        self.graphs, self.drafter, self.k = graphs, drafter, draft_tokens
        self.tokens = list(prompt)  # everything fed or chosen so far
        self.cache = None
        self.pending: list[tuple[int, np.ndarray]] = []  # (drafted token, the logits after it), verified, not yet chosen
        self.proposed = self.accepted = self.calls = self.last_drafts = 0
        self.length = draft_tokens  # drafts asked for: +2 after a step whose drafts were all taken, -1 after a rejection

    def first(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if ids.shape[0] != 1:
            raise KvgraphError("speculative decoding runs one prompt at a time")
        logits, self.cache = prefill(self.graphs, ids, mask)
        self.mask = mask
        return logits[:, -1]

    def next(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        token = int(tokens[0, 0])
        self.tokens.append(token)
        if self.pending and self.pending[0][0] == token:  # the loop chose the draft: its logits are known
            self.accepted += 1
            return self.pending.pop(0)[1]
        fed = len(self.tokens) - 1  # positions before this token
        if self.pending:  # rejected drafts sit in the cache after position `fed`: roll back
            self.pending = []
            self.length = max(1, self.length - 1)
        elif self.calls and self.last_drafts:  # every draft of the last call was taken
            self.length = min(2 * self.k, self.length + 2)
        if self.cache.length != fed:
            self.cache = self.cache.truncated(fed)
        drafts = self._drafts()
        self.calls += 1
        # no draft: a verify call of one token, the same as a decode step; one session runs every step, so two
        # sessions' thread pools never take turns on the cores
        self.last_drafts = len(drafts)
        row = np.array([[token, *drafts]], dtype=np.int64)
        logits, self.cache, _ = run_step(self.graphs, self.cache, VERIFY, row, np.ones((1, fed + row.shape[1]), dtype=np.int64))
        self.proposed += len(drafts)
        self.pending = [(d, logits[:, i + 1]) for i, d in enumerate(drafts)]
        return logits[:, 0]

    def _drafts(self) -> list[int]:
        room = self.graphs.steps.cache.capacity(self.graphs.contract)
        k = self.length if not room else min(self.length, room - len(self.tokens))
        return [int(t) for t in self.drafter.propose(self.tokens, k)][:k] if k > 0 else []


def checked_draft(generator, target):
    """The draft generator, if it can draft for the target: decoder-only, the same vocabulary and tokenizer."""
    reason = generator.graphs.steps.speculation()  # a draft's own cache follows the accepted text: it rolls back too
    if reason:
        raise KvgraphError(f"{generator.graphs.directory}: cannot draft: {reason}")
    if generator.graphs.contract.vocab_size != target.graphs.contract.vocab_size:
        raise KvgraphError(f"{generator.graphs.directory}: a draft export must have the target's vocabulary "
                           f"({target.graphs.contract.vocab_size} tokens), not {generator.graphs.contract.vocab_size}")
    mine, theirs = (Path(g.graphs.directory, "tokenizer.json") for g in (generator, target))
    if mine.is_file() and theirs.is_file() and mine.read_bytes() != theirs.read_bytes():
        raise KvgraphError(f"{generator.graphs.directory}: its tokenizer.json differs from the target's; a draft export needs the same tokenizer")
    return generator


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
