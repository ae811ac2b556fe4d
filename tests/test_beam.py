"""Beam search (runtime/decoding/beam.py) against transformers' generate(num_beams=k) on the same inputs: token ids
and sequence scores, decoder-only and encoder-decoder (Marian and BART, as translation uses beams), both
cache modes, a padded batch, length penalties, early stopping, returned sequences and repeated n-grams.

The tiny models rarely end on their own, so each test makes a token the model does produce the eos id,
on both sides: beams then finish at different lengths and the finished-hypothesis bookkeeping runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from kvgraph.graphs import KvgraphError
from kvgraph.runtime import Generator

PROMPTS = [[1, 123, 88, 9, 70, 3], [1, 42, 17], [1, 200, 201, 202, 203, 204, 205, 33]]  # ids < 260: the byte models' vocabulary
CASES = [  # (num_beams, length_penalty, early_stopping, num_return_sequences, no_repeat_ngram_size)
    (3, 1.0, False, 1, 0),
    (4, 0.6, True, 2, 0),
    (2, 2.0, "never", 2, 2),
]


def _theirs(model, prompts, pad, eos, k, lp, es, n, ngram, new, decoder_start=None) -> tuple[list[list[list[int]]], np.ndarray]:
    """transformers' beams for a left-padded batch (decoder-only) or right-padded sources: ids per prompt and rank, scores."""
    width = max(len(p) for p in prompts)
    seq2seq = decoder_start is not None
    ids = torch.tensor([p + [pad] * (width - len(p)) if seq2seq else [pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) if seq2seq else [0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(do_sample=False, num_beams=k, length_penalty=lp, early_stopping=es, num_return_sequences=n,
                              no_repeat_ngram_size=ngram, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad,
                              return_dict_in_generate=True, output_scores=True, decoder_start_token_id=decoder_start)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, generation_config=config)
    skip = 1 if seq2seq else width
    rows = []
    for row in out.sequences[:, skip:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)  # after eos: fill
    return [rows[i * n:(i + 1) * n] for i in range(len(prompts))], out.sequences_scores.numpy().reshape(len(prompts), n)


def _ours(gen, prompts, eos, k, lp, es, n, ngram, new):
    patched = Generator(gen.graphs, gen.codec)
    patched.eos_ids = frozenset({eos})
    results = patched.generate(prompts, max_new_tokens=new, num_beams=k, length_penalty=lp, early_stopping=es, num_return_sequences=n,
                               no_repeat_ngram_size=ngram)
    results = [r if isinstance(r, list) else [r] for r in results]
    return [[r.token_ids for r in ranked] for ranked in results], np.array([[r.score for r in ranked] for ranked in results])


def _an_eos(gen, prompts) -> int:
    """A token the model produces early on greedily: as the eos id it ends some beams and not others."""
    return gen.generate(prompts[0], max_new_tokens=4).token_ids[2]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[0]}-lp{c[1]}-es{c[2]}-n{c[3]}-ng{c[4]}")
def test_decoder_only_beams_equal_transformers(mode, case, text_export, text_export_static):
    model, directory = text_export if mode == "dynamic" else text_export_static
    gen = Generator.load(directory)
    eos = _an_eos(gen, PROMPTS)
    ours, our_scores = _ours(gen, PROMPTS, eos, *case, new=14)
    theirs, their_scores = _theirs(model, PROMPTS, 0, eos, *case, new=14)
    assert ours == theirs
    np.testing.assert_allclose(our_scores, their_scores, rtol=1e-4, atol=1e-4)
    if case[1] <= 1.0:  # (a length penalty of 2 prefers the long ones)
        assert any(len(t) < 14 for ranked in ours for t in ranked)  # some returned beams ended at the eos


@pytest.mark.parametrize("family,mode", [("marian", "static"), ("bart", "dynamic")])
def test_encoder_decoder_beams_equal_transformers(family, mode, seq2seq_exports):
    model, directory, manifest = seq2seq_exports(family, mode)
    gen = Generator.load(directory)
    sources = [[5, 900, 31000, 77, 12], [8, 15000], [4000, 4001, 4002, 4003, 4004, 4005, 9]]
    eos = _an_eos(gen, sources)
    start, pad = manifest.special_tokens.decoder_start_token_id, model.config.pad_token_id
    for case in CASES[:2]:
        ours, our_scores = _ours(gen, sources, eos, *case, new=12)
        theirs, their_scores = _theirs(model, sources, pad, eos, *case, new=12, decoder_start=start)
        assert ours == theirs, case
        np.testing.assert_allclose(our_scores, their_scores, rtol=1e-4, atol=1e-4)


def test_beams_without_a_cache_equal_beams_with_one(text_export):
    gen = Generator.load(text_export[1])
    with_cache = gen.generate(PROMPTS, max_new_tokens=8, num_beams=3, num_return_sequences=3)
    recomputed = gen.generate(PROMPTS, max_new_tokens=8, num_beams=3, num_return_sequences=3, use_cache=False)
    assert [[r.token_ids for r in ranked] for ranked in with_cache] == [[r.token_ids for r in ranked] for ranked in recomputed]


def test_greedy_no_repeat_ngram_equals_transformers(text_export):
    model, directory = text_export
    gen = Generator.load(directory)
    prompt = [1, 70, 70, 70, 71, 70, 70]
    ours = gen.generate(prompt, max_new_tokens=20, no_repeat_ngram_size=2).token_ids
    config = GenerationConfig(do_sample=False, max_new_tokens=20, no_repeat_ngram_size=2, eos_token_id=2, pad_token_id=0)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), generation_config=config)
    assert ours == theirs[0, len(prompt):].tolist()
    seq = prompt + ours
    for end in range(len(prompt), len(seq)):  # each new token completes a bigram not seen before it
        assert (seq[end - 1], seq[end]) not in set(zip(seq[: end - 1], seq[1: end - 1]))


@pytest.mark.parametrize("options,message", [
    ({"num_beams": 0}, "num_beams must be an integer >= 1"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences must be an integer between 1 and num_beams (2)"),
    ({"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping must be true, false or 'never'"),
    ({"num_beams": 2, "temperature": 0.7}, "beam search here is deterministic"),
    ({"num_beams": 2, "stop": ["x"]}, "stop strings do not combine with num_beams > 1"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0"),
])
def test_bad_beam_options_are_refused_before_anything_runs(text_export, options, message):
    gen = Generator.load(text_export[1])
    with pytest.raises(KvgraphError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gen.generate("abc", max_new_tokens=4, **options)
