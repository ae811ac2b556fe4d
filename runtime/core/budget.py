"""The KV cache a request needs, and the budget Generator refuses requests beyond (before anything runs)."""

from __future__ import annotations

import os

import numpy as np

from kvgraph.graphs import GraphContract
from kvgraph.graphs.modes import step_adapter


def cache_need(contract: GraphContract, prompt_lengths: list[int], max_new_tokens: int) -> tuple[int, str]:
    """Bytes of KV cache a batch needs at its longest, and how that number is made up."""
    steps = step_adapter(contract)
    rows, per_position = len(prompt_lengths), contract.cache_bytes_per_token()
    layout = f"{contract.num_layers} layers x 2 x {contract.num_kv_heads} KV heads x {contract.head_dim} x {np.dtype(contract.dtype).itemsize} bytes"
    need = steps.kind.positions(max(prompt_lengths), max_new_tokens)
    held, copies = steps.cache.cache_positions(contract, need.decoder)  # a dynamic step holds its past and its present at once
    total = rows * (steps.cache.row_bytes(contract, need.decoder) + per_position * need.source)  # + cross K/V over the source
    note = steps.cache.budget_note(contract)  # x 2 (past and present), or the rings' W positions in place of N
    if need.source:
        return total, f"{rows} rows x ({held} decoder{' x 2' if copies == 2 else ''} + {need.source} source positions) x {layout}"
    return total, f"{rows} rows x {held} positions x {layout}{note}"


def default_cache_budget() -> int | None:
    """Half of physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return None


def size_text(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} bytes"
