"""Encoder-decoder models (T5, BART, Marian): three graphs around one decoder cache.

    encoder(input_ids, attention_mask)                              -> encoder_hidden_states
    prefill(input_ids, encoder_hidden_states, encoder_attention_mask) -> (logits, present.*, cross.*)
    decode(input_ids, encoder_attention_mask, *past, *cross)        -> (logits, present.*)

In the decoder, queries come from the decoder and the cross-attention keys/values from the
encoder output: prefill computes them once (cross.{i}.key/value), and decode takes them as
inputs only. Its transformers EncoderDecoderCache is built with the cross cache filled, which
marks every cross layer as computed, so the traced decode graph never projects the encoder
output again and does not even take it as an input.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from kvgraph.graphs import GraphContract
from kvgraph.graphs.contract import BATCH, ENCODER_SEQUENCE, PAST, SEQUENCE
from kvgraph.export.hf_cache import cache_keyword, returned_cache
from kvgraph.export.wrappers import ScatterLayer, static_mask

_BATCH, _SOURCE, _TARGET, _PAST = 2, 7, 3, 5  # distinct and > 1: no dimension gets specialised


class EncoderStep(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        # (B, Se), (B, Se) -> (B, Se, H)
        return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _DecoderStep(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def _run(self, input_ids, encoder_hidden_states, encoder_attention_mask, cache: EncoderDecoderCache, decoder_mask=None):
        if encoder_hidden_states is None:  # decode: cross K/V come from the cache; the encoder output is never read
            batch, source = encoder_attention_mask.shape
            encoder_hidden_states = torch.zeros(batch, source, self.model.config.d_model, dtype=cache.cross_attention_cache.layers[0].keys.dtype)
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            decoder_attention_mask=decoder_mask,
            use_cache=True,
            **{cache_keyword(self.model): cache},
        )
        return out.logits[:, -1:], returned_cache(out)


def _flat(cache: Cache) -> list[torch.Tensor]:
    """key0, value0, key1, value1, ... of a cache's layers"""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _filled(tensors) -> DynamicCache:
    """A DynamicCache holding flat (key0, value0, key1, ...) tensors."""
    cache = DynamicCache()
    for layer in range(len(tensors) // 2):
        cache.update(tensors[2 * layer], tensors[2 * layer + 1], layer)
    return cache


class Seq2SeqPrefill(_DecoderStep):
    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask):
        # (B, S), (B, Se, H), (B, Se) -> logits (B, 1, V), present (B, Hkv, S, D) each, cross (B, Hkv, Se, D) each
        config = self.model.config
        cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        logits, cache = self._run(input_ids, encoder_hidden_states, encoder_attention_mask, cache)
        return (logits, *_flat(cache.self_attention_cache), *_flat(cache.cross_attention_cache))


class Seq2SeqDecode(_DecoderStep):
    def forward(self, input_ids, encoder_attention_mask, *caches):
        # (B, 1), (B, Se), past (B, Hkv, P, D) x 2L, cross (B, Hkv, Se, D) x 2L -> logits (B, 1, V), present (B, Hkv, P+1, D)
        half = len(caches) // 2
        cache = EncoderDecoderCache(_filled(caches[:half]), _filled(caches[half:]))  # cross layers filled: marked as computed
        logits, cache = self._run(input_ids, None, encoder_attention_mask, cache)
        return (logits, *_flat(cache.self_attention_cache))


