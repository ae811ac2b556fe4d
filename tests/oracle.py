"""The plain, separate oracle: PyTorch eager through the model's own forward, and an ORT loop.

Nothing here comes from kvgraph.export: the Hugging Face model is called directly with a
DynamicCache, exactly as `generate()` would.
"""

from __future__ import annotations

import inspect

import numpy as np
import onnxruntime as ort
import torch
from transformers.cache_utils import DynamicCache

from kvgraph.graphs.conventions import extend_position_ids, prefill_position_ids
from kvgraph.graphs.modes import step_adapter


def forward_with_cache(model, cache, **inputs):
    """The model's forward with a cache, as the installed transformers takes it (`cache=` from 5.24, `past_key_values=`
    before): (output, the cache it returned)."""
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(**inputs, use_cache=True, **{keyword: cache})
    return out, out["cache"] if "cache" in out else out.get("past_key_values")


def torch_step(model, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray] | None = None, all_logits: bool = False):
    """One forward in eager PyTorch: returns [logits (B, 1|S, V), key0, value0, key1, ...] as numpy."""
    positions = prefill_position_ids(mask) if past is None else extend_position_ids(mask, ids.shape[1])
    cache = DynamicCache()  # full layers: a sliding-window layer's window is its mask (generate's cache drops what the window hides)
    for layer in range(len(past or []) // 2):
        cache.update(torch.from_numpy(past[2 * layer]), torch.from_numpy(past[2 * layer + 1]), layer)
    with torch.no_grad():
        out, cache = forward_with_cache(model, cache, input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                        position_ids=torch.from_numpy(positions))
    logits = out.logits if all_logits else out.logits[:, -1:]
    cache_tensors = [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
    return [logits.numpy(), *cache_tensors]


class OrtPair:
    """prefill.onnx and decode.onnx (and extend.onnx) of an export directory, fed by the contract's step adapter.

    Calls take and return the dynamic cache's view: pasts (B, Hkv, P, D) in, presents (B, Hkv, P+Q, D)
    out. A static-cache export gets each past copied into zero buffers of its length N, written at
    index P, and returns the buffers' first P + Q positions: every parity test runs unchanged on both modes.
    """

    def __init__(self, directory, contract):
        self.contract = contract
        self.steps = step_adapter(contract)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {name: ort.InferenceSession(str(directory / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
                         for name in contract.graphs()}

    def _run(self, graph, feeds):
        session = self.sessions[graph]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    def _step(self, role, ids, mask, past):
        _, outputs = self.steps.run(self._run, role, ids, mask, list(past))
        return self.steps.step_outputs(outputs)

    def prefill(self, ids, mask):
        return self._step("prefill", ids, mask, [])

    def decode(self, ids, mask, past):
        return self._step("decode", ids, mask, past)

    def extend(self, ids, mask, past):
        return self._step("extend", ids, mask, past)

    def greedy(self, ids, mask, new_tokens: int) -> np.ndarray:
        """(B, S) prompt -> (B, new_tokens) greedy continuation with the cache."""
        outputs = self.prefill(ids, mask)
        tokens = []
        for _ in range(new_tokens):
            token = outputs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(token)
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
            outputs = self.decode(token, mask, outputs[1:])
        return np.concatenate(tokens, axis=1)
