"""Architecture families: the ones the parity suite proves, and per-family quirks.

Every causal LM goes through the same wrapper (export/wrappers.py); a family only needs an
entry here when it differs from the generic path. Quirks are small adapters keyed by the
transformers `model_type`, never `if model_type == ...` branches elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    model_type: str
    forward_kwargs: dict[str, Any] = field(default_factory=dict)  # extra kwargs for model.forward


# Families with a quirk, by model_type. None needs one today: the parity suite proves gpt2, gpt_neox,
# opt, llama, mistral, qwen2, qwen3, phi3, gemma, t5, bart, marian, mbart and pegasus on the generic path
# (tests/families.py lists the checkpoint each stands for).
_FAMILIES: dict[str, Family] = {}

# Model types kvgraph cannot handle, with the reason shown to the user.
UNSUPPORTED: dict[str, str] = {}


def family_for(model_type: str) -> Family:
    """The registered family, or the generic one for an untested model type."""
    return _FAMILIES.get(model_type, Family(model_type))
