"""Architecture families: the ones the parity suite proves, and per-family quirks.

Every causal LM goes through the same wrapper (export/wrappers.py); a family only needs an
entry here when it differs from the generic path. Quirks are small adapters keyed by the
transformers `model_type`, never `if model_type == ...` branches elsewhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager


def _no_quirk(model, padding_mask) -> ContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Family:
    model_type: str
    forward_kwargs: dict[str, Any] = field(default_factory=dict)  # extra kwargs for model.forward
    # Around a static-cache step, given the model and the (B, N) padding mask of the buffer (the
    # model itself gets the step's (B, 1, Q, N) attention mask).
    static_step: Callable[[Any, Any], ContextManager] = _no_quirk


@contextlib.contextmanager
def _alibi_from_padding_mask(model, padding_mask):
    """BLOOM builds its ALiBi bias from the 2-D padding mask it is handed (key position = number of
    real tokens before it). The static step hands the model a 4-D mask, so for the step's duration the
    bias is built from the buffer's (B, N) padding mask instead: the same key positions, whatever
    each row's write index."""
    base = model.base_model
    build = base.build_alibi_tensor
    base.build_alibi_tensor = lambda mask, num_heads, dtype: build(padding_mask, num_heads, dtype)
    try:
        yield
    finally:
        del base.build_alibi_tensor  # the class's method again


# Families with a quirk, by model_type. The parity suite proves gpt2, gpt_neox, opt, llama, mistral,
# qwen2, qwen3, phi3, gemma, gemma2, mixtral, falcon, bloom, t5, bart, marian, mbart and pegasus
# (tests/tiny_models.py lists the checkpoint each stands for); only bloom needs an entry.
_FAMILIES: dict[str, Family] = {
    "bloom": Family("bloom", static_step=_alibi_from_padding_mask),
}

# Model types kvgraph cannot handle, with the reason shown to the user.
UNSUPPORTED: dict[str, str] = {}


def family_for(model_type: str) -> Family:
    """The registered family, or the generic one for an untested model type."""
    return _FAMILIES.get(model_type, Family(model_type))
