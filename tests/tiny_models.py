"""Tiny random-init configs that stand for real checkpoints: each keeps its checkpoint's vocabulary
size, weight tying and head layout (GQA / multi-head), and shrinks only width and depth (>= 2 layers).

A 128-token vocabulary hid a duplicated tied embedding under the weights file's slack; with real
vocabularies the embedding is most of a tiny model's bytes, so "stored once" checks have teeth.

initializer_range 0.1 (init_std for OPT/BART) keeps the top-2 logit gap well above float noise, so
greedy comparisons test the graphs, not rounding.
"""

from __future__ import annotations

_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# family -> (the checkpoint it stands for, config overrides)
DECODER_CHECKPOINTS = {
    "gpt2": ("gpt2 (50257, tied)", dict(vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1,
                                        bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("EleutherAI/pythia-70m (50304, untied)", dict(_DECODER, vocab_size=50304, num_key_value_heads=None,
                                                               tie_word_embeddings=False)),
    "opt": ("facebook/opt-125m (50272, tied)", dict(
        vocab_size=50272, hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, init_std=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "llama": ("meta-llama/Llama-2-7b (32000, untied, GQA as in Llama 3)", dict(_DECODER, vocab_size=32000, tie_word_embeddings=False)),
    "mistral": ("mistralai/Mistral-7B-v0.3 (32768, untied)", dict(_DECODER, vocab_size=32768, tie_word_embeddings=False)),
    "qwen2": ("Qwen/Qwen2.5-0.5B (151936, tied)", dict(_DECODER, vocab_size=151936, tie_word_embeddings=True)),
    "qwen3": ("Qwen/Qwen3-0.6B (151936, tied, head_dim set)", dict(_DECODER, vocab_size=151936, head_dim=16, tie_word_embeddings=True)),
    "phi3": ("microsoft/Phi-3-mini-4k (32064, untied)", dict(_DECODER, vocab_size=32064, tie_word_embeddings=False)),
    "gemma": ("google/gemma-2b (256000, tied, head_dim set)", dict(_DECODER, vocab_size=256000, head_dim=16, tie_word_embeddings=True)),
    # Mechanisms beyond the dense GQA decoder: each family keeps its checkpoint's setting, scaled to
    # the tiny width (a window of 8 where the real one is 4096, so the tests' 13-23 token sequences cross it).
    "gemma2": ("google/gemma-2-2b (256000, tied; sliding window 4096 on every other layer, logit soft-capping 50/30)",
               dict(_DECODER, vocab_size=256000, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "mixtral": ("mistralai/Mixtral-8x7B-v0.1 (32000, untied; 8 experts, top-2)",
                dict(_DECODER, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
    "falcon": ("tiiuae/falcon-7b (65024, tied; multi-query: 1 KV head, parallel attention + MLP)", dict(
        vocab_size=65024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
        new_decoder_architecture=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
    "falcon-new": ("tiiuae/falcon-40b (65024, tied; new decoder architecture: grouped KV heads, two layer norms)", dict(
        vocab_size=65024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
    "bloom": ("bigscience/bloom-560m (250880, tied; ALiBi)", dict(
        vocab_size=250880, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=3)),
}
TINY_CONFIGS = {family: config for family, (_, config) in DECODER_CHECKPOINTS.items()}
MODEL_TYPES = {"falcon-new": "falcon"}  # a family named for a variant: its transformers model_type

# Encoder-decoder families (2 encoder and 2 decoder layers). BART/Marian/mBART/Pegasus: init_std 0.1;
# T5 scales its own init by initializer_factor (1.5: logits within about +-10, top-2 gaps >= 0.4).
# All their real checkpoints tie the encoder embedding, decoder embedding and lm_head; t5-v1_1 does
# not tie the lm_head (and gates its feed-forward): the untied encoder-decoder.
_BART_LIKE = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, init_std=0.1, forced_eos_token_id=None)
_T5 = dict(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, initializer_factor=1.5, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
SEQ2SEQ_CHECKPOINTS = {
    "t5": ("t5", "google-t5/t5-small (32128, tied)", _T5),
    "t5-v1_1": ("t5", "google/t5-v1_1-small (32128, untied lm_head, gated-gelu)",
                dict(_T5, tie_word_embeddings=False, feed_forward_proj="gated-gelu")),
    "bart": ("bart", "facebook/bart-base (50265, tied)", dict(_BART_LIKE, vocab_size=50265, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                                                              decoder_start_token_id=2)),
    "marian": ("marian", "Helsinki-NLP/opus-mt-en-de (58101, tied)", dict(_BART_LIKE, vocab_size=58101, pad_token_id=58100, eos_token_id=0,
                                                                          decoder_start_token_id=58100)),
    "mbart": ("mbart", "facebook/mbart-large-50 (250054, tied)", dict(_BART_LIKE, vocab_size=250054, bos_token_id=0, pad_token_id=1,
                                                                     eos_token_id=2, decoder_start_token_id=2)),
    "pegasus": ("pegasus", "google/pegasus-xsum (96103, tied)", dict(_BART_LIKE, vocab_size=96103, pad_token_id=0, eos_token_id=1,
                                                                    decoder_start_token_id=0)),
}
SEQ2SEQ_CONFIGS = {name: config for name, (_, _, config) in SEQ2SEQ_CHECKPOINTS.items()}


def tiny_seq2seq(family: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    model_type = SEQ2SEQ_CHECKPOINTS[family][0]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**SEQ2SEQ_CONFIGS[family], **overrides})
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def distinct_norms(model):
    """The model, its norms' scales made distinct (1 + 0.2 N(0, 1), biases 0.2 N(0, 1), seeded by name) as a trained
    checkpoint's are: fresh
    ones are all 1, which the export stores once for every norm (and nothing can be folded into a shared constant)."""
    import zlib

    import torch

    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name.lower():
                noise = 0.2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
                weight.copy_(noise if name.endswith("bias") else 1 + noise)
    return model.eval()


def tiny_model(family: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in {**TINY_CONFIGS[family], **overrides}.items() if v is not None}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(MODEL_TYPES.get(family, family), **settings)
    return AutoModelForCausalLM.from_config(config).eval()


def byte_tokenizer(chat_template: str | None = None):
    """A byte-level tokenizer: ids 0-2 are <pad>, <s>, </s>; ids 3..258 are the 256 bytes.

    Every byte is one token, so multi-byte characters span several tokens (as in real BPEs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: 3 + i for i, ch in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def text_model_dir(directory, family: str = "llama"):
    """A tiny model with a byte-level tokenizer and chat template, saved as a Hugging Face directory.

    It stands for a byte-level model (ByT5's vocabulary is 384), not for a BPE checkpoint: the runtime's
    text tests (streaming never splits a UTF-8 character, stop strings, chat turns) need every id to be
    a byte. Weight storage is proven on the real-vocabulary families above.
    """
    tiny_model(family, vocab_size=260).save_pretrained(directory)
    byte_tokenizer(CHAT_TEMPLATE).save_pretrained(directory)
    return directory
