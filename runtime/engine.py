"""Continuous batching over one static-cache export: B row slots, one decode step for every active row.

    engine = BatchEngine(Generator.load("out-static/"), max_batch=8)
    result = engine.generate(prompt, max_new_tokens=64)       # from any number of threads at once
    for piece in engine.stream(prompt): ...
    engine.close()

The static cache already gives every row its own write index, so rows at different lengths share a
decode step. Each request runs the runtime's own token loop (loop.BatchRun: sampling, stops,
min_new_tokens, text) in its caller's thread; where that loop would run a decode step, it hands its
token to the engine and waits. The engine's thread owns the onnxruntime calls and the buffers:

- admission: a waiting request takes a free row; its prompt is prefilled alone (batch 1, the same
  graph call as Generator.generate) into a one-row cache, which is copied into the row's slot of the
  (B, Hkv, N, D) buffers. The copy (the row's N positions) is cheaper than a prefill over the batch;
- decode: once every active row has handed in its token, one call of the decode graph runs them all,
  each row at its own write index (modes.StaticCacheMode.row_feeds). The active rows are kept in
  slots 0 .. k-1 and the step binds views of the first k rows, so it costs what k rows cost;
- a finished or abandoned request frees its row before the next step (the last row moves into the hole).

Admissions run between decode steps, so a new prompt makes the running rows wait one prefill.
Dynamic-cache exports are refused: their caches grow per row and cannot share a step's buffers.
The buffers are host memory (numpy arrays under the OrtValues), so the engine runs on the CPU
provider; a device engine needs a row copy on the device, not written yet.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort

from ..graphs import KvgraphError
from .generator import GenerationResult, Generator
from .loop import BatchRun, Request
from .sampling import Sampling
from .steps import StaticCache, _BoundDecode, prefill
from .text import IncrementalText


@dataclass
class _Row:
    """One request's slot: its position count, its next token once handed in, and the logits handed back."""

    slot: int
    length: int
    token: int | None = None
    logits: np.ndarray | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    prefill_s: float = 0.0


@dataclass
class _Job:
    request: Request
    row: _Row
    run: BatchRun


class _Slots:
    """(B, Hkv, N, D) host buffers. The active rows are kept in slots 0 .. k-1, so a step binds the first
    k rows of every buffer (views: the same memory) and costs what k rows cost, not B."""

    def __init__(self, graphs, batch: int) -> None:
        contract = graphs.contract
        self.graphs = graphs
        self.arrays = [np.zeros(shape, dtype=contract.dtype) for shape in graphs.steps.cache.buffer_shapes(contract, batch)]
        self._steps: dict[int, _BoundDecode] = {}  # k -> the decode binding over the first k rows

    def put(self, slot: int, row: StaticCache) -> None:
        """Row `slot` of every buffer := the one-row cache's buffers (all N positions)."""
        for array, value in zip(self.arrays, row.values):
            array[slot] = value.numpy()[0]

    def move(self, source: int, target: int) -> None:
        for array in self.arrays:
            array[target] = array[source]

    def decode(self, host: dict[str, np.ndarray]) -> np.ndarray:
        """One decode step over the first k = len(tokens) rows; logits (k, 1, V)."""
        k = host["input_ids"].shape[0]
        if k not in self._steps:
            self._steps[k] = _BoundDecode(self.graphs, self.graphs.graph_for("decode"), _FirstRows(self.arrays, k), host, {})
        return self._steps[k].run(host)


class _FirstRows:
    """The first k rows of every buffer, as OrtValues over views of the same memory (CPU)."""

    def __init__(self, arrays: list[np.ndarray], k: int) -> None:
        self.values = [ort.OrtValue.ortvalue_from_numpy(array[:k]) for array in arrays]
        self.batch = k

    def aliased(self, graphs) -> list[tuple[str, str, ort.OrtValue]]:
        return list(zip(graphs.contract.past_names(), graphs.contract.present_names(), self.values))


