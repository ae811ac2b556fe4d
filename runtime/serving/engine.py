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

Admissions are interleaved with decoding: a prompt is prefilled in chunks of `prefill_chunk` tokens (the
prefill graph for the first, the extend graph on the same one-row cache for the rest), and the running rows
take a decode step between chunks. A 2,000-token prompt therefore holds the running streams up for one
chunk at a time, not for its whole prefill. The chunks' logits are the whole prefill's (the extend graph
is the one a chat's next turn runs).
The buffers are host memory (numpy arrays under the OrtValues), so the batch engine runs on the CPU
provider; a device engine needs a row copy on the device, not written yet.

Exports whose steps cannot be shared -- a dynamic cache grows per row, an encoder-decoder carries
cross K/V per source, a device export keeps its buffers on the device -- are served by RequestEngine:
each request on its own cache in its own thread, at most max_batch at once, the rest waiting in
order. Same interface, no shared step. `make_engine` picks the engine and says why.

Both take a timeout per request (waiting for a row included): past it, the request ends at its next
token, frees its row and raises RequestTimeout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from kvgraph.graphs import KvgraphError
from kvgraph.runtime.serving.engine_base import Engine, Job, RequestTimeout, remaining
from kvgraph.runtime.generator import Generator
from kvgraph.runtime.core.loop import BatchRun, Request
from kvgraph.runtime.core.sampling import Sampling
from kvgraph.runtime.core.steps import StaticCache, BoundDecode, extend, run_step

__all__ = ["PREFILL_CHUNK", "BatchEngine", "Engine", "RequestEngine", "RequestTimeout", "batch_refusal", "make_engine"]


@dataclass
class _Row:
    """One request's slot: its position count, its next token once handed in, and the logits handed back."""

    slot: int
    length: int
    token: int | None = None
    logits: np.ndarray | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    prefill_s: float = 0.0


PREFILL_CHUNK = 256  # prompt tokens prefilled between two decode steps of the running rows
TOKEN_WAIT = 0.05  # seconds a prefill chunk waits for the running rows' next tokens (a row's sampling takes well under)


@dataclass
class _Filling:
    """An admitted request whose prompt is being prefilled, a chunk at a time, into a one-row cache of its own."""

    request: Request
    row: _Row
    admitted: threading.Event
    cache: StaticCache | None = None
    done: int = 0  # prompt tokens in the cache so far
    seconds: float = 0.0
    logits: np.ndarray | None = None  # (1, V) once the whole prompt is in the cache


class _Slots:
    """(B, Hkv, N, D) host buffers. The active rows are kept in slots 0 .. k-1, so a step binds the first
    k rows of every buffer (views: the same memory) and costs what k rows cost, not B."""

    def __init__(self, graphs, batch: int) -> None:
        contract = graphs.contract
        self.graphs = graphs
        self.arrays = [np.zeros(shape, dtype=contract.dtype) for shape in graphs.steps.cache.buffer_shapes(contract, batch)]
        self._steps: dict[int, BoundDecode] = {}  # k -> the decode binding over the first k rows

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
            self._steps[k] = BoundDecode(self.graphs, self.graphs.graph_for("decode"), _FirstRows(self.arrays, k), host, {})
        return self._steps[k].run(host)


class _FirstRows:
    """The first k rows of every buffer, as OrtValues over views of the same memory (CPU)."""

    def __init__(self, arrays: list[np.ndarray], k: int) -> None:
        self.values = [ort.OrtValue.ortvalue_from_numpy(array[:k]) for array in arrays]
        self.batch = k

    def aliased(self, graphs) -> list[tuple[str, str, ort.OrtValue]]:
        return list(zip(graphs.contract.past_names(), graphs.contract.present_names(), self.values))


class BatchEngine(Engine):
    """Requests from many threads, decoded together over one static-cache export."""

    kind = "continuous batching"

    def __init__(self, generator: Generator, max_batch: int = 8, prefill_chunk: int | None = PREFILL_CHUNK) -> None:
        """prefill_chunk: the most prompt tokens prefilled between two decode steps (None: a prompt at once)."""
        reason = batch_refusal(generator)
        if reason:
            raise KvgraphError(f"{generator.graphs.directory}: {reason}")
        super().__init__(generator, max_batch)
        self.slots = _Slots(self.graphs, max_batch)
        self._rows: dict[int, _Row] = {}  # slot -> active row; compacted into slots 0 .. k-1 before each step
        self._waiting: list[tuple[Request, _Row, threading.Event]] = []  # admissions, in arrival order
        if prefill_chunk is not None and prefill_chunk < 1:
            raise KvgraphError(f"prefill_chunk must be >= 1 (or None: a prompt at once), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self._filling: list[_Filling] = []  # admitted, their prompts being prefilled a chunk at a time
        self._spare: list[StaticCache] = []  # one-row caches already filled once and copied into a slot: reused, not reallocated
        self.calls: list[str] = []  # "prefill" / "decode", in the order the engine ran them (tests, benchmarks); the last 10,000
        self.steps_run = 0  # decode steps, and the rows each carried (for tests and benchmarks)
        self.rows_per_step: list[int] = []
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._serve, name="kvgraph-engine", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        """Requests running or waiting for a row."""
        with self._lock:
            return len(self._rows) + len(self._filling) + len(self._waiting)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def rows_in_use(self) -> int:
        with self._lock:
            return len(self._rows) + len(self._filling)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join()

    def _start(self, request: Request, settings: Sampling, deadline: float | None, timeout: float | None, constraint=None) -> Job:
        """Wait for a row and its prefill; the job's run generates when iterated."""
        row, admitted = _Row(-1, 0), threading.Event()
        entry = (request, row, admitted)
        with self._lock:
            if self._closed:
                raise KvgraphError(f"the engine is closed{self._why()}")
            self._waiting.append(entry)
            self._lock.notify_all()
        if not admitted.wait(remaining(deadline)):
            with self._lock:
                if entry in self._waiting:  # still waiting: leave the queue (else the engine is admitting it now)
                    self._waiting.remove(entry)
                    raise RequestTimeout(timeout, queued=True)
            admitted.wait()
        if row.logits is None:
            raise KvgraphError(f"the engine stopped before the request ran{self._why()}")
        run = BatchRun([request], row.logits, np.ones((1, row.length), dtype=np.int64), lambda feed, mask: self._step(row, feed),
                       settings, self.generator, constraint)
        return Job(request, run, row.prefill_s, lambda: self._leave(row))

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
                self._await_tokens()
                self._compact()
                stepping = sorted(self._rows.values(), key=lambda r: r.slot) if self._stepping_due() else []
                self._place_filled()  # after the rows that step: a row placed now joins the next step, once it has its token
                free = self.max_batch - len(self._rows) - len(self._filling)
                self._filling += [_Filling(*self._waiting.pop(0)) for _ in range(min(len(self._waiting), free))]
                filling = next((f for f in self._filling if f.logits is None), None)
            if filling is not None:
                self._fill(filling)
            if stepping:
                self._decode_step(stepping)

    def _due(self) -> bool:
        """Work to do: a waiting request and a free row, a prompt to prefill, or every active row has handed in its token."""
        if self._waiting and len(self._rows) + len(self._filling) < self.max_batch:
            return True
        return bool(self._filling) or self._stepping_due()

    def _await_tokens(self) -> None:
        """Before a prefill chunk, give the running rows' threads a moment (TOKEN_WAIT at most) to hand in the tokens they
        are sampling, so that the chunk and their decode step share this turn instead of the chunk running alone."""
        deadline = time.monotonic() + TOKEN_WAIT
        while self._filling and self._rows and not self._stepping_due() and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._lock.wait(left)

    def _stepping_due(self) -> bool:
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

    def _fill(self, filling: _Filling) -> None:
        """One chunk of an admitted prompt into its own one-row cache; once the prompt is whole, its last logits are kept
        and the next turn of the loop places the cache in a slot."""
        start = time.perf_counter()
        ids = filling.request.prompt_ids
        end = len(ids) if self.prefill_chunk is None else min(len(ids), filling.done + self.prefill_chunk)
        chunk = np.array([ids[filling.done:end]], dtype=np.int64)
        if filling.cache is None:  # alone: the same graph call as Generator.generate when the prompt fits one chunk
            cache = self._spare.pop() if self._spare else StaticCache(self.graphs, 1)
            logits, filling.cache, _ = run_step(self.graphs, cache.truncated(0), "prefill", chunk, np.ones_like(chunk))
        else:
            logits, filling.cache = extend(self.graphs, filling.cache, chunk, np.ones((1, end), dtype=np.int64))
        filling.done, filling.seconds = end, filling.seconds + time.perf_counter() - start
        self._record("prefill")
        if end == len(ids):
            with self._lock:
                filling.logits = logits[:, -1]  # whole: placed in a slot at the next turn of the loop
                self._lock.notify_all()

    def _record(self, call: str) -> None:
        self.calls.append(call)
        if len(self.calls) > 20_000:
            del self.calls[:10_000]

    def _place_filled(self) -> None:
        """Whole prompts' caches into the slots after the active rows (under the lock, after compaction: no decode step
        is running, and the slots 0 .. k-1 stay the active rows')."""
        for filling in [f for f in self._filling if f.logits is not None]:
            self._filling.remove(filling)
            slot, row = len(self._rows), filling.row
            self.slots.put(slot, filling.cache)
            self._spare.append(filling.cache)  # the next prompt fills it again (its old values are masked, all finite)
            row.slot, row.length, row.logits, row.prefill_s = slot, filling.done, filling.logits, filling.seconds
            self._rows[slot] = row
            filling.admitted.set()

    def _decode_step(self, stepping: list[_Row]) -> None:
        """One decode call over slots 0 .. k-1, every row at its own write index."""
        tokens = np.array([[row.token] for row in stepping], dtype=np.int64)  # (k, 1)
        lengths = np.array([row.length for row in stepping], dtype=np.int64)  # (k,)
        logits = self.slots.decode(self.graphs.steps.cache.row_feeds(self.graphs.contract, tokens, lengths))  # (k, 1, V)
        self.steps_run += 1
        self.rows_per_step.append(len(stepping))
        self._record("decode")
        with self._lock:
            for row in stepping:
                row.length += 1
                row.token, row.logits = None, logits[row.slot:row.slot + 1, -1].copy()
                row.ready.set()

    def _fail_all(self) -> None:
        for _, row, admitted in self._waiting:
            admitted.set()
        for filling in self._filling:
            filling.admitted.set()
        for row in self._rows.values():
            row.logits = None
            row.ready.set()


class RequestEngine(Engine):
    """Each request on its own cache (Generator's own steps) in its own thread, at most max_batch at once,
    the others waiting in arrival order. For exports the batch engine cannot share a step of."""

    kind = "one cache per request"

    def __init__(self, generator: Generator, max_batch: int = 8) -> None:
        super().__init__(generator, max_batch)
        self._running = 0
        self._queue: list[object] = []  # one token per waiting request, in arrival order

    @property
    def load(self) -> int:
        with self._lock:
            return self._running + len(self._queue)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def rows_in_use(self) -> int:
        with self._lock:
            return self._running

    def close(self) -> None:
        """Refuse new requests; running ones finish on their own caches."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def _start(self, request: Request, settings: Sampling, deadline: float | None, timeout: float | None, constraint=None) -> Job:
        turn = object()
        with self._lock:
            self._queue.append(turn)
            try:
                while not self._closed and (self._running >= self.max_batch or self._queue[0] is not turn):
                    if not self._lock.wait(remaining(deadline)) and deadline is not None and time.monotonic() >= deadline:
                        raise RequestTimeout(timeout, queued=True)
                if self._closed:
                    raise KvgraphError("the engine is closed")
                self._running += 1
            finally:
                self._queue.remove(turn)
                self._lock.notify_all()
        try:
            with self.graphs.request_turn():
                run, prefill_s = self.generator.start([request], settings, True, constraint)
        except BaseException:
            self._leave()
            raise
        return Job(request, run, prefill_s, self._leave)

    def _leave(self) -> None:
        with self._lock:
            self._running -= 1
            self._lock.notify_all()


def batch_refusal(generator: Generator) -> str:
    """Why continuous batching cannot serve this export ("" when it can)."""
    graphs = generator.graphs
    reason = graphs.steps.batching()
    if reason:
        return reason
    if graphs.device.ort_type != "cpu":
        return "the batch engine keeps its row buffers in host memory: load the export with provider 'cpu'"
    return ""


def make_engine(generator: Generator, max_batch: int = 8, prefill_chunk: int | None = PREFILL_CHUNK) -> tuple[Engine, str]:
    """The batch engine where the export allows it, else one cache per request; and why that one."""
    reason = batch_refusal(generator)
    if reason:
        return RequestEngine(generator, max_batch), f"{reason}: each request runs on its own cache, up to {max_batch} at once"
    chunks = f", prompts prefilled {prefill_chunk} tokens at a time between decode steps" if prefill_chunk else ""
    return BatchEngine(generator, max_batch, prefill_chunk), f"continuous batching over {max_batch} rows{chunks}"
