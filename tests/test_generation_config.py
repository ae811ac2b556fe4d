"""The checkpoint's own decoding settings (generation_config.json), applied as transformers' generate() applies them.

Three layers of evidence:
- each numpy processor equals transformers' LogitsProcessor on the same ids and random scores (1e-6);
- seeded sampling with a real sampling config (Qwen3's) draws from the distribution transformers' warpers leave;
- tiny models carrying the published checkpoints' generation configs give kvgraph's tokens equal to
  `model.generate(**inputs)` called with no generation arguments, on a padded batch, in both cache modes.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp

from tiny_models import tiny_model, tiny_seq2seq
from kvgraph.export import export_model
from kvgraph.graphs import KvgraphError
from kvgraph.runtime import Generator
from kvgraph.runtime.core import processors
from kvgraph.graphs.generation_config import GenerationDefaults
from kvgraph.runtime.core.processors import Context
from kvgraph.runtime.core.sampling import Sampling, draw, softmax

V, EOS = 40, (2, 3)
RNG = np.random.default_rng(0)
SCORES = (RNG.normal(size=(3, V)) * 3).astype(np.float32)
IDS = np.array([[0, 0, 5, 7, 8, 5, 7, 9, 11, 5],  # left-padded by 2 (pad id 0)
                [4, 5, 6, 4, 5, 6, 4, 5, 1, 7],
                [0, 9, 9, 9, 12, 7, 8, 13, 7, 8]], dtype=np.int64)
PADDING = np.array([2, 0, 1])
SOURCES = np.array([[5, 7, 8, 30, 31, 1], [4, 17, 18, 19, 1, 1], [9, 7, 8, 13, 14, 1]], dtype=np.int64)

# (kvgraph's keyword settings, transformers' processor, the context's prompt length and max length)
CASES = {
    "repetition_penalty": ({"repetition_penalty": 1.3}, lambda: lp.RepetitionPenaltyLogitsProcessor(1.3, torch.tensor(PADDING))),
    "no_repeat_ngram_size": ({"no_repeat_ngram_size": 2}, lambda: lp.NoRepeatNGramLogitsProcessor(2)),
    "encoder_repetition_penalty": ({"encoder_repetition_penalty": 1.5}, lambda: lp.EncoderRepetitionPenaltyLogitsProcessor(1.5, torch.tensor(SOURCES))),
    "encoder_no_repeat_ngram_size": ({"encoder_no_repeat_ngram_size": 2}, lambda: lp.EncoderNoRepeatNGramLogitsProcessor(2, torch.tensor(SOURCES))),
    "bad_words_ids": ({"bad_words_ids": [[6], [7, 8], [13, 7, 11], [2]]}, lambda: lp.NoBadWordsLogitsProcessor([[6], [7, 8], [13, 7, 11], [2]], list(EOS))),
    "sequence_bias": ({"sequence_bias": {(6,): 2.5, (7, 8): -3.0, (5, 7, 9): 1.5}},
                      lambda: lp.SequenceBiasLogitsProcessor([[[6], 2.5], [[7, 8], -3.0], [[5, 7, 9], 1.5]])),
    "min_length": ({"min_length": 12}, lambda: lp.MinLengthLogitsProcessor(12, list(EOS))),
    "forced_eos_token_id": ({"forced_eos_token_id": [2, 3]}, lambda: lp.ForcedEOSTokenLogitsProcessor(11, [2, 3])),
    "exponential_decay_length_penalty": ({"exponential_decay_length_penalty": (1, 1.6)},
                                         lambda: lp.ExponentialDecayLengthPenalty((1, 1.6), list(EOS), 7)),
    "suppress_tokens": ({"suppress_tokens": [1, 6, 39]}, lambda: lp.SuppressTokensLogitsProcessor([1, 6, 39])),
    "begin_suppress_tokens": ({"begin_suppress_tokens": [2, 6]}, lambda: lp.SuppressTokensAtBeginLogitsProcessor([2, 6], 10), 10),
    "renormalize_logits": ({"renormalize_logits": True}, lambda: lp.LogitNormalization()),
    "temperature": ({"temperature": 0.7}, lambda: lp.TemperatureLogitsWarper(0.7)),
    "top_k": ({"temperature": 1.0, "top_k": 5}, lambda: lp.TopKLogitsWarper(5)),
    "top_p": ({"temperature": 1.0, "top_p": 0.8}, lambda: lp.TopPLogitsWarper(0.8)),
    "min_p": ({"temperature": 1.0, "min_p": 0.1}, lambda: lp.MinPLogitsWarper(0.1)),
    "typical_p": ({"temperature": 1.0, "typical_p": 0.7}, lambda: lp.TypicalLogitsWarper(0.7)),
    "epsilon_cutoff": ({"temperature": 1.0, "epsilon_cutoff": 0.02}, lambda: lp.EpsilonLogitsWarper(0.02)),
    "eta_cutoff": ({"temperature": 1.0, "eta_cutoff": 0.05}, lambda: lp.EtaLogitsWarper(0.05)),
}


def _ours(settings: dict, prompt_length: int = 7, max_length: int = 11, ids: np.ndarray = IDS, scores: np.ndarray = SCORES,
          min_new_tokens: int = 0) -> np.ndarray:
    context = Context(EOS, prompt_length, max_length, min_new_tokens, SOURCES, PADDING, V)
    return processors.build(Sampling.of(settings), context)(ids, scores.copy())


def _same(ours: np.ndarray, theirs: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_processor_equals_transformers(name):
    settings, theirs, *prompt_length = CASES[name]
    expected = theirs()(torch.from_numpy(IDS), torch.from_numpy(SCORES.copy())).numpy()
    ours = _ours(settings, *prompt_length)
    _same(ours, expected)
    assert not np.array_equal(ours, SCORES), f"{name} changed nothing on these inputs: the case proves nothing"


def test_length_and_forced_token_processors_act_only_at_their_step():
    _same(_ours({}, min_new_tokens=5),
          lp.MinNewTokensLengthLogitsProcessor(7, 5, list(EOS))(torch.from_numpy(IDS), torch.from_numpy(SCORES.copy())).numpy())
    first = IDS[:, :1]
    forced = _ours({"forced_bos_token_id": 4}, prompt_length=1, ids=first)
    _same(forced, lp.ForcedBOSTokenLogitsProcessor(4)(torch.from_numpy(first), torch.from_numpy(SCORES.copy())).numpy())
    assert (forced.argmax(-1) == 4).all()
    np.testing.assert_array_equal(_ours({"forced_bos_token_id": 4}), SCORES)  # not the first step: unchanged
    np.testing.assert_array_equal(_ours({"forced_eos_token_id": 2}, max_length=30), SCORES)


def test_nan_and_inf_scores_are_removed_as_transformers_does():
    scores = SCORES.copy()
    scores[0, 3], scores[1, 4], scores[2, 5] = np.nan, np.inf, -np.inf
    expected = lp.InfNanRemoveLogitsProcessor()(torch.from_numpy(IDS), torch.from_numpy(scores.copy())).numpy()
    np.testing.assert_array_equal(_ours({"remove_invalid_values": True}, scores=scores), expected)


def test_the_order_is_transformers_order():
    """Several processors at once, against the list transformers' generate() builds from the same generation config."""
    config = GenerationConfig(repetition_penalty=1.2, no_repeat_ngram_size=3, bad_words_ids=[[6]], min_length=12, suppress_tokens=[1],
                              do_sample=True, temperature=0.8, top_k=10, top_p=0.9, renormalize_logits=True, eos_token_id=list(EOS))
    model = tiny_model("llama", vocab_size=V)
    config._eos_token_tensor = torch.tensor(EOS)
    built = model._get_logits_processor(config, input_ids_seq_length=7, model_kwargs={"attention_mask": torch.from_numpy((IDS != 0) | (np.arange(10) >= PADDING[:, None]))})
    expected = built(torch.from_numpy(IDS), torch.from_numpy(SCORES.copy())).numpy()
    ours = _ours({"repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "bad_words_ids": [[6]], "min_length": 12, "suppress_tokens": [1],
                  "temperature": 0.8, "top_k": 10, "top_p": 0.9, "renormalize_logits": True})
    _same(ours, expected)