def seq2seq_steps(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {"encoder": EncoderStep(model), "prefill": Seq2SeqPrefill(model), "decode": Seq2SeqDecode(model)}


def seq2seq_examples(model: torch.nn.Module, contract: GraphContract) -> dict[str, tuple]:
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(3)
    source = torch.randint(3, contract.vocab_size, (_BATCH, _SOURCE), generator=generator)
    mask = torch.ones(_BATCH, _SOURCE, dtype=torch.int64)
    mask[1, -2:] = 0  # a right-padded source row
    hidden = torch.randn(_BATCH, _SOURCE, contract.hidden_size, generator=generator).to(dtype)
    target = torch.randint(3, contract.vocab_size, (_BATCH, _TARGET), generator=generator)
    shape = (_BATCH, contract.num_kv_heads, _PAST, contract.head_dim)
    cross_shape = (_BATCH, contract.num_kv_heads, _SOURCE, contract.head_dim)
    past = tuple(torch.randn(shape, generator=generator).to(dtype) for _ in contract.cache_slots())
    cross = tuple(torch.randn(cross_shape, generator=generator).to(dtype) for _ in contract.cache_slots())
    return {
        "encoder": (source, mask),
        "prefill": (target, hidden, mask),
        "decode": (target[:, :1], mask, *past, *cross),
    }


def seq2seq_dynamic_shapes(graph: str, contract: GraphContract):
    batch, source = torch.export.Dim(BATCH), torch.export.Dim(ENCODER_SEQUENCE)
    encoder_side = {0: batch, 1: source}
    if graph == "encoder":
        return (encoder_side, encoder_side)
    if graph == "prefill":
        return ({0: batch, 1: torch.export.Dim(SEQUENCE)}, {0: batch, 1: source}, encoder_side)
    past = tuple({0: batch, 2: torch.export.Dim(PAST)} for _ in contract.cache_slots())
    cross = tuple({0: batch, 2: source} for _ in contract.cache_slots())
    return ({0: batch}, encoder_side, (*past, *cross))  # *caches: one tuple


class _DecoderScatterLayer(ScatterLayer):
    """A static self-attention layer that reports its write index as the tokens seen so far.

    T5 derives its relative position bias, and BART/Marian their positions, from
    get_seq_length(); the buffer's length N would shift them.
    """

    def get_seq_length(self):
        return self.write_indices[0]


def _static_self_cache(buffers, write_indices) -> Cache:
    return Cache(layers=[_DecoderScatterLayer(buffers[2 * i], buffers[2 * i + 1], write_indices) for i in range(len(buffers) // 2)])


def _decoder_mask(input_ids, write_indices, buffers, config):
    # the decoder side is never padded: query q of row b sees buffer positions <= write_indices[b] + q
    everything = torch.ones(input_ids.shape[0], buffers[0].shape[2], dtype=torch.int64)
    return static_mask(everything, write_indices, input_ids.shape[1], config, buffers[0].dtype)


class Seq2SeqStaticPrefill(_DecoderStep):
    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, write_indices, *buffers):
        # (B, S), (B, Se, H), (B, Se), (B,), buffers (B, Hkv, N, D) -> logits, buffers, cross (B, Hkv, Se, D)
        cache = EncoderDecoderCache(_static_self_cache(buffers, write_indices), DynamicCache(config=self.model.config))
        mask = _decoder_mask(input_ids, write_indices, buffers, self.model.config)
        logits, cache = self._run(input_ids, encoder_hidden_states, encoder_attention_mask, cache, mask)
        return (logits, *_flat(cache.self_attention_cache), *_flat(cache.cross_attention_cache))


class Seq2SeqStaticDecode(_DecoderStep):
    def forward(self, input_ids, encoder_attention_mask, write_indices, *caches):
        # (B, 1), (B, Se), (B,), buffers (B, Hkv, N, D) x 2L, cross (B, Hkv, Se, D) x 2L -> logits, buffers
        half = len(caches) // 2
        buffers = caches[:half]
        cache = EncoderDecoderCache(_static_self_cache(buffers, write_indices), _filled(caches[half:]))
        mask = _decoder_mask(input_ids, write_indices, buffers, self.model.config)
        logits, cache = self._run(input_ids, None, encoder_attention_mask, cache, mask)
        return (logits, *_flat(cache.self_attention_cache))


def seq2seq_static_steps(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {"encoder": EncoderStep(model), "prefill": Seq2SeqStaticPrefill(model), "decode": Seq2SeqStaticDecode(model)}


def seq2seq_static_examples(model: torch.nn.Module, contract: GraphContract) -> dict[str, tuple]:
    dynamic = seq2seq_examples(model, contract)
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(4)
    shape = (_BATCH, contract.num_kv_heads, contract.max_length, contract.head_dim)  # (B, Hkv, N, D)
    buffers = tuple(torch.randn(shape, generator=generator).to(dtype) for _ in contract.cache_slots())
    target, hidden, mask = dynamic["prefill"]
    cross = dynamic["decode"][2 + 2 * contract.num_layers:]
    write = torch.full((_BATCH,), _PAST, dtype=torch.int64)
    return {
        "encoder": dynamic["encoder"],
        "prefill": (target, hidden, mask, write, *buffers),
        "decode": (target[:, :1], mask, write, *buffers, *cross),
    }


def seq2seq_static_dynamic_shapes(graph: str, contract: GraphContract):
    batch, source = torch.export.Dim(BATCH), torch.export.Dim(ENCODER_SEQUENCE)
    encoder_side = {0: batch, 1: source}
    if graph == "encoder":
        return (encoder_side, encoder_side)
    buffers = tuple({0: batch} for _ in contract.cache_slots())
    if graph == "prefill":
        return ({0: batch, 1: torch.export.Dim(SEQUENCE)}, {0: batch, 1: source}, encoder_side, {0: batch}, buffers)
    cross = tuple({0: batch, 2: source} for _ in contract.cache_slots())
    return ({0: batch}, encoder_side, {0: batch}, (*buffers, *cross))
