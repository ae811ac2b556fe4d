"""Tiny random-init configs, one per family the parity suite proves (>= 2 layers, GQA where the family has it).

initializer_range 0.1 (init_std for OPT) keeps the top-2 logit gap well above float noise, so
greedy comparisons test the graphs, not rounding.
"""

from __future__ import annotations

_DECODER = dict(
    vocab_size=128,
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

TINY_CONFIGS = {
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(_DECODER, num_key_value_heads=None),
    "opt": dict(
        vocab_size=128, hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, init_std=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=16),
    "phi3": _DECODER,
    "gemma": dict(_DECODER, head_dim=16),
}


# Encoder-decoder families (2 encoder and 2 decoder layers). BART/Marian: init_std 0.1; T5 scales its
# own init by initializer_factor (1.5: logits within about ±10, top-2 gaps >= 0.4).
SEQ2SEQ_CONFIGS = {
    "t5": dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, initializer_factor=1.5, decoder_start_token_id=0, pad_token_id=0,
               eos_token_id=1),
    "bart": dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                 init_std=0.1, bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                 forced_eos_token_id=None),
    "marian": dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                   init_std=0.1, pad_token_id=127, eos_token_id=0, decoder_start_token_id=127, forced_eos_token_id=None),
}


def tiny_seq2seq(family: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**SEQ2SEQ_CONFIGS[family], **overrides})
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def tiny_model(family: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in {**TINY_CONFIGS[family], **overrides}.items() if v is not None}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **settings)
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
    """A tiny model with a byte-level tokenizer and chat template, saved as a Hugging Face directory."""
    tiny_model(family, vocab_size=260).save_pretrained(directory)
    byte_tokenizer(CHAT_TEMPLATE).save_pretrained(directory)
    return directory
