"""How a step's feeds are built and its outputs taken back: one adapter per cache mode and graph kind.

Numpy only, no onnxruntime. Validation, the oracle's ONNX side, golden vectors, benchmarks and the
runtime all ask the adapter of their contract; none of them spells the mode rules again.

    steps = step_adapter(contract)
    graph = steps.graph("extend")                                  # static: "prefill" at write index P
    host = steps.host_feeds("decode", tokens, mask, written)       # int64: ids, masks, positions, write indices
    feeds = {**host, **steps.cache_feeds(past, batch), **other}    # past: the valid prefix (B, Hkv, P, D) of each
    feeds, outputs = steps.run(run, "decode", tokens, mask, past)  # all of it over any (graph, feeds) -> outputs runner;
                                                                   # presents come back cut to (B, Hkv, P + Q, D)

Roles: "prefill" (a prompt, nothing cached), "decode" (one token after a past), "extend" (Q tokens
after a past), "verify" (extend with logits at every new position: speculative decoding). `mask` is the decoder's attention mask so far, new tokens included (B, P + Q); for an
encoder-decoder it is the source's mask (B, Se), fed unchanged every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvgraph.graphs.contract import (ATTENTION_MASK, ENCODER_MASK, INPUT_IDS, LOGITS, MIN_STATIC_LENGTH, POSITION_IDS, WRITE_INDICES,
                                     GraphContract)
from kvgraph.graphs.conventions import extend_position_ids, left_pad, right_pad
from kvgraph.graphs.errors import KvgraphError

ROLES = ("prefill", "decode", "extend", "verify")  # verify: extend with logits at every new position
CUDA_GRAPH_NEEDS = "cuda_graph needs provider 'cuda' and a static-cache export (kvgraph export --cache static)"


class DynamicCacheMode:
    """K/V grow by Q positions a step: present (B, Hkv, P + Q, D) is the next step's past."""

    aliased = False  # present is a new tensor
    one_graph = "extend"  # serves every step: prefill is extend after an empty past, decode is extend of one token

    def graph(self, role: str) -> str:
        return role

    def mask_feed(self, contract: GraphContract, mask: np.ndarray) -> np.ndarray:
        return mask  # (B, P + Q)

    def write_feeds(self, batch: int, written: int) -> dict[str, np.ndarray]:
        return {}

    def cache_feeds(self, contract: GraphContract, past: list[np.ndarray], batch: int) -> dict[str, np.ndarray]:
        return dict(zip(contract.past_names(), past))

    def visible(self, contract: GraphContract, layer: int, present: np.ndarray, length: int) -> np.ndarray:
        return present

    def room(self, contract: GraphContract, written: int, new: int) -> str | None:
        return None

    def cache_positions(self, contract: GraphContract, positions: int) -> tuple[int, int]:
        """(positions held per row, copies held while a step runs): past and present both."""
        return positions, 2

    def row_bytes(self, contract: GraphContract, positions: int) -> int:
        """Self-attention cache bytes of one row at its longest, while a step runs."""
        held, copies = self.cache_positions(contract, positions)
        return held * copies * contract.cache_bytes_per_token()

    def capacity(self, contract: GraphContract) -> int | None:
        return None

    # -- what the mode can do, asked through StepAdapter: None, or the reason it cannot --

    def describe(self, contract: GraphContract) -> str:
        return "dynamic cache"

    def option_problem(self, max_length: int | None) -> str | None:
        """The export options this mode takes: --max-length is the static cache's alone."""
        return None if max_length is None else "--max-length sets the static cache's size; it needs --cache static"

    def rings(self, windows: tuple[int | None, ...], max_length: int | None) -> tuple[int | None, ...] | None:
        return None  # a dynamic cache keeps every position; the mask hides what a window does not see

    def budget_note(self, contract: GraphContract) -> str:
        return ", x 2 while a step holds past and present"

    def rollback(self, contract: GraphContract) -> str | None:
        return None  # cut to any length

    def batching(self) -> str | None:
        return ("a dynamic cache grows per row and cannot share a step; continuous batching takes static-cache exports "
                "(kvgraph export --cache static --max-length N)")

    def cuda_graph(self) -> str | None:
        return CUDA_GRAPH_NEEDS  # buffers that grow every step cannot be captured


