"""The mask and position-id conventions every runtime follows (numpy only).

Batches are left-padded: row b of a (B, S) batch holds its prompt in the last
len_b columns and attention_mask[b, :S - len_b] == 0. A token's position id is the number
of real tokens before it; pad columns get position 1 (any value works, they are masked;
1 is what Hugging Face `generate` feeds, so PyTorch and ONNX see identical inputs).
"""

from __future__ import annotations

import numpy as np

PADDING_SIDE = "left"
PAD_POSITION = 1

_DECODER = {
    "padding_side": PADDING_SIDE,
    "attention_mask": "int64 (B, total length so far): 1 for real tokens, 0 for left padding; "
    "decode appends a 1 column for the new token every step",
    "position_ids": "cumsum(attention_mask, axis=-1) - 1, with padded columns set to "
    f"{PAD_POSITION}; decode feeds sum(attention_mask, axis=-1) - 1 for the new token; extend feeds "
    "the last Q columns of cumsum(attention_mask, axis=-1) - 1",
}
_STATIC = {
    "attention_mask": "int64 (B, N): the dynamic mask so far (including this call's tokens) in its first columns, 0 after",
    "write_indices": "int64 (B,): the position this call's first token is written at, the same for every row: "
    "0 for a prompt, then the number of positions written so far",
    "cache": "past.{i}.{key,value} and present.{i}.{key,value} are (B, Hkv, N, D) buffers; present = past with this call's "
    "positions written; start from zeros; feed present as the next call's past (or bind one buffer as both)",
}
_SEQ2SEQ = {
    "padding_side": "right (sources); the decoder side is never padded",
    "encoder_attention_mask": "the source's attention_mask, fed unchanged to prefill and to every decode step",
    "decoder_input_ids": "prefill takes (B, 1) decoder_start_token_id; decode takes each row's last token",
    "cross": "cross.{i}.{key,value} (B, Hkv, Se, D) come out of prefill once and are fed unchanged to every decode step",
}
_COMMON = {
    "cache": "present.{i}.{key,value} of one step is fed as past.{i}.{key,value} of the next; "
    "layout (B, Hkv, S, D); entries at padded columns are unspecified and masked",
    "pad_id": "special_tokens.pad_token_id, else the first of eos_token_ids, else 0",
    "greedy": "the argmax of the last position's logits (lowest id on ties); a row ends at an eos id or after "
    "max_new_tokens and is fed pad_id while other rows continue",
}


def describe(static: bool, seq2seq: bool) -> dict[str, str]:
    """The conventions in words, for the manifest's `conventions` field (graphs/README.md has them in full)."""
    description = {**_COMMON, **({} if seq2seq else _DECODER)}
    if seq2seq:
        description.update(_SEQ2SEQ)
    if static:
        description.update(_STATIC if not seq2seq else {k: v for k, v in _STATIC.items() if k != "attention_mask"})
    return description


def prefill_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """(B, S) int64 mask -> (B, S) int64 position ids."""
    positions = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    return np.where(attention_mask == 0, PAD_POSITION, positions).astype(np.int64)


def extend_position_ids(attention_mask: np.ndarray, new: int) -> np.ndarray:
    """(B, P+Q) int64 mask that already includes Q new tokens -> (B, Q) position ids.

    For decode (Q = 1) this is sum(attention_mask) - 1, the count of real tokens before the new one.
    """
    return prefill_position_ids(attention_mask)[:, -new:]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (input_ids, attention_mask), both (B, max_len) int64, left-padded."""
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("left_pad needs at least one row and no empty rows")
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return ids, mask


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder sources: (input_ids, attention_mask), both (B, max_len) int64, right-padded.

    An encoder sees the whole source at once, so the padding side only decides the positions of
    the real tokens: right padding keeps them at 0..len-1, as when the source runs alone.
    """
    ids, mask = left_pad([row[::-1] for row in rows], pad_id)
    return np.ascontiguousarray(ids[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