def test_seeded_sampling_follows_a_real_sampling_config():
    """Qwen3's published config (do_sample, temperature 0.6, top_k 20, top_p 0.95) read as the runtime reads it; seeded
    draws land only where transformers' warpers leave probability, in proportion to it (chi-square, p = 0.001)."""
    defaults = GenerationDefaults.from_dict(QWEN3)
    assert defaults.settings["temperature"] == 0.6 and defaults.settings["top_k"] == 20 and defaults.settings["top_p"] == 0.95
    sampling = Sampling.of({k: v for k, v in defaults.settings.items() if k != "max_new_tokens"})
    logits = (np.random.default_rng(3).normal(size=(1, 64)) * 0.6).astype(np.float32)
    warped = torch.from_numpy(logits.copy())
    for warper in (lp.TemperatureLogitsWarper(0.6), lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.95)):
        warped = warper(None, warped)
    probs = softmax(warped.numpy().astype(np.float64))[0]
    pipeline = processors.build(sampling, Context((), 1, 100))
    ids = np.zeros((1, 1), dtype=np.int64)
    rng = np.random.default_rng(11)
    counts = np.bincount([draw(pipeline(ids, logits), rng)[0] for _ in range(6000)], minlength=64)
    kept = probs > 0
    assert counts[~kept].sum() == 0 and 2 < kept.sum() <= 20
    expected = probs[kept] * counts.sum()
    big = expected >= 5
    statistic, df = float(((counts[kept][big] - expected[big]) ** 2 / expected[big]).sum()), int(big.sum()) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3
    assert statistic < critical


