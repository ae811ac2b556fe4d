"""Mixture-of-experts layers as standard ONNX ops.

transformers 5 runs experts through its own `grouped_mm` custom op, which has no ONNX translation.
kvgraph registers one more experts implementation in transformers' ExpertsInterface and switches
the model to it while tracing. Per expert e (unrolled; E is fixed by the config):

    top_k_index (T, k) ──Equal(e)──NonZero──> token (n_e,), slot (n_e,)
    hidden (T, H) ──Gather(token)──> x (n_e, H) ──gate_up──act*up──down──> y (n_e, H)
    y * top_k_weights[token, slot] ──ScatterND(add) at token──> out (T, H)

Only the n_e tokens routed to e touch e's weights, so a decode step computes (and, in onnxruntime,
reads) only the k active experts' matrices, and a long prompt never materialises a copy of an
expert's weights per token (transformers' `batched_mm` gathers one (H, I) matrix per token and
expert: gigabytes for a real model's prompt).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IMPLEMENTATION = "kvgraph_routed"


def routed_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    # hidden_states: (T, H); top_k_index, top_k_weights: (T, k) -> (T, H)
    out = torch.zeros_like(hidden_states)
    for expert in range(self.num_experts):
        token, slot = torch.where(top_k_index == expert)  # (n_e,) each
        x = hidden_states[token]  # (n_e, H)
        if self.has_gate:
            h = self._apply_gate(_linear(self, x, "gate_up_proj", expert))
        else:
            h = self.act_fn(_linear(self, x, "up_proj", expert))
        y = _linear(self, h, "down_proj", expert)  # (n_e, H)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        out = out.index_add(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
    return out


def _linear(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
    weight = getattr(self, name)[expert]  # (out, in), or (in, out) when the layout is transposed
    bias = getattr(self, f"{name}_bias")[expert] if self.has_bias else None
    y = x @ weight if self.is_transposed else F.linear(x, weight)
    return y + bias if bias is not None else y


def _register() -> bool:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # a transformers without the experts interface routes experts in plain torch
        return False
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, routed_experts_forward)
    return True


@contextlib.contextmanager
def traceable_experts(model: torch.nn.Module):
    """Route the model's experts through standard ops for the duration of the block (a no-op for dense models)."""
    current = getattr(model.config, "_experts_implementation", None)
    if current is None or not hasattr(model, "set_experts_implementation") or not _register():
        yield
        return
    model.set_experts_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_experts_implementation(current)