class BatchEngine:
    """Requests from many threads, decoded together over one static-cache export."""

    def __init__(self, generator: Generator, max_batch: int = 8) -> None:
        graphs = generator.graphs
        if not graphs.contract.static or graphs.contract.seq2seq:
            raise KvgraphError(f"{graphs.directory}: continuous batching needs a decoder-only static-cache export "
                               "(kvgraph export --cache static --max-length N): a dynamic cache grows per row and cannot share a step")
        if graphs.device.ort_type != "cpu":
            raise KvgraphError("the batching engine keeps its buffers in host memory: load the export with provider 'cpu'")
        if max_batch < 1:
            raise KvgraphError(f"max_batch must be >= 1, got {max_batch}")
        self.generator, self.graphs, self.max_batch = generator, graphs, max_batch
        self.slots = _Slots(graphs, max_batch)
        self._rows: dict[int, _Row] = {}  # slot -> active row; compacted into slots 0 .. k-1 before each step
        self._waiting: list[tuple[Request, _Row, threading.Event]] = []  # admissions, in arrival order
        self._lock = threading.Condition()
        self.steps_run = 0  # decode steps, and the rows each carried (for tests and benchmarks)
        self.rows_per_step: list[int] = []
        self._closed = False
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._serve, name="kvgraph-engine", daemon=True)
        self._thread.start()

    # -- the callers' side ----------------------------------------------------------------------

    def generate(self, prompt, max_new_tokens: int = 64, *, chat: bool = False, stop: Sequence[str] = (),
                 min_new_tokens: int = 0, **sampling) -> GenerationResult:
        for event in self.events(prompt, max_new_tokens, chat=chat, stop=stop, min_new_tokens=min_new_tokens, **sampling):
            if isinstance(event, GenerationResult):
                return event
        raise KvgraphError(f"the request ended without a result{self._why()}")

    def stream(self, prompt, max_new_tokens: int = 64, *, chat: bool = False, stop: Sequence[str] = (),
               min_new_tokens: int = 0, **sampling) -> Iterator[str]:
        """Text pieces as tokens arrive; closing the iterator early frees the row at once."""
        for piece in self.events(prompt, max_new_tokens, chat=chat, stop=stop, min_new_tokens=min_new_tokens, **sampling):
            if isinstance(piece, str):
                yield piece

    def events(self, prompt, max_new_tokens: int = 64, *, chat: bool = False, stop: Sequence[str] = (),
               min_new_tokens: int = 0, cancel: threading.Event | None = None, **sampling) -> Iterator[str | GenerationResult]:
        """Text pieces as tokens arrive, then the GenerationResult (finish reason, token counts).

        The request's token loop runs in its own thread, so a consumer that stops reading (a client gone
        silent) never holds up the other rows' steps. Setting `cancel`, or closing this iterator, ends the
        request at its next token and frees its row."""
        cancel = cancel or threading.Event()
        codec = self.generator.codec  # without a tokenizer: no text pieces, the result only
        text = IncrementalText(codec, hold=max((len(s) for s in stop), default=1) - 1) if codec else None
        job = self._start(prompt, max_new_tokens, chat, stop, min_new_tokens, sampling)
        tokens: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, args=(job, tokens, cancel), name="kvgraph-request", daemon=True).start()
        try:
            while True:
                kind, value = tokens.get()
                if kind == "token" and text is not None:
                    piece = text.push(value)
                    if piece:
                        yield piece
                elif kind == "done":
                    last = text.finish(value.text) if text is not None else ""
                    if last:
                        yield last
                    yield value
                    return
                elif kind == "error":
                    raise value
        finally:
            cancel.set()

    def _work(self, job: _Job, tokens: queue.Queue, cancel: threading.Event) -> None:
        """The request's token loop, handing each token to the consumer's queue; stops when cancelled."""
        try:
            for _, token in job.run:
                if job.run.rows[0].finish_reason != "stop":  # the stop string's token: its text is cut at the end
                    tokens.put(("token", token))
                if cancel.is_set():
                    break
            else:
                tokens.put(("done", self.generator.result(job.request, job.run.rows[0], job.row.prefill_s, job.run)))
        except Exception as exc:  # the engine stopped: the consumer raises it
            tokens.put(("error", exc))
        finally:
            self._leave(job.row)

    @property
    def load(self) -> int:
        """Requests running or waiting for a row."""
        with self._lock:
            return len(self._rows) + len(self._waiting)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def rows_in_use(self) -> int:
        with self._lock:
            return len(self._rows)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join()

    def _start(self, prompt, max_new_tokens, chat, stop, min_new_tokens, sampling) -> _Job:
        """Check the request, wait for a row and its prefill; the job's run generates when iterated."""
        request = self.generator._request(prompt, max_new_tokens, chat, stop, min_new_tokens)
        self.generator.check([request])
        settings = Sampling(**sampling)
        row, admitted = _Row(-1, 0), threading.Event()
        with self._lock:
            if self._closed:
                raise KvgraphError(f"the engine is closed{self._why()}")
            self._waiting.append((request, row, admitted))
            self._lock.notify_all()
        admitted.wait()
        if row.logits is None:
            raise KvgraphError(f"the engine stopped before the request ran{self._why()}")
        run = BatchRun([request], row.logits, np.ones((1, row.length), dtype=np.int64), lambda feed, mask: self._step(row, feed),
                       settings, self.generator)
        return _Job(request, row, run)

    def _step(self, row: _Row, feed: np.ndarray) -> np.ndarray:
        """The row's next token in, its logits (1, V) out, once the engine has run the step."""
        with self._lock:
            row.ready.clear()
            row.token = int(feed[0, 0])
            self._lock.notify_all()
        row.ready.wait()
        if row.logits is None:
            raise KvgraphError(f"the engine stopped while the request ran{self._why()}")
        return row.logits

    def _why(self) -> str:
        return f": {type(self._error).__name__}: {str(self._error).splitlines()[0][:200]}" if self._error else ""

    def _leave(self, row: _Row) -> None:
        with self._lock:
            if self._rows.get(row.slot) is row:
                del self._rows[row.slot]  # the engine's thread closes the hole before its next step
            self._lock.notify_all()

    @property
    def free_rows(self) -> int:
        return self.max_batch - self.rows_in_use

    # -- the engine's thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # an onnxruntime failure: every waiting caller gets it, nobody hangs
            with self._lock:
                self._error, self._closed = exc, True
                self._fail_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._due():
                    self._lock.wait()
                if self._closed:
                    self._fail_all()
                    return
                self._compact()
                admit = [self._waiting.pop(0) for _ in range(min(len(self._waiting), self.max_batch - len(self._rows)))]
                first = len(self._rows)
                stepping = sorted(self._rows.values(), key=lambda r: r.slot) if not admit else []
            for slot, (request, row, admitted) in enumerate(admit, start=first):
                self._admit(request, row, slot)
                with self._lock:
                    self._rows[slot] = row
                admitted.set()
            if stepping:
                self._decode_step(stepping)

    def _due(self) -> bool:
        """Work to do: a waiting request and a free row, or every active row has handed in its token."""
        if self._waiting and len(self._rows) < self.max_batch:
            return True
        return bool(self._rows) and all(r.token is not None for r in self._rows.values())

    def _compact(self) -> None:
        """Move the last rows into the holes left by finished ones: the active rows are slots 0 .. k-1 (under the lock)."""
        for hole in range(len(self._rows)):
            if hole not in self._rows:
                last = max(self._rows)
                row = self._rows.pop(last)
                self.slots.move(last, hole)
                row.slot = hole
                self._rows[hole] = row

    def _admit(self, request: Request, row: _Row, slot: int) -> None:
        start = time.perf_counter()
        ids = np.array([request.prompt_ids], dtype=np.int64)
        logits, cache = prefill(self.graphs, ids, np.ones_like(ids))  # alone: the same call as Generator.generate
        self.slots.put(slot, cache)
        row.slot, row.length, row.logits = slot, len(request.prompt_ids), logits[:, -1]
        row.prefill_s = time.perf_counter() - start

    def _decode_step(self, stepping: list[_Row]) -> None:
        """One decode call over slots 0 .. k-1, every row at its own write index."""
        tokens = np.array([[row.token] for row in stepping], dtype=np.int64)  # (k, 1)
        lengths = np.array([row.length for row in stepping], dtype=np.int64)  # (k,)
        logits = self.slots.decode(self.graphs.steps.cache.row_feeds(self.graphs.contract, tokens, lengths))  # (k, 1, V)
        self.steps_run += 1
        self.rows_per_step.append(len(stepping))
        with self._lock:
            for row in stepping:
                row.length += 1
                row.token, row.logits = None, logits[row.slot:row.slot + 1, -1].copy()
                row.ready.set()

    def _fail_all(self) -> None:
        for _, row, admitted in self._waiting:
            admitted.set()
        for row in self._rows.values():
            row.logits = None
            row.ready.set()
