"""The plain, separate oracle: PyTorch eager through the model's own forward, and an ORT loop.

Nothing here comes from kvgraph.export: the Hugging Face model is called directly with a
DynamicCache, exactly as `generate()` would.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from transformers.cache_utils import DynamicCache

from kvgraph.graphs.conventions import extend_position_ids, prefill_position_ids


def torch_step(model, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray] | None = None, all_logits: bool = False):
    """One forward in eager PyTorch: returns [logits (B, 1|S, V), key0, value0, key1, ...] as numpy."""
    positions = prefill_position_ids(mask) if past is None else extend_position_ids(mask, ids.shape[1])
    cache = DynamicCache(config=model.config)
    for layer in range(len(past or []) // 2):
        cache.update(torch.from_numpy(past[2 * layer]), torch.from_numpy(past[2 * layer + 1]), layer)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions), past_key_values=cache, use_cache=True,
        )
    logits = out.logits if all_logits else out.logits[:, -1:]
    cache_tensors = [t.numpy() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    return [logits.numpy(), *cache_tensors]


class OrtPair:
    """prefill.onnx and decode.onnx (and extend.onnx) of an export directory, fed by contract names.

    Static-cache exports take the same calls: the past (B, Hkv, P, D) is copied into zero
    buffers of the graph's length N, written at index P, and the presents returned are the
    buffers' first P + Q positions. So every parity test runs unchanged on both cache modes.
    """

    def __init__(self, directory, contract):
        self.contract = contract
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.prefill_session = ort.InferenceSession(str(directory / "prefill.onnx"), options, providers=["CPUExecutionProvider"])
        self.decode_session = ort.InferenceSession(str(directory / "decode.onnx"), options, providers=["CPUExecutionProvider"])
        extend = directory / ("prefill.onnx" if contract.static else "extend.onnx")  # static: prefill at index P
        self.extend_session = ort.InferenceSession(str(extend), options, providers=["CPUExecutionProvider"])

    def prefill(self, ids, mask):
        if self.contract.static:
            empty = np.zeros((ids.shape[0], self.contract.num_kv_heads, 0, self.contract.head_dim), dtype=np.float32)
            return self._static(self.prefill_session, ids, mask, prefill_position_ids(mask), [empty] * (2 * self.contract.num_layers))
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": prefill_position_ids(mask)}
        return self.prefill_session.run(None, feeds)

    def _static(self, session, ids, mask, positions, past):
        batch, length = mask.shape
        size = self.contract.max_length
        written = past[0].shape[2]
        buffers = [np.zeros((batch, self.contract.num_kv_heads, size, self.contract.head_dim), dtype=np.float32) for _ in past]
        for buffer, tensor in zip(buffers, past):
            buffer[:, :, :written] = tensor
        full_mask = np.zeros((batch, size), dtype=np.int64)
        full_mask[:, :length] = mask
        feeds = {"input_ids": ids, "attention_mask": full_mask, "position_ids": positions,
                 "write_indices": np.full(batch, written, dtype=np.int64), **dict(zip(self.contract.past_names(), buffers))}
        logits, *presents = session.run(None, feeds)
        return [logits, *(p[:, :, :length] for p in presents)]

    def decode(self, ids, mask, past):
        return self._step(self.decode_session, ids, mask, past)

    def extend(self, ids, mask, past):
        return self._step(self.extend_session, ids, mask, past)

    def _step(self, session, ids, mask, past):
        if self.contract.static:
            return self._static(session, ids, mask, extend_position_ids(mask, ids.shape[1]), past)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": extend_position_ids(mask, ids.shape[1])}
        feeds.update(zip(self.contract.past_names(), past))
        return session.run(None, feeds)

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
