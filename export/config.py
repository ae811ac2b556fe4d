"""The one adapter from a Hugging Face config to kvgraph's model dimensions.

This is the only module allowed `getattr(config, ..., default)` fallbacks.
"""

from __future__ import annotations

from dataclasses import dataclass

from optimum.utils import NormalizedConfigManager

from ..graphs import KvgraphError


@dataclass(frozen=True)
class ModelDims:
    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    sliding_window: int | None = None  # attention window of (some) layers, when the config enables one
    encoder_decoder: bool = False  # then the layer and head counts are the decoder's
    hidden_size: int | None = None
    decoder_start_token_id: int | None = None

    @classmethod
    def from_hf(cls, config) -> ModelDims:
        if getattr(config, "is_encoder_decoder", False):
            return cls._encoder_decoder(config)
        family = config.model_type
        normalized = _normalized(config)
        num_layers = _first(normalized, config, "num_layers", "num_hidden_layers", "n_layer")
        num_heads = _first(normalized, config, "num_attention_heads", "n_head")
        hidden = _first(normalized, config, "hidden_size", "n_embd", "d_model")
        kv_heads = _first(normalized, config, "num_key_value_heads", default=num_heads)
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        vocab = _first(normalized, config, "vocab_size")
        if None in (num_layers, num_heads, hidden, vocab):
            raise KvgraphError(f"model type {family!r}: cannot read layer count, heads, hidden size or vocab from its config")
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
        return cls(family, num_layers, num_heads, kv_heads, head_dim, vocab, max_positions, window)


    @classmethod
    def _encoder_decoder(cls, config) -> ModelDims:
        family = config.model_type
        normalized = _normalized(config)
        layers = _first(normalized, config, "decoder_num_layers", "num_decoder_layers", "decoder_layers", "num_layers")
        heads = _first(normalized, config, "decoder_num_attention_heads", "decoder_attention_heads", "num_heads")
        hidden = _first(normalized, config, "hidden_size", "d_model")
        vocab = _first(normalized, config, "vocab_size")
        if None in (layers, heads, hidden, vocab):
            raise KvgraphError(f"model type {family!r}: cannot read decoder layers, heads, hidden size or vocab from its config")
        head_dim = getattr(config, "d_kv", None) or hidden // heads
        max_positions = getattr(config, "max_position_embeddings", None)  # None for relative positions (T5)
        start = getattr(config, "decoder_start_token_id", None)
        return cls(family, layers, heads, heads, head_dim, vocab, max_positions, None, True, hidden, start)


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
