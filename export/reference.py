"""The float side of a quantized export's quality report, from PyTorch itself: the source model's logits over the
quality workload's windows (an encoder-decoder's: its greedy targets for the sources, teacher-forced) and its greedy
tokens on the workload's prompts (runtime/tools/quality.py's `Answers`).

A quantized export never writes its float graphs, so the model that was traced is the reference. Its weights are the
checkpoint's mapped file and the relaid weights' scratch file (export/layout.py); each module's pages are dropped
from the process once the module has run, so the reference holds about one layer of floats at a time, not the model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

from kvgraph.export import memory
from kvgraph.runtime.tools.quality import TEXTS, Answers, Workload


def torch_answers(model: torch.nn.Module, workload: Workload, logits_dir: Path) -> Answers:
    """The model's (W, V) logits of every scored sequence (one .npy file each, as the exports' answers) and its greedy
    tokens: `new_tokens` each, end-of-sequence suppressed until then, as the runtime's greedy loop with
    min_new_tokens. An encoder-decoder's sequences are its own greedy targets for the workload's sources."""
    logits_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), pages_dropped_after_use(model):
        greedy = [_greedy(model, prompt, workload) for prompt in workload.prompts]
        sequences = workload.sequences(lambda source: _greedy(model, source, workload))
        for i, sequence in enumerate(sequences):
            np.save(logits_dir / f"window{i}.npy", _logits(model, sequence, workload.source(i)).float().numpy())
    return Answers(logits_dir, greedy, sequences)


def _logits(model: torch.nn.Module, sequence: list[int], source: list[int] | None) -> torch.Tensor:
    if source is None:
        return model(torch.tensor([sequence])).logits[0]
    ids = torch.tensor([source])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=torch.tensor([sequence])).logits[0]


def _greedy(model: torch.nn.Module, prompt: list[int], workload: Workload) -> list[int]:
    ids, new = torch.tensor([prompt]), workload.new_tokens
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    config = GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=eos,
                              pad_token_id=pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
                              decoder_start_token_id=workload.start)  # None for a decoder-only model, which has none
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return TEXTS[workload.kind].generated(out[0].tolist(), prompt)


@contextlib.contextmanager
def pages_dropped_after_use(model: torch.nn.Module):
    """After each module runs, the file pages of its own parameters leave the process (they stay in the file and
    the page cache, and come back on the next read). Memory that is not a file's is left alone."""
    owners = []
    for module in model.modules():
        spans = [(p.data_ptr(), p.numel() * p.element_size()) for p in module.parameters(recurse=False) if p.numel()]
        spans = [span for span in spans if memory.file_backed(span[0])]
        if spans:
            owners.append(module.register_forward_hook(_dropper(spans)))
    try:
        yield
    finally:
        for hook in owners:
            hook.remove()


def _dropper(spans: list[tuple[int, int]]):
    def drop(module, inputs, output) -> None:
        for address, length in spans:
            memory.drop_pages(address, length)
    return drop