# -- the published generation configs, on tiny models ---------------------------------------------------------

# The fields of each checkpoint's generation_config.json that steer decoding (ids as in the tiny models, which keep
# the checkpoints' vocabularies and special ids).
QWEN3 = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "temperature": 0.6,
         "top_k": 20, "top_p": 0.95}
SEQ2SEQ_GENERATION = {
    "bart": ("facebook/bart-large-cnn", {"bos_token_id": 0, "decoder_start_token_id": 2, "early_stopping": True, "eos_token_id": 2,
                                         "forced_bos_token_id": 0, "forced_eos_token_id": 2, "length_penalty": 2.0, "max_length": 142,
                                         "min_length": 56, "no_repeat_ngram_size": 3, "num_beams": 4, "pad_token_id": 1}),
    "mbart": ("facebook/mbart-large-50-many-to-many-mmt", {"bos_token_id": 0, "decoder_start_token_id": 2, "early_stopping": True,
                                                          "eos_token_id": 2, "forced_eos_token_id": 2, "max_length": 200, "num_beams": 5,
                                                          "pad_token_id": 1}),
    "marian": ("Helsinki-NLP/opus-mt-en-de", {"bad_words_ids": [[58100]], "bos_token_id": 0, "decoder_start_token_id": 58100,
                                              "eos_token_id": 0, "forced_eos_token_id": 0, "max_length": 512, "num_beams": 4,
                                              "pad_token_id": 58100}),
    "pegasus": ("google/pegasus-xsum", {"bos_token_id": 0, "decoder_start_token_id": 0, "eos_token_id": 1, "forced_eos_token_id": 1,
                                        "length_penalty": 0.6, "max_length": 64, "num_beams": 8, "pad_token_id": 0}),
    "t5": ("google-t5/t5-small", {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}),
}
BATCH = [[5, 1200, 3401, 77, 911, 42, 2], [8, 310, 2]]  # two sources of different lengths: a padded batch


def _source_batch(pad_id: int):
    width = max(map(len, BATCH))
    ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in BATCH])
    return ids, (ids != pad_id).long() if pad_id not in BATCH[0] else torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in BATCH])


@pytest.fixture(scope="module")
def checkpoint_exports(tmp_path_factory):
    made = {}

    def get(family: str, mode: str):
        if (family, mode) not in made:
            _, fields = SEQ2SEQ_GENERATION[family]
            length = fields.get("max_length", 20) + 8
            positions = {} if family == "t5" else {"max_position_embeddings": max(64, length)}
            model = tiny_seq2seq(family, **positions)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.generation_config = GenerationConfig(**fields)
            out = tmp_path_factory.mktemp(f"{family}-{mode}") / "export"
            options = {"cache": "static", "max_length": length} if mode == "static" else {}
            export_model(model, out, validate=False, **options)
            made[family, mode] = (model, out)
        return made[family, mode]

    return get


