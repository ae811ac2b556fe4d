"""transformers' cache argument as the installed release spells it: `cache=` from 5.24 (where `past_key_values` is
deprecated, to go in 5.40), `past_key_values=` before. Every forward kvgraph calls with a cache goes through here."""

from __future__ import annotations

import inspect
from typing import Any


def cache_keyword(model) -> str:
    """The keyword the model's forward takes its cache by."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(out) -> Any:
    """The cache a forward returned (`cache`, or `past_key_values` before 5.24); None when it returned none."""
    return out["cache"] if "cache" in out else out.get("past_key_values")
