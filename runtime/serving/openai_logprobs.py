"""Log-probabilities in OpenAI's two shapes, from the runtime's TokenLogprob entries (runtime/core/sampling.py: the
model's own distribution at each position, before any processor).

- completions: {tokens, token_logprobs, top_logprobs, text_offset}, one entry per token; with echo the prompt's tokens
  come first, the first of them without a log-probability (None), as OpenAI answers;
- chat: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal: None}.

A token's text is its own decoding (special tokens included); an export without a tokenizer names it "token_id:N",
as vLLM does.
"""

from __future__ import annotations

from kvgraph.runtime.core.sampling import TokenLogprob
from kvgraph.runtime.core.text import TextCodec

Entry = tuple[int, "TokenLogprob | None"]  # (token id, its log-probability; None for a prompt's first token)


def token_text(codec: TextCodec | None, token: int) -> str:
    return codec.token_text(token) if codec is not None else f"token_id:{token}"


def generated(entries: list[TokenLogprob]) -> list[Entry]:
    return [(entry.token, entry) for entry in entries]


def prompt_entries(ids: list[int], logprobs: list[TokenLogprob | None]) -> list[Entry]:
    return list(zip(ids, logprobs))


def completion_logprobs(codec: TextCodec | None, entries: list[Entry], offset: int = 0) -> dict:
    """offset: the text_offset of the first entry (a streamed chunk's: the length of the tokens' text before it)."""
    tokens, values, tops, offsets = [], [], [], []
    for token, entry in entries:
        text = token_text(codec, token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(None if entry is None else entry.logprob)
        tops.append(None if entry is None else {token_text(codec, t): lp for t, lp in entry.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(codec: TextCodec | None, entries: list[TokenLogprob]) -> dict:
    def one(token: int, logprob: float) -> dict:
        text = token_text(codec, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**one(entry.token, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]} for entry in entries]
    return {"content": content, "refusal": None}