# Every family with the dynamic cache; with the static one, the two whose configs carry the most processors
# (bart: min length, no repeated trigram, 4 beams; pegasus: 8 beams, length penalty) -- the processors sit above
# the cache adapter, and each further export costs 30-50 s of tracing.
CACHE_CASES = [("dynamic", family) for family in sorted(SEQ2SEQ_GENERATION)] + [("static", "bart"), ("static", "pegasus")]


@pytest.mark.parametrize("mode,family", CACHE_CASES)
def test_published_generation_config_gives_transformers_tokens(family, mode, checkpoint_exports):
    model, out = checkpoint_exports(family, mode)
    _, fields = SEQ2SEQ_GENERATION[family]
    written = json.loads((out / "generation_config.json").read_text())
    assert all(written.get(key) == value for key, value in fields.items() if key != "transformers_version")
    ids, mask = _source_batch(fields["pad_token_id"])
    kwargs = {} if "max_length" in fields else {"max_new_tokens": 12}  # t5-small sets no length: kvgraph's 64 vs transformers' 20
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    generator = Generator.load(out)
    results = generator.generate(BATCH, **kwargs)
    start = fields["decoder_start_token_id"]
    for row, result in enumerate(results):
        theirs = [t for t in expected[row].tolist()[1:]]
        while theirs and theirs[-1] == fields["pad_token_id"] and len(theirs) > len(result.token_ids):
            theirs.pop()  # transformers pads the shorter row after its eos
        assert result.token_ids == theirs, f"row {row}: kvgraph {result.token_ids} vs transformers {theirs} (start {start})"
    if fields.get("forced_eos_token_id") is not None:
        assert all(r.token_ids[-1] == fields["forced_eos_token_id"] for r in results)


def test_the_caller_overrides_the_generation_config(checkpoint_exports):
    model, out = checkpoint_exports("marian", "dynamic")
    ids, mask = _source_batch(58100)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, num_beams=1, max_new_tokens=6)
    greedy = Generator.load(out).generate(BATCH, num_beams=1, max_new_tokens=6)
    assert [r.token_ids for r in greedy] == [row[1:7] for row in expected.tolist()]
    assert greedy[0].token_ids[-1] == 0  # the config's forced_eos_token_id at the last position max_new_tokens allows
    plain = Generator.load(out, generation_config=False).generate(BATCH[0], max_new_tokens=6)
    assert plain.token_ids[:5] == greedy[0].token_ids[:5] and plain.token_ids[-1] != 0  # without the config: nothing forced


def test_unsupported_fields_are_named_not_dropped(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 2, "num_beam_groups": 2, "diversity_penalty": 0.5,
                                                                 "my_field": 1, "transformers_version": "5.0"}))
    with pytest.warns(UserWarning, match="num_beam_groups=2.*diversity_penalty=0.5.*my_field=1"):
        defaults = GenerationDefaults.read(tmp_path)
    assert defaults.settings == {"num_beams": 2}
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(KvgraphError, match="generation_config.json: not a readable generation config"):
        GenerationDefaults.read(tmp_path)


def test_one_mbart_export_translates_into_two_languages(checkpoint_exports, tmp_path, capsys):
    """mBART-50's language codes as tokens of the export's tokenizer: --target-lang forces each one first, with the
    tokens transformers gives with the matching forced_bos_token_id (the config's 5 beams and forced eos included)."""
    import shutil

    from tokenizers import Tokenizer, models

    from kvgraph.runtime.commands.main import main

    model, out = checkpoint_exports("mbart", "dynamic")
    served = tmp_path / "mbart"
    shutil.copytree(out, served)
    codes = {"de_DE": 250003, "fr_XX": 250008}
    Tokenizer(models.WordLevel({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **codes}, unk_token="<unk>")).save(str(served / "tokenizer.json"))
    generator = Generator.load(served)
    ids, mask = _source_batch(1)
    outputs = {}
    for code, token in codes.items():
        with torch.no_grad():
            expected = model.generate(input_ids=ids, attention_mask=mask, forced_bos_token_id=token, max_new_tokens=10)
        results = generator.generate(BATCH, target_lang=code, max_new_tokens=10)
        for row, result in enumerate(results):
            theirs = expected[row].tolist()[1:]
            while theirs and theirs[-1] == 1 and len(theirs) > len(result.token_ids):
                theirs.pop()
            assert result.token_ids == theirs and result.token_ids[0] == token
        outputs[code] = [r.token_ids for r in results]
    assert outputs["de_DE"] != outputs["fr_XX"]
    assert main(["generate", str(served), "--prompt", "x", "--target-lang", "xx_XX"]) != 0
    assert "target_lang: 'xx_XX' is not a token of this export's vocabulary" in capsys.readouterr().err