class StaticCacheMode:
    """Fixed (B, Hkv, N, D) buffers; a step writes its Q positions at write_indices, in place."""

    aliased = True  # past and present are one buffer, bound as both
    one_graph = "prefill"  # serves every step: Q tokens written at write_indices P (decode: Q = 1)

    def graph(self, role: str) -> str:
        return "prefill" if role == "extend" else role  # extend = prefill at write index P

    def mask_feed(self, contract: GraphContract, mask: np.ndarray) -> np.ndarray:
        padded = np.zeros((mask.shape[0], contract.max_length), dtype=np.int64)  # (B, N): unwritten positions are 0
        padded[:, : mask.shape[1]] = mask
        return padded

    def write_feeds(self, batch: int, written: int) -> dict[str, np.ndarray]:
        return {WRITE_INDICES: np.full(batch, written, dtype=np.int64)}  # (B,)

    def row_feeds(self, contract: GraphContract, tokens: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """A decode step whose rows stand at their own lengths (continuous batching), each row unpadded from
        position 0: tokens (B, 1), lengths (B,) positions written -> the graph's int64 inputs."""
        # row b's new token is written at position lengths[b] and attends to positions 0 .. lengths[b]
        mask = (np.arange(contract.max_length)[None, :] <= lengths[:, None]).astype(np.int64)  # (B, N)
        positions = lengths.astype(np.int64)
        return {INPUT_IDS: tokens.astype(np.int64), ATTENTION_MASK: mask, POSITION_IDS: positions[:, None], WRITE_INDICES: positions}

    def buffer_shapes(self, contract: GraphContract, batch: int) -> list[tuple[int, int, int, int]]:
        """One per cache slot: (B, Hkv, N, D) (Dv for values; W positions for a ring)."""
        return [contract.cache_shape(kind, batch, contract.buffer_length(layer)) for layer, kind in contract.cache_slots()]

    def cache_feeds(self, contract: GraphContract, past: list[np.ndarray], batch: int) -> dict[str, np.ndarray]:
        # zeros, not uninitialised memory: masked positions are multiplied by zero weights, a NaN there would spread
        buffers = [np.zeros(shape, dtype=contract.dtype) for shape in self.buffer_shapes(contract, batch)]
        for buffer, tensor, (layer, _) in zip(buffers, past, contract.cache_slots()):
            positions = _held(contract, layer, tensor.shape[2])
            buffer[:, :, positions % buffer.shape[2]] = tensor[:, :, positions]
        return dict(zip(contract.past_names(), buffers))

    def visible(self, contract: GraphContract, layer: int, present: np.ndarray, length: int) -> np.ndarray:
        """The first `length` positions (B, Hkv, length, D); a ring holds only the last W: earlier ones are 0."""
        out = np.zeros((*present.shape[:2], length, present.shape[3]), dtype=present.dtype)
        positions = _held(contract, layer, length)
        out[:, :, positions] = present[:, :, positions % present.shape[2]]
        return out

    def room(self, contract: GraphContract, written: int, new: int) -> str | None:
        if written + new <= contract.max_length:
            return None
        return f"the static cache holds {contract.max_length} positions; {written} are used and {new} more do not fit"

    def cache_positions(self, contract: GraphContract, positions: int) -> tuple[int, int]:
        return contract.max_length, 1

    def row_bytes(self, contract: GraphContract, positions: int) -> int:
        return contract.buffer_bytes_per_row()  # N per layer, W for a ring

    def capacity(self, contract: GraphContract) -> int | None:
        return contract.max_length

    def describe(self, contract: GraphContract) -> str:
        return f"static cache of {contract.max_length} positions"

    def option_problem(self, max_length: int | None) -> str | None:
        if max_length is None:
            return "--cache static needs --max-length N (prompt + new tokens the buffers hold)"
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < MIN_STATIC_LENGTH:
            return f"--max-length must be an integer >= {MIN_STATIC_LENGTH}, got {max_length!r}"
        return None

    def rings(self, windows: tuple[int | None, ...], max_length: int | None) -> tuple[int | None, ...] | None:
        """Per layer, the ring length W of a windowed layer whose window is shorter than the buffers' N, else None."""
        rings = tuple(w if w is not None and w < max_length else None for w in windows)
        return rings if any(rings) else None

    def budget_note(self, contract: GraphContract) -> str:
        rings = [w for w in contract.ring_windows or () if w]
        return f", but {len(rings)} windowed layers hold rings of {max(rings)}" if rings else ""

    def rollback(self, contract: GraphContract) -> str | None:
        if not contract.ring_windows:
            return None  # the write index moves back
        return "the rings of this static export's windowed layers cannot roll back (they overwrite old positions); use its dynamic-cache export"

    def batching(self) -> str | None:
        return None

    def cuda_graph(self) -> str | None:
        return None


def _held(contract: GraphContract, layer: int, length: int) -> np.ndarray:
    """Positions of the first `length` a layer's buffers hold: all of them, or a ring's last W."""
    return np.arange(max(0, length - (contract.ring(layer) or length)), length)


@dataclass(frozen=True)
class Positions:
    """What a request occupies: the decoder's cache positions, and the source's (encoder-decoder only)."""

    decoder: int
    decoder_text: str  # how `decoder` is made up, for error messages
    source: int = 0
    source_text: str = ""


class DecoderFeeds:
    """Decoder-only: tokens, the attention mask so far and position ids from it (left padding)."""

    one_graph = True  # every step has the same inputs: one graph can run them all

    def host(self, contract: GraphContract, cache, tokens: np.ndarray, mask: np.ndarray, written: int) -> dict[str, np.ndarray]:
        # tokens (B, Q), mask (B, P + Q) -> positions (B, Q): real tokens before each new one
        if mask.shape != (tokens.shape[0], written + tokens.shape[1]):
            raise ValueError(f"a step of {tokens.shape[1]} new tokens after {written} cached positions expects attention_mask "
                             f"of shape ({tokens.shape[0]}, {written + tokens.shape[1]}), got {mask.shape}")
        return {INPUT_IDS: tokens, ATTENTION_MASK: cache.mask_feed(contract, mask),
                POSITION_IDS: extend_position_ids(mask, tokens.shape[1])}

    def kept_outputs(self, contract: GraphContract, graph: str) -> list[str]:
        return []

    def positions(self, prompt: int, new: int) -> Positions:
        return Positions(prompt + new, f"prompt ({prompt} tokens) + max_new_tokens ({new}) = {prompt + new}", 0, "")

    def pad(self, rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        return left_pad(rows, pad_id)

    def decoder_prefix(self, prompt: list[int], start_token: int | None) -> list[int]:
        """The decoder's sequence before the first new token: the prompt itself."""
        return list(prompt)

    def refusal(self, capability: str) -> str | None:
        return None  # a decoder-only export can chat, speculate, batch and be quantized


class Seq2SeqFeeds:
    """Encoder-decoder: decoder tokens and the source mask; prefill emits the cross K/V once."""

    one_graph = False  # prefill emits the cross K/V, decode reads them: two graphs

    def host(self, contract: GraphContract, cache, tokens: np.ndarray, mask: np.ndarray, written: int) -> dict[str, np.ndarray]:
        return {INPUT_IDS: tokens, ENCODER_MASK: mask}  # mask: the source's (B, Se)

    def kept_outputs(self, contract: GraphContract, graph: str) -> list[str]:
        return contract.cross_names() if graph == "prefill" else []

    def positions(self, prompt: int, new: int) -> Positions:
        # encoder and decoder each have their own positions: the source is the encoder's, the decoder starts from one token
        return Positions(1 + new, f"max_new_tokens ({new}) + the start token", prompt, f"the source ({prompt} tokens)")

    def pad(self, rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        return right_pad(rows, pad_id)  # the encoder sees the whole source; the decoder side is never padded

    def decoder_prefix(self, prompt: list[int], start_token: int | None) -> list[int]:
        """The decoder's sequence before the first new token: the start token (the prompt is the encoder's)."""
        return [start_token]

    REFUSALS = {
        "chat": "this export is an encoder-decoder: it has no chat turns (it translates or rewrites a source)",
        "speculation": "speculative decoding takes decoder-only exports (this one is an encoder-decoder)",
        "batching": ("an encoder-decoder export carries cross K/V per source; continuous batching takes decoder-only "
                     "static-cache exports"),
    }

    def refusal(self, capability: str) -> str | None:
        return self.REFUSALS.get(capability)


CACHE_MODES = {"dynamic": DynamicCacheMode(), "static": StaticCacheMode()}
KINDS = {"decoder": DecoderFeeds(), "encoder-decoder": Seq2SeqFeeds()}

Runner = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]  # (graph, feeds) -> outputs by name


@dataclass(frozen=True)
class StepAdapter:
    """The contract's cache mode and graph kind, asked by every loop over the graphs."""

    contract: GraphContract
    cache: DynamicCacheMode | StaticCacheMode
    kind: DecoderFeeds | Seq2SeqFeeds

    def graph(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown step role {role!r}; one of {ROLES}")
        return self.cache.graph(role)

    def one_graph(self) -> str | None:
        """The graph that can run every step of this export (prefill, decode, extend), or None."""
        return self.cache.one_graph if self.kind.one_graph else None

    def host_feeds(self, role: str, tokens: np.ndarray, mask: np.ndarray, written: int) -> dict[str, np.ndarray]:
        """The graph's int64 inputs for Q = tokens.shape[1] new tokens after `written` cached positions."""
        reason = self.cache.room(self.contract, written, tokens.shape[1])
        if reason:
            raise KvgraphError(reason)
        feeds = self.kind.host(self.contract, self.cache, tokens, mask, written)
        return {**feeds, **self.cache.write_feeds(tokens.shape[0], written)}

    def cache_feeds(self, past: list[np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """past.* inputs from each cache tensor's valid prefix (B, Hkv, P, D); a prompt has none (static: zero buffers)."""
        return self.cache.cache_feeds(self.contract, past, batch)

    def device_outputs(self, graph: str) -> list[str]:
        """Outputs besides logits a runtime keeps on the device: new presents, and (seq2seq prefill) cross K/V."""
        presents = [] if self.cache.aliased or graph == "encoder" else self.contract.present_names()
        return [*presents, *self.kind.kept_outputs(self.contract, graph)]

    def run(self, run: Runner, role: str, tokens: np.ndarray, mask: np.ndarray, past: list[np.ndarray],
            other: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One numpy step: (every input fed, every output with presents cut to P + Q)."""
        written = past[0].shape[2] if past else 0
        graph = self.graph(role)
        feeds = {**self.host_feeds(role, tokens, mask, written), **self.cache_feeds(past, tokens.shape[0]), **(other or {})}
        inputs, _ = self.contract.graph_io(graph)
        feeds = {spec.name: feeds[spec.name] for spec in inputs}  # the graph's order
        outputs = dict(run(graph, feeds))
        length = written + tokens.shape[1]
        for name, (layer, _) in zip(self.contract.present_names(), self.contract.cache_slots()):
            outputs[name] = self.cache.visible(self.contract, layer, outputs[name], length)
        return feeds, outputs

    def held(self) -> dict[str, int]:
        """Cache tensors that hold only their last W positions (static rings), by past and present name."""
        return {name: self.contract.ring(layer) for names in (self.contract.past_names(), self.contract.present_names())
                for name, (layer, _) in zip(names, self.contract.cache_slots()) if self.contract.ring(layer)}

    def presents(self, outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [outputs[name] for name in self.contract.present_names()]

    def step_outputs(self, outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """[logits, *presents, (*cross)] in contract order, as a PyTorch step returns them."""
        return [outputs[LOGITS], *self.presents(outputs), *(outputs[n] for n in self.contract.cross_names() if n in outputs)]


    # -- capabilities: None when this export can, else the reason it cannot (each refusal is spelled here once) --

    def chat(self) -> str | None:
        """Can a conversation keep its cache between turns?"""
        return self.kind.refusal("chat")

    def speculation(self) -> str | None:
        """Can drafted tokens be checked in one call and the rejected ones rolled back?"""
        reason = self.kind.refusal("speculation")
        rollback = self.cache.rollback(self.contract)
        return reason or (f"speculative decoding rolls the cache back: {rollback}" if rollback else None)

    def batching(self) -> str | None:
        """Can rows at different lengths share one decode step (continuous batching)?"""
        return self.kind.refusal("batching") or self.cache.batching()

    def cuda_graph(self, provider: str) -> str | None:
        """Can the decode step be captured as a CUDA graph on this provider?"""
        return CUDA_GRAPH_NEEDS if provider != "cuda" else self.cache.cuda_graph()

    def quantization(self) -> str | None:
        """Can `kvgraph quantize` rewrite this export's weights?"""
        return self.kind.refusal("quantization")


def step_adapter(contract: GraphContract) -> StepAdapter:
    return StepAdapter(contract, CACHE_MODES[contract.cache], KINDS[contract.kind])
