"""The graph contract: every input/output name, dtype and symbolic shape of the exported graphs.

Export, runtime and tests all ask this object; no other module spells a tensor name.
Shapes use the letters B (batch), S (prompt length), P (past length), Hkv (KV heads),
D (head dim), V (vocab), written as trailing comments `# (B, Hkv, S, D)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

Dim = Union[int, str]

# Symbolic dimension names, as written into the graphs and the manifest.
BATCH = "batch"
SEQUENCE = "sequence"
PAST = "past_sequence"
PAST_PLUS_ONE = "past_sequence+1"
NEW = "new_sequence"
PAST_PLUS_NEW = "past_sequence+new_sequence"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
WRITE_INDICES = "write_indices"  # static cache only: (B,) int64, where each row's new tokens land
ENCODER_HIDDEN = "encoder_hidden_states"  # encoder-decoder only
ENCODER_MASK = "encoder_attention_mask"
ENCODER_SEQUENCE = "encoder_sequence"
VERIFY = "verify"  # the graph speculative decoding checks drafted tokens with (graphs/README.md section 4.2)
KV_KINDS = ("key", "value")

DTYPES = ("float32", "float16")
CACHE_MODES = ("dynamic", "static")
KINDS = ("decoder", "encoder-decoder")
MIN_STATIC_LENGTH = 16  # export validation writes 13 tokens
# Upper bounds far above any real model: a manifest beyond them is corrupt or hostile (it would
# otherwise make a reader build millions of tensor names or allocate a cache larger than memory).
LIMITS = {"num_layers": 4096, "num_kv_heads": 4096, "head_dim": 65536, "vocab_size": 1 << 24, "max_length": 1 << 24,
          "hidden_size": 1 << 20}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "int64", "float32", "float16"
    shape: tuple[Dim, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))


@dataclass(frozen=True)
class GraphContract:
    """What the prefill and decode graphs of one decoder-only export look like."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str = "float32"
    all_logits: bool = False  # prefill returns logits for every position, not only the last
    cache: str = "dynamic"  # "static": fixed (B, Hkv, max_length, D) buffers, written in place
    max_length: int | None = None  # static only: N, the buffers' length (prompt + new tokens <= N)
    kind: str = "decoder"  # "encoder-decoder": encoder.onnx too, and cross-attention K/V computed once
    hidden_size: int | None = None  # encoder-decoder only: H of encoder_hidden_states (B, Se, H)
    # Dv, when the cached values are narrower or wider than the keys (latent attention caches a
    # compressed latent as "key" and the rotary part as "value"); None: Dv = D
    value_head_dim: int | None = None
    # decoder-only static cache: per layer, the ring length W of a sliding-window layer whose window is
    # shorter than N (its buffers are (B, Hkv, W, D); position p lives at slot p mod W), else None
    ring_windows: tuple[int | None, ...] | None = None
    # decoder-only: verify.onnx too, extend with logits at every new position (speculative decoding checks drafted
    # tokens in one call); not with ring buffers, which cannot roll a rejected draft back
    verify: bool = False

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= LIMITS[field]:
                raise ValueError(f"GraphContract.{field} must be an integer in [1, {LIMITS[field]}], got {value!r}")
        if self.value_head_dim is not None and (not isinstance(self.value_head_dim, int) or isinstance(self.value_head_dim, bool)
                                                or not 0 < self.value_head_dim <= LIMITS["head_dim"]):
            raise ValueError(f"GraphContract.value_head_dim must be null or an integer in [1, {LIMITS['head_dim']}], got {self.value_head_dim!r}")
        for field in ("all_logits", "verify"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"GraphContract.{field} must be true or false, got {getattr(self, field)!r}")
        if self.verify and (self.kind != "decoder" or self.ring_windows):
            raise ValueError("GraphContract.verify is only for a decoder-only export without ring buffers")
        if self.dtype not in DTYPES:
            raise ValueError(f"GraphContract.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"GraphContract.cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.cache == "static":
            if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or not MIN_STATIC_LENGTH <= self.max_length <= LIMITS["max_length"]:
                raise ValueError(f"GraphContract.max_length must be an integer in [{MIN_STATIC_LENGTH}, {LIMITS['max_length']}] "
                                 f"for a static cache, got {self.max_length!r}")
        elif self.max_length is not None:
            raise ValueError(f"GraphContract.max_length is only for a static cache, got {self.max_length!r} with cache {self.cache!r}")
        if self.ring_windows is not None:
            self._check_ring_windows()
        if self.kind not in KINDS:
            raise ValueError(f"GraphContract.kind must be one of {KINDS}, got {self.kind!r}")
        if self.seq2seq:
            if not isinstance(self.hidden_size, int) or isinstance(self.hidden_size, bool) or not 0 < self.hidden_size <= LIMITS["hidden_size"]:
                raise ValueError(f"GraphContract.hidden_size must be an integer in [1, {LIMITS['hidden_size']}] for an encoder-decoder, "
                                 f"got {self.hidden_size!r}")
            if self.all_logits:
                raise ValueError("GraphContract: an encoder-decoder export does not support all_logits yet")
        elif self.hidden_size is not None:
            raise ValueError(f"GraphContract.hidden_size is only for an encoder-decoder, got {self.hidden_size!r}")

    def _check_ring_windows(self) -> None:
        windows = self.ring_windows
        if not self.static or self.kind != "decoder":
            raise ValueError("GraphContract.ring_windows is only for a decoder-only static cache")
        if not isinstance(windows, (tuple, list)) or len(windows) != self.num_layers or not all(
                w is None or (isinstance(w, int) and not isinstance(w, bool) and 0 < w < self.max_length) for w in windows):
            raise ValueError(f"GraphContract.ring_windows must give each of the {self.num_layers} layers null or an integer "
                             f"in [1, {self.max_length - 1}], got {windows!r}")
        object.__setattr__(self, "ring_windows", tuple(windows))  # JSON gives a list

    def ring(self, layer: int) -> int | None:
        """Static cache: W when the layer's buffers are a ring of W positions, else None."""
        return self.ring_windows[layer] if self.ring_windows else None

    def buffer_length(self, layer: int) -> int:
        """Static cache: positions a layer's buffers hold (W for a ring, else N)."""
        return self.ring(layer) or self.max_length

    @property
    def seq2seq(self) -> bool:
        return self.kind == "encoder-decoder"

    @property
    def static(self) -> bool:
        return self.cache == "static"

    # -- names -------------------------------------------------------------------------------

    @staticmethod
    def past_name(layer: int, kind: str) -> str:
        return f"past.{layer}.{kind}"

    @staticmethod
    def present_name(layer: int, kind: str) -> str:
        return f"present.{layer}.{kind}"

    def kv_dim(self, kind: str) -> int:
        """D of the cached keys ("key") or values ("value")."""
        return self.value_head_dim if kind == "value" and self.value_head_dim is not None else self.head_dim

    def cache_shape(self, kind: str, batch: Dim, length: Dim) -> tuple[Dim, ...]:
        return (batch, self.num_kv_heads, length, self.kv_dim(kind))  # (B, Hkv, S, D)

    def cache_slots(self) -> Iterator[tuple[int, str]]:
        """(layer, "key"|"value") in graph order: layer 0 key, layer 0 value, layer 1 key, ..."""
        for layer in range(self.num_layers):
            for kind in KV_KINDS:
                yield layer, kind

    @staticmethod
    def cross_name(layer: int, kind: str) -> str:
        return f"cross.{layer}.{kind}"

    def cross_names(self) -> list[str]:
        """Encoder-decoder: cross-attention K/V, outputs of prefill and inputs of decode (never outputs of decode)."""
        return [self.cross_name(layer, kind) for layer, kind in self.cache_slots()]

    def past_names(self) -> list[str]:
        return [self.past_name(layer, kind) for layer, kind in self.cache_slots()]

    def present_names(self) -> list[str]:
        return [self.present_name(layer, kind) for layer, kind in self.cache_slots()]

    # -- graphs ------------------------------------------------------------------------------

    def _token_inputs(self, length: Dim, mask_length: Dim) -> list[TensorSpec]:
        return [
            TensorSpec(INPUT_IDS, "int64", (BATCH, length)),
            TensorSpec(ATTENTION_MASK, "int64", (BATCH, mask_length)),
            TensorSpec(POSITION_IDS, "int64", (BATCH, length)),
        ]

    def _cache(self, names: list[str], length: Dim) -> list[TensorSpec]:
        # names: one per cache slot, in cache_slots() order -> (B, Hkv, S, D) each (Dv for values)
        return [TensorSpec(name, self.dtype, self.cache_shape(kind, BATCH, length)) for name, (_, kind) in zip(names, self.cache_slots())]

    def _buffers(self, names: list[str]) -> list[TensorSpec]:
        # static cache: (B, Hkv, N, D) each, (B, Hkv, W, D) for a ring layer
        return [TensorSpec(name, self.dtype, self.cache_shape(kind, BATCH, self.buffer_length(layer)))
                for name, (layer, kind) in zip(names, self.cache_slots())]

    def buffer_bytes_per_row(self) -> int:
        """Static cache: bytes of one row's buffers over all layers (rings count W positions)."""
        itemsize = 4 if self.dtype == "float32" else 2
        return sum(self.num_kv_heads * self.buffer_length(layer) * self.kv_dim(kind) * itemsize for layer, kind in self.cache_slots())

    def prefill_inputs(self) -> list[TensorSpec]:
        return self._token_inputs(SEQUENCE, SEQUENCE)

    def prefill_outputs(self) -> list[TensorSpec]:
        positions = SEQUENCE if self.all_logits else 1
        logits = TensorSpec(LOGITS, self.dtype, (BATCH, positions, self.vocab_size))
        return [logits, *self._cache(self.present_names(), SEQUENCE)]

    def decode_inputs(self) -> list[TensorSpec]:
        return [*self._token_inputs(1, PAST_PLUS_ONE), *self._cache(self.past_names(), PAST)]

    def decode_outputs(self) -> list[TensorSpec]:
        logits = TensorSpec(LOGITS, self.dtype, (BATCH, 1, self.vocab_size))
        return [logits, *self._cache(self.present_names(), PAST_PLUS_ONE)]

    def extend_inputs(self) -> list[TensorSpec]:
        return [*self._token_inputs(NEW, PAST_PLUS_NEW), *self._cache(self.past_names(), PAST)]

    def extend_outputs(self, every_position: bool = False) -> list[TensorSpec]:
        logits = TensorSpec(LOGITS, self.dtype, (BATCH, NEW if every_position else 1, self.vocab_size))
        return [logits, *self._cache(self.present_names(), PAST_PLUS_NEW)]

    # Static cache: every graph reads and writes whole (B, Hkv, N, D) buffers. prefill takes Q
    # tokens written at write_indices (0 for a prompt, P to extend a conversation); decode takes 1.
    def _static_graph(self, length: Dim, logits_length: Dim) -> tuple[list[TensorSpec], list[TensorSpec]]:
        inputs = [*self._token_inputs(length, self.max_length), TensorSpec(WRITE_INDICES, "int64", (BATCH,)),
                  *self._buffers(self.past_names())]
        logits = TensorSpec(LOGITS, self.dtype, (BATCH, logits_length, self.vocab_size))
        return inputs, [logits, *self._buffers(self.present_names())]

    def _seq2seq_graphs(self) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
        source = [TensorSpec(INPUT_IDS, "int64", (BATCH, ENCODER_SEQUENCE)), TensorSpec(ATTENTION_MASK, "int64", (BATCH, ENCODER_SEQUENCE))]
        hidden = TensorSpec(ENCODER_HIDDEN, self.dtype, (BATCH, ENCODER_SEQUENCE, self.hidden_size))
        encoder_mask = TensorSpec(ENCODER_MASK, "int64", (BATCH, ENCODER_SEQUENCE))
        logits = TensorSpec(LOGITS, self.dtype, (BATCH, 1, self.vocab_size))
        cross = self._cache(self.cross_names(), ENCODER_SEQUENCE)
        if self.static:  # the self-attention cache is (B, Hkv, N, D) buffers written at write_indices
            write = TensorSpec(WRITE_INDICES, "int64", (BATCH,))
            past, present = self._buffers(self.past_names()), self._buffers(self.present_names())
            return {
                "encoder": (source, [hidden]),
                "prefill": ([TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)), hidden, encoder_mask, write, *past], [logits, *present, *cross]),
                "decode": ([TensorSpec(INPUT_IDS, "int64", (BATCH, 1)), encoder_mask, write, *past, *cross], [logits, *present]),
            }
        return {
            "encoder": (source, [hidden]),
            "prefill": ([TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)), hidden, encoder_mask],
                        [logits, *self._cache(self.present_names(), SEQUENCE), *cross]),
            "decode": ([TensorSpec(INPUT_IDS, "int64", (BATCH, 1)), encoder_mask, *self._cache(self.past_names(), PAST), *cross],
                       [logits, *self._cache(self.present_names(), PAST_PLUS_ONE)]),
        }

    def graphs(self) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
        """Graph name -> (inputs, outputs), in the order the graphs declare them."""
        if self.seq2seq:
            return self._seq2seq_graphs()
        if self.static:
            graphs = {
                "prefill": self._static_graph(SEQUENCE, SEQUENCE if self.all_logits else 1),
                "decode": self._static_graph(1, 1),
            }
        else:
            graphs = {
                "prefill": (self.prefill_inputs(), self.prefill_outputs()),
                "decode": (self.decode_inputs(), self.decode_outputs()),
                "extend": (self.extend_inputs(), self.extend_outputs()),
            }
        return {**graphs, VERIFY: self.verify_io()} if self.verify else graphs

    def verify_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The verify graph's I/O: extend's (static: prefill's at write index P) with logits (B, Q, V).

        Also what a runtime derives in memory from an export written before verify.onnx existed."""
        if self.static:
            return self._static_graph(SEQUENCE, SEQUENCE)
        return self.extend_inputs(), self.extend_outputs(every_position=True)

    def graph_io(self, graph: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """One graph's I/O; "verify" also for an export without verify.onnx (derived, see verify_io)."""
        return self.verify_io() if graph == VERIFY else self.graphs()[graph]

    def cache_bytes_per_token(self) -> int:
        itemsize = 4 if self.dtype == "float32" else 2
        return self.num_layers * self.num_kv_heads * (self.kv_dim("key") + self.kv_dim("value")) * itemsize


def io_mismatches(graph: str, expected: list[TensorSpec], actual: list[TensorSpec]) -> list[str]:
    """Reasons why `actual` (read from a graph file) differs from the contract; empty when equal.

    Symbolic dims match any symbolic name or size; fixed dims must match exactly.
    """
    reasons = []
    want_names = [spec.name for spec in expected]
    got_names = [spec.name for spec in actual]
    if want_names != got_names:
        missing = [n for n in want_names if n not in got_names]
        extra = [n for n in got_names if n not in want_names]
        return [f"{graph}: tensor names differ (missing {missing}, unexpected {extra})"]
    for want, got in zip(expected, actual):
        if want.dtype != got.dtype:
            reasons.append(f"{graph}: {want.name} has dtype {got.dtype}, expected {want.dtype}")
        if len(want.shape) != len(got.shape) or any(
            isinstance(w, int) and w != g for w, g in zip(want.shape, got.shape)
        ):
            reasons.append(f"{graph}: {want.name} has shape {format_shape(got.shape)}, expected {format_shape(want.shape)}")
    return reasons


def format_shape(shape: tuple[Dim, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
