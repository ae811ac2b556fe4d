"""The parity suite: every family's exported graphs against PyTorch eager and against recomputation.

fp32 tolerance: |onnx - torch| <= 1e-4 + 1e-5 |torch| elementwise for logits and every K/V (graphs/report.py
TOLERANCES). A failure prints the table of
max |diff| per tensor and step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from kvgraph.graphs import KvgraphError
from kvgraph.graphs.conventions import left_pad
from kvgraph.graphs.report import compare, compare_step, failures, format_table
from oracle import OrtPair, torch_step

DECODE_STEPS = 8


def _prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]  # ids 0-2 are special


def _names(contract):
    return ["logits", *contract.present_names()]


def _assert_rows(rows, what):
    assert not failures(rows), f"{what}:\n{format_table(rows)}"


def test_prefill_matches_pytorch(exported):
    ids, mask = left_pad(_prompts(exported.contract.vocab_size, (6, 6)), pad_id=0)
    actual = OrtPair(exported.directory, exported.contract).prefill(ids, mask)
    expected = torch_step(exported.model, ids, mask)
    rows = [compare("prefill", 0, n, a, e, "float32") for n, a, e in zip(_names(exported.contract), actual, expected)]
    assert len(rows) == 1 + 2 * exported.contract.num_layers
    _assert_rows(rows, f"{exported.family}: prefill differs from PyTorch")


def test_decode_steps_match_pytorch(exported):
    graphs = OrtPair(exported.directory, exported.contract)
    ids, mask = left_pad(_prompts(exported.contract.vocab_size, (5, 2), seed=1), pad_id=0)  # a padded row, 13 tokens: past a window of 8
    actual, expected = graphs.prefill(ids, mask), torch_step(exported.model, ids, mask)
    rows = []
    for step in range(1, DECODE_STEPS + 1):
        token = expected[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        actual = graphs.decode(token, mask, actual[1:])  # each side feeds back its own presents
        expected = torch_step(exported.model, token, mask, expected[1:])
        assert actual[1].shape[2] == 5 + step
        # padded slots: any value; a static cache's ring layers: their last W positions
        rows += compare_step("decode", step, _names(exported.contract), actual, expected, mask, "float32", graphs.steps.held())
    _assert_rows(rows, f"{exported.family}: decode steps differ from PyTorch")


def _run_steps(graphs, ids, mask, steps):
    """Prefill + greedy decode; returns per step (logits (B, 1, V), presents, mask)."""
    outputs = graphs.prefill(ids, mask)
    history = [(outputs[0], outputs[1:], mask)]
    for _ in range(steps):
        token = outputs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        outputs = graphs.decode(token, mask, outputs[1:])
        history.append((outputs[0], outputs[1:], mask))
    return history


def test_padded_batch_rows_equal_each_prompt_alone(exported):
    graphs = OrtPair(exported.directory, exported.contract)
    prompts = _prompts(exported.contract.vocab_size, (3, 9, 6), seed=2)
    batch = _run_steps(graphs, *left_pad(prompts, pad_id=0), steps=4)
    rows = []
    for b, prompt in enumerate(prompts):
        alone = _run_steps(graphs, *left_pad([prompt], pad_id=0), steps=4)
        for step, ((logits, cache, mask), (logits1, cache1, mask1)) in enumerate(zip(batch, alone)):
            rows.append(compare("row", step, f"row {b} logits", logits[b:b + 1], logits1, "float32"))
            width = mask1.shape[1]  # the row alone has no padding: its cache is the batch row's last columns
            rows += compare_step("row", step, [f"row {b} {n}" for n in _names(exported.contract)[1:]],
                                 [c[b:b + 1, :, -width:] for c in cache], cache1, mask1, "float32")
    _assert_rows(rows, f"{exported.family}: a padded batch row differs from the prompt run alone")


def test_removing_the_padding_mask_changes_the_result(exported):
    graphs = OrtPair(exported.directory, exported.contract)
    prompts = _prompts(exported.contract.vocab_size, (3, 9), seed=3)
    ids, mask = left_pad(prompts, pad_id=0)
    masked = graphs.prefill(ids, mask)[0]
    unmasked = graphs.prefill(ids, np.ones_like(mask))[0]
    alone = graphs.prefill(*left_pad(prompts[:1], pad_id=0))[0]
    np.testing.assert_allclose(masked[0], alone[0], atol=1e-4, rtol=1e-4)
    assert np.abs(unmasked[0] - alone[0]).max() > 1e-2, "ignoring the mask should let row 0 attend to padding"


def test_cache_equals_recompute(exported):
    """The logits of decode step n equal a cache-free prefill over the whole sequence so far."""
    graphs = OrtPair(exported.directory, exported.contract)
    ids, mask = left_pad(_prompts(exported.contract.vocab_size, (4, 7), seed=4), pad_id=0)
    history = _run_steps(graphs, ids, mask, steps=6)
    tokens = np.concatenate([ids] + [h[0][:, -1].argmax(-1)[:, None] for h in history[:-1]], axis=1).astype(np.int64)
    rows = []
    for step, (logits, _, step_mask) in enumerate(history):
        length = step_mask.shape[1]
        recomputed = graphs.prefill(tokens[:, :length], step_mask)[0]
        rows.append(compare("recompute", step, "logits", logits, recomputed, "float32"))
        eager = torch_step(exported.model, tokens[:, :length], step_mask)[0]  # PyTorch, no cache either
        rows.append(compare("eager-full", step, "logits", logits, eager, "float32"))
    _assert_rows(rows, f"{exported.family}: cached decode differs from recomputation")


def test_greedy_tokens_equal_transformers_generate(exported):
    prompt = _prompts(exported.contract.vocab_size, (7,), seed=5)
    ids, mask = left_pad(prompt, pad_id=0)
    ours = OrtPair(exported.directory, exported.contract).greedy(ids, mask, new_tokens=16)
    config = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        theirs = exported.model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=config)
    theirs = theirs[:, ids.shape[1]:].numpy()
    assert ours.shape == (1, 16)
    assert ours.tolist() == theirs.tolist(), f"{exported.family}: greedy tokens differ\nonnx  {ours}\ntorch {theirs}\n{_first_gap(exported, ids, mask, ours)}"


def _first_gap(exported, ids, mask, tokens) -> str:
    """Where tokens differ, the top-2 logit gap tells a real bug from a numeric near-tie."""
    full = np.concatenate([ids, tokens], axis=1)
    logits = torch_step(exported.model, full, np.ones_like(full), all_logits=True)[0][0, ids.shape[1] - 1:]
    gaps = np.sort(logits, axis=-1)[:, -1] - np.sort(logits, axis=-1)[:, -2]
    return f"top-2 logit gaps per step (PyTorch): {np.round(gaps, 5).tolist()}"


def test_extend_matches_pytorch_and_decode_steps(exported):
    """extend.onnx: several new tokens after a past equal PyTorch, and equal feeding them one by one."""
    graphs = OrtPair(exported.directory, exported.contract)
    ids, mask = left_pad(_prompts(exported.contract.vocab_size, (3, 6), seed=6), pad_id=0)
    prefilled, reference = graphs.prefill(ids, mask), torch_step(exported.model, ids, mask)
    new = np.array(_prompts(exported.contract.vocab_size, (4, 4), seed=7), dtype=np.int64)
    grown = np.concatenate([mask, np.ones_like(new)], axis=1)
    actual = graphs.extend(new, grown, prefilled[1:])
    expected = torch_step(exported.model, new, grown, reference[1:])
    rows = compare_step("extend", 1, _names(exported.contract), actual, expected, grown, "float32", graphs.steps.held())
    stepped = prefilled
    for n in range(new.shape[1]):
        stepped = graphs.decode(new[:, n:n + 1], grown[:, : mask.shape[1] + n + 1], stepped[1:])
    rows += compare_step("extend=decode", 1, _names(exported.contract), actual, stepped, grown, "float32", graphs.steps.held())
    _assert_rows(rows, f"{exported.family}: extend differs")


def test_speculative_decoding_gives_the_tokens_of_plain_decoding(exported):
    """The export drafting for itself (every draft right, up to float near-ties; the others are rolled back) through
    the verify graph: greedy and seeded sampling tokens equal those of plain decoding. (Prompt lookup drafts through the
    same stepper: tested on the text model and SmolLM2, where its n-grams match.)"""
    from kvgraph.runtime import Generator

    gen = Generator.load(exported.directory)
    if exported.contract.static and exported.contract.ring_windows:
        with pytest.raises(KvgraphError, match="rings of this static export's windowed layers cannot"):
            gen.generate([1, 2, 3], speculative="prompt-lookup")
        return
    prompt = _prompts(exported.contract.vocab_size, (9,), seed=6)[0]
    new = dict(max_new_tokens=14, min_new_tokens=14)
    plain = gen.generate(prompt, **new).token_ids
    itself = gen.generate(prompt, **new, speculative=gen, draft_tokens=4)
    assert itself.token_ids == plain, f"{exported.family}: speculation changed the tokens"
    assert itself.stats.accepted > itself.stats.drafted // 2  # drafts were checked, many taken
    if exported.family == "llama":  # sampling draws the same numbers with or without speculation (one family is enough)
        sampled = dict(new, temperature=1.0, top_p=0.9, seed=11)
        assert gen.generate(prompt, **sampled, speculative=gen, draft_tokens=2).token_ids == gen.generate(prompt, **sampled).token_ids
