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

DESCRIPTION = {
    "padding_side": PADDING_SIDE,
    "attention_mask": "int64 (B, total length so far): 1 for real tokens, 0 for left padding; "
    "decode appends a 1 column for the new token every step",
    "position_ids": "cumsum(attention_mask, axis=-1) - 1, with padded columns set to "
    f"{PAD_POSITION}; decode feeds sum(attention_mask, axis=-1) - 1 for the new token; extend feeds "
    "the last Q columns of cumsum(attention_mask, axis=-1) - 1",
    "cache": "present.{i}.{key,value} of one step is fed as past.{i}.{key,value} of the next; "
    "layout (B, Hkv, S, D); entries at padded columns are unspecified and masked",
}


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
