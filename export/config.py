"""The one adapter from a Hugging Face config to kvgraph's model dimensions.

This is the only module allowed `getattr(config, ..., default)` fallbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import DynamicCache

from optimum.utils import NormalizedConfigManager

from kvgraph.graphs import KvgraphError
from kvgraph.export.hf_cache import cache_keyword, returned_cache


@dataclass(frozen=True)
class ModelDims:
    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    windows: tuple[int | None, ...] = ()  # per decoder layer: its sliding window W, or None (attends to everything)
    encoder_decoder: bool = False  # then the layer and head counts are the decoder's
    hidden_size: int | None = None
    decoder_start_token_id: int | None = None
    value_head_dim: int | None = None  # the cached values' D when it differs from the keys' (latent attention)

    @classmethod
    def from_hf(cls, config) -> ModelDims:
        try:
            if getattr(config, "is_encoder_decoder", False):
                return cls._encoder_decoder(config)
            return cls._decoder(text_config(config), config.model_type)
        except KvgraphError:
            raise
        except Exception as exc:  # a config that raises on plain attribute reads (per-layer attributes, ...)
            raise KvgraphError(f"model type {config.model_type!r}: cannot read its dimensions from the config: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]) from exc

    @classmethod
    def _decoder(cls, config, family: str) -> ModelDims:
        normalized = _normalized(config)
        num_layers = _first(normalized, config, "num_layers", "num_hidden_layers", "n_layer")
        num_heads = _first(normalized, config, "num_attention_heads", "n_head")
        hidden = _first(normalized, config, "hidden_size", "n_embd", "d_model")
        vocab = _first(normalized, config, "vocab_size")
        if num_heads is None:
            raise KvgraphError(f"model type {family!r}: its config names no attention heads (a recurrent or state-space model "
                               "has no key/value cache for the graphs to carry)")
        if None in (num_layers, hidden, vocab):
            raise KvgraphError(f"model type {family!r}: cannot read layer count, hidden size or vocab from its config")
        kv_heads = _first(normalized, config, "num_key_value_heads", default=num_heads)
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        windows, _ = attention_layout(config, num_layers)
        return cls(family, num_layers, num_heads, kv_heads, head_dim, vocab, max_positions, windows)

    @classmethod
    def from_model(cls, model) -> ModelDims:
        """The config's dims, with the K/V layout (layers, Hkv, D) the model really caches (probe_cache).

        Configs spell the KV layout many ways (num_key_value_heads, multi_query, num_kv_heads with
        new_decoder_architecture, per-layer overrides); the cache of a one-token forward pass is the
        one source every architecture agrees with.
        """
        dims = cls.from_hf(model.config)
        if dims.encoder_decoder:
            return dims
        layers, kv_heads, key_dim, value_dim = probe_cache(model)
        return replace(dims, num_layers=layers, num_kv_heads=kv_heads, head_dim=key_dim,
                       value_head_dim=value_dim if value_dim != key_dim else None)

    @classmethod
    def _encoder_decoder(cls, config) -> ModelDims:
        family, top = config.model_type, config
        config = text_config(config, decoder=True)
        normalized = _normalized(config)
        layers = _first(normalized, config, "decoder_num_layers", "num_decoder_layers", "decoder_layers", "num_layers", "num_hidden_layers")
        heads = _first(normalized, config, "decoder_num_attention_heads", "decoder_attention_heads", "num_heads", "num_attention_heads")
        hidden = _first(normalized, config, "hidden_size", "d_model")
        vocab = _first(normalized, config, "vocab_size")
        if None in (layers, heads, hidden, vocab):
            raise KvgraphError(f"model type {family!r}: cannot read decoder layers, heads, hidden size or vocab from its config")
        kv_heads = _first(normalized, config, "num_key_value_heads", default=heads)  # T5Gemma's decoder groups its K/V heads
        head_dim = getattr(config, "d_kv", None) or getattr(config, "head_dim", None) or hidden // heads
        max_positions = getattr(config, "max_position_embeddings", None)  # None for relative positions (T5)
        start = getattr(top, "decoder_start_token_id", None)
        return cls(family, layers, heads, kv_heads, head_dim, vocab, max_positions, (None,) * layers, encoder_decoder=True,
                   hidden_size=hidden, decoder_start_token_id=start)


def text_config(config, decoder: bool = False):
    """A composite (multimodal) config's text model config; any other config itself (transformers'
    get_text_config also remaps plain encoder-decoder configs, which would mislead the reads here)."""
    if not getattr(config, "sub_configs", None):
        return config
    return config.get_text_config(decoder=True) if decoder else config.get_text_config()


WINDOWED_TYPES = ("sliding_attention",)
GLOBAL_TYPES = ("full_attention",)


def attention_layout(config, num_layers: int) -> tuple[tuple[int | None, ...], bool]:
    """Per-layer sliding windows, and whether the model takes one mask per layer type.

    transformers' convention: a config with `layer_types` names each layer's attention
    ("sliding_attention" layers attend to the last `sliding_window` positions) and its model takes
    a dict of masks by type; a config without it applies `sliding_window` (when set) to every layer.
    """
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) is not False else None
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    types = getattr(config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or not types:
        return (window,) * num_layers, False
    other = sorted({t for t in types if t not in WINDOWED_TYPES + GLOBAL_TYPES})
    if other:
        raise KvgraphError(f"model type {config.model_type!r} has {', '.join(other)} layers; kvgraph's graphs carry "
                           f"key/value caches of {' and '.join(WINDOWED_TYPES + GLOBAL_TYPES)} layers only")
    return tuple(window if t in WINDOWED_TYPES else None for t in types[:num_layers]), True


def _normalized(config):
    try:
        return NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
    except (KeyError, ValueError, NotImplementedError):
        return None  # not in optimum's table: read the config's own attributes


def _first(normalized, config, *names: str, default=None):
    for source in (normalized, config):
        if source is None:
            continue
        for name in names:
            try:
                value = getattr(source, name)
            except (AttributeError, KeyError):
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return default


def probe_cache(model) -> tuple[int, int, int, int]:
    """(layers, Hkv, Dk, Dv) of the K/V a one-token forward pass caches; refuses layouts the contract cannot carry."""
    family = model.config.model_type
    ids = torch.ones(1, 1, dtype=torch.long)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{cache_keyword(model): DynamicCache()})
    except Exception as exc:  # any failure of the model's own forward: say which model and what
        raise KvgraphError(f"model type {family!r}: a one-token forward pass with a cache failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}"[:400]) from exc
    cache = returned_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise KvgraphError(f"model type {family!r} returns no key/value cache from a forward pass with one (transformers gives "
                           "it none: it recomputes every step, or its state is recurrent), so there is nothing for the contract to carry")
    shapes = [_layer_shape(layer) for layer in layers]
    if any(shape is None for shape in shapes):
        raise KvgraphError(f"model type {family!r} caches something other than keys and values in some layers "
                           f"({sorted({type(layer).__name__ for layer in layers})}): recurrent or state-space state is not in the contract")
    if len(set(shapes)) != 1:
        raise KvgraphError(f"model type {family!r}: layers cache keys/values of different shapes (Hkv, Dk, Dv) "
                           f"{sorted(set(shapes))}; the contract has one (B, Hkv, S, D) layout")
    kv_heads, key_dim, value_dim = shapes[0]
    return len(layers), kv_heads, key_dim, value_dim


def _layer_shape(layer) -> tuple[int, int, int] | None:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4 or values.dim() != 4:
        return None
    return keys.shape[1], keys.shape[3], values.shape[3]  # (B, Hkv, S, D)