# -- decoders: the published greedy config in the Python runtime, a config with processors in the Node driver -------

GEMMA2 = {"bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107], "pad_token_id": 0}  # google/gemma-2-2b
DECODER_BATCH = [[2, 651, 6037, 576, 6081, 603, 12, 40, 9], [2, 1841, 603]]


def _decoder_export(family: str, fields: dict, out, model=None, **options):
    from tiny_models import tiny_model

    model = model or tiny_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generation_config = GenerationConfig(**fields)
    export_model(model, out, validate=False, **options)
    return model


def _left_padded(rows: list[list[int]], pad: int):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def _cut(row: list[int], eos) -> list[int]:
    ends = [i for i, t in enumerate(row) if t in eos]
    return row[: ends[0] + 1] if ends else row


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_gemma2_published_config_on_a_padded_batch(mode, tmp_path):
    """Gemma 2's own config (two eos ids, pad 0) on a padded batch: kvgraph's tokens equal generate() with no
    generation argument but the length (transformers' default is 20 positions in all, kvgraph's 64 new tokens)."""
    options = {"cache": "static", "max_length": 32} if mode == "static" else {}
    model = _decoder_export("gemma2", GEMMA2, tmp_path / "gemma2", **options)
    ids, mask = _left_padded(DECODER_BATCH, 0)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    results = Generator.load(tmp_path / "gemma2").generate(DECODER_BATCH, max_new_tokens=10)
    for row, result in enumerate(results):
        assert result.token_ids == _cut(expected[row, ids.shape[1]:].tolist(), GEMMA2["eos_token_id"]), f"row {row}"


NODE_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0, "max_new_tokens": 9, "repetition_penalty": 1.4,
               "no_repeat_ngram_size": 2, "min_new_tokens": 3}


def test_node_driver_takes_its_defaults_from_the_generation_config(tmp_path):
    """`node generate.js DIR --ids ...` with no option decodes as generate() with no argument: the config's length,
    penalties, bans and suppressed tokens; the caller's option still wins; a field the driver cannot apply is named."""
    from test_vectors import node
    from tiny_models import tiny_model

    model, prompt = tiny_model("llama"), [1, 450, 4996, 17354, 1701, 29916, 432]
    feeds = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
    with torch.no_grad():
        plain = model.generate(**feeds, generation_config=GenerationConfig(max_new_tokens=9, eos_token_id=[2, 7], pad_token_id=0))
    plain = _cut(plain[0, len(prompt):].tolist(), [2, 7])
    fields = {**NODE_CONFIG, "suppress_tokens": [plain[0]], "bad_words_ids": [[plain[1], plain[2]]]}  # both bite
    _decoder_export("llama", fields, tmp_path / "llama", model=model)
    with torch.no_grad():
        expected = model.generate(**feeds)
    theirs = _cut(expected[0, len(prompt):].tolist(), NODE_CONFIG["eos_token_id"])
    result = node(str(tmp_path / "llama"), "--ids", ",".join(map(str, prompt)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == theirs and len(theirs) == 9 and theirs != plain
    shorter = node(str(tmp_path / "llama"), "--ids", ",".join(map(str, prompt)), "--max-new-tokens", "4")
    assert json.loads(shorter.stdout) == theirs[:4]  # the caller's length over the config's: the same processed tokens
    config = json.loads((tmp_path / "llama" / "generation_config.json").read_text())
    (tmp_path / "llama" / "generation_config.json").write_text(json.dumps({**config, "num_beams": 4}))
    beams = node(str(tmp_path / "llama"), "--ids", ",".join(map(str, prompt)))
    assert beams.returncode == 0 and "not applied by this driver: num_beams=4" in beams.stderr
