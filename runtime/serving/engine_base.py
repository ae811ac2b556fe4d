"""What both serving engines share (engine.py): the callers' side -- generate, stream, and events with
cancel and timeout -- and each request's own thread running its token loop; RequestTimeout.

An engine subclass supplies `_start(request, settings, deadline, timeout, constraint) -> Job` (a row for the request
and its BatchRun), `rows_in_use`, `close()`, and whatever it names in /health.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

from kvgraph.graphs import KvgraphError
from kvgraph.runtime.generator import GenerationResult, Generator
from kvgraph.runtime.core.loop import BatchRun, Request
from kvgraph.runtime.core.sampling import TokenLogprob
from kvgraph.runtime.core.text import IncrementalText


class Piece(str):
    """A streamed text piece, with the log-probabilities of the tokens it closes (when the request asks for them): a
    piece may carry several tokens (a character spread over bytes), and the last piece every token not yet carried."""

    logprobs: tuple[TokenLogprob, ...] = ()

    @classmethod
    def of(cls, text: str, logprobs: list[TokenLogprob]) -> "Piece":
        piece = cls(text)
        piece.logprobs = tuple(logprobs)
        return piece


@dataclass
class Job:
    request: Request
    run: BatchRun
    prefill_s: float
    leave: Callable[[], None]  # gives the row back (once the request's thread is done with it)


class RequestTimeout(KvgraphError):
    """A request ran past its timeout. queued: it never got a row; new_tokens: what it had generated."""

    def __init__(self, seconds: float, queued: bool, new_tokens: int = 0) -> None:
        where = "waiting for a free row" if queued else f"after {new_tokens} new tokens"
        super().__init__(f"the request timed out ({seconds:g} s) {where}")
        self.seconds, self.queued, self.new_tokens = seconds, queued, new_tokens


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Engine:
    """What both engines share: the callers' side (generate, stream, events) and each request's thread."""

    kind = ""  # named in /health

    def __init__(self, generator: Generator, max_batch: int) -> None:
        if max_batch < 1:
            raise KvgraphError(f"max_batch must be >= 1, got {max_batch}")
        self.generator, self.graphs, self.max_batch = generator, generator.graphs, max_batch
        self._lock = threading.Condition()
        self._closed = False

    # -- the callers' side ----------------------------------------------------------------------

    def generate(self, prompt, max_new_tokens: int | None = None, *, chat: bool = False, stop: Sequence[str] = (),
                 min_new_tokens: int | None = None, **sampling) -> GenerationResult:
        for event in self.events(prompt, max_new_tokens, chat=chat, stop=stop, min_new_tokens=min_new_tokens, **sampling):
            if isinstance(event, GenerationResult):
                return event
        raise KvgraphError(f"the request ended without a result{self._why()}")

    def stream(self, prompt, max_new_tokens: int | None = None, *, chat: bool = False, stop: Sequence[str] = (),
               min_new_tokens: int | None = None, **sampling) -> Iterator[str]:
        """Text pieces as tokens arrive; closing the iterator early frees the row at once."""
        for piece in self.events(prompt, max_new_tokens, chat=chat, stop=stop, min_new_tokens=min_new_tokens, **sampling):
            if isinstance(piece, str) and piece:
                yield piece

    def events(self, prompt, max_new_tokens: int | None = None, *, chat: bool = False, stop: Sequence[str] = (),
               min_new_tokens: int | None = None, cancel: threading.Event | None = None, timeout: float | None = None,
               **sampling) -> Iterator[str | GenerationResult]:
        """Text pieces (Piece: str with the log-probabilities they close) as tokens arrive, then the GenerationResult.

        The request's token loop runs in its own thread, so a consumer that stops reading (a client gone
        silent) never holds up the other rows' steps. Setting `cancel`, or closing this iterator, ends the
        request at its next token and frees its row. `timeout` (seconds, from this call, waiting for a row
        included): past it the request ends the same way and RequestTimeout is raised."""
        cancel = cancel or threading.Event()
        deadline = None if timeout is None else time.monotonic() + timeout
        codec = self.generator.codec  # without a tokenizer: no text pieces, the result only
        text = IncrementalText(codec, hold=max((len(s) for s in stop), default=1) - 1) if codec else None
        constraint = sampling.pop("constraint", None)
        logprobs = sampling.pop("logprobs", None)  # each token's log-probability and this many alternatives (Request.logprobs)
        decoding = self.generator.resolve({"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, **sampling}, beams=False)
        request = self.generator.request(prompt, 1, chat, stop, decoding.min_new_tokens)
        request = replace(decoding.sized([request], len(self.generator.decoder_prefix(request)))[0], logprobs=logprobs)
        self.generator.check([request])
        settings = decoding.sampling
        job = self._start(request, settings, deadline, timeout, constraint)
        tokens: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, args=(job, tokens, cancel, deadline, timeout), name="kvgraph-request", daemon=True).start()
        carried: list[TokenLogprob] = []  # log-probabilities of the tokens since the last piece (logprobs asked)
        try:
            while True:
                kind, value = tokens.get()
                if kind == "token" and text is not None:
                    token, entry = value
                    carried += [entry] if entry is not None else []
                    piece = text.push(token)
                    if piece:
                        yield Piece.of(piece, carried)
                        carried = []
                elif kind == "done":
                    last = text.finish(value.text) if text is not None else ""
                    if last or carried:
                        yield Piece.of(last, carried)
                    yield value
                    return
                elif kind == "error":
                    raise value
                elif kind == "end":  # cancelled: no result
                    return
        finally:
            cancel.set()

    def _work(self, job: Job, tokens: queue.Queue, cancel: threading.Event, deadline: float | None, timeout: float | None) -> None:
        """The request's token loop, handing each token to the consumer's queue; stops when cancelled or late."""
        try:
            for _, token in job.run:
                row = job.run.rows[0]
                if row.finish_reason != "stop":  # the stop string's token: its text is cut at the end
                    tokens.put(("token", (token, row.logprobs[-1] if job.request.logprobs is not None else None)))
                if cancel.is_set():
                    break
                if deadline is not None and time.monotonic() > deadline and not row.finished:
                    tokens.put(("error", RequestTimeout(timeout, queued=False, new_tokens=len(row.tokens))))
                    break
            else:
                tokens.put(("done", self.generator.result(job.request, job.run.rows[0], job.prefill_s, job.run)))
        except Exception as exc:  # the engine stopped: the consumer raises it
            tokens.put(("error", exc))
        finally:
            job.leave()
            tokens.put(("end", None))

    @property
    def free_rows(self) -> int:
        return self.max_batch - self.rows_in_use

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
