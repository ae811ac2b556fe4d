"""An OpenAI-compatible HTTP server over a serving engine (the `serve` extra: FastAPI, uvicorn).

    engine, why = make_engine(Generator.load("out-static/"), max_batch=8)
    app = create_app(engine, model="smollm2", max_queue=64, request_timeout=600)

Endpoints: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with
`n`, `stream` as server-sent events ending in `data: [DONE]`, and `stream_options.include_usage`; logprobs (each
streamed chunk carries its own tokens'), echo and batched prompts), POST /tokenize and /detokenize (vLLM's shapes).
Encoder-decoder exports serve /v1/completions (the prompt is the source). Bad input is answered 400
with an OpenAI-shaped error body naming the field (a field the server does not honour is refused by name,
never dropped); malformed JSON, bad UTF-8, an unknown path (404) or method (405) get the same shape; a full
queue 429 with Retry-After; a request past its timeout 503 (still waiting for a row) or 504 (generating; a
stream ends with an error event); nothing a client sends is a 500. A client that hangs up, streamed or not,
ends its request at the next token and frees its row (counted in kvgraph_cancelled_requests). Every response names the process that answered in the
`x-kvgraph-instance` header (which replica, behind a load balancer or Ray Serve).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from kvgraph.graphs import KvgraphError
from kvgraph.runtime.generator import GenerationResult, Generator
from kvgraph.runtime.serving.engine import PREFILL_CHUNK, make_engine
from kvgraph.runtime.serving.engine_base import Engine, RequestTimeout
from kvgraph.runtime.serving.openai_logprobs import chat_logprobs, completion_logprobs, generated, prompt_entries
from kvgraph.runtime.serving.openai_request import BadRequest, parse_request, tool_schema

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "interrupted": "stop"}


class Metrics:
    """Prometheus metrics of one app (its own registry): requests by endpoint and status, tokens in and
    out, time to first token and inter-token latency, queue depth and rows in use."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("kvgraph_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("kvgraph_prompt_tokens", "prompt tokens of finished requests", registry=self.registry)
        self.completion_tokens = Counter("kvgraph_completion_tokens", "generated tokens of finished requests", registry=self.registry)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
        self.ttft = Histogram("kvgraph_time_to_first_token_seconds", "request arrival to its first text", buckets=latency,
                              registry=self.registry)
        self.itl = Histogram("kvgraph_inter_token_latency_seconds", "between a request's text pieces", buckets=latency,
                             registry=self.registry)
        self.cancelled = Counter("kvgraph_cancelled_requests", "requests ended early because their client hung up", registry=self.registry)
        Gauge("kvgraph_queue_depth", "requests waiting for a row", registry=self.registry).set_function(lambda: engine.waiting)
        Gauge("kvgraph_rows_in_use", "rows of the batch decoding a request", registry=self.registry).set_function(lambda: engine.rows_in_use)

    def timed(self, events: Iterator, start: float) -> Iterator:
        """The events, unchanged; their timing and token counts recorded on the way."""
        last = None
        for event in events:
            now = time.perf_counter()
            if isinstance(event, GenerationResult):
                self.prompt_tokens.inc(event.stats.prompt_tokens)
                self.completion_tokens.inc(event.stats.new_tokens)
            elif event:
                (self.ttft.observe(now - start) if last is None else self.itl.observe(now - last))
                last = now
            yield event


INSTANCE = f"{socket.gethostname()}-{os.getpid()}"


def create_app(engine: Engine, model: str, max_queue: int = 64, request_timeout: float | None = None):
    """The FastAPI app over `engine`: at most engine.max_batch requests run and max_queue wait, each for
    at most request_timeout seconds (None: no limit)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # a waiting or non-streaming request holds a worker thread: the pool must hold a full queue
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, engine.max_batch + max_queue + 16)
        yield

    app = FastAPI(title="kvgraph", lifespan=lifespan)
    metrics = Metrics(engine)
    serving = _Serving(engine, metrics, model, max_queue, request_timeout)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        response.headers["x-kvgraph-instance"] = INSTANCE
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return _error(400, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(400, "the request body must be a JSON object", None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(exc.status_code, message.get(exc.status_code, str(exc.detail)), None, getattr(exc, "headers", None))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "instance": INSTANCE, "engine": engine.kind, "rows": engine.max_batch,
                "running": engine.rows_in_use, "waiting": engine.waiting}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "kvgraph"}]}

    # each request's work runs in the thread pool, where waiting on the engine blocks no one else, while the event loop
    # watches its connection: a client that hangs up cancels it
    # (plain Starlette routes: the body is read and checked here, so any malformed body gets an OpenAI-shaped 400)
    async def completions(request):
        return await serving.handle(request, chat=False)

    async def chat_completions(request):
        return await serving.handle(request, chat=True)

    app.router.add_route("/v1/completions", completions, methods=["POST"])
    app.router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    async def tokenize(request):
        from fastapi.responses import JSONResponse

        return JSONResponse(tokenized(engine, json_object(await request.body())))

    async def detokenize(request):
        from fastapi.responses import JSONResponse

        return JSONResponse(detokenized(engine, json_object(await request.body())))

    app.router.add_route("/tokenize", tokenize, methods=["POST"])
    app.router.add_route("/detokenize", detokenize, methods=["POST"])

    return app


def _error(status: int, message: str, param: str | None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(_error_body(status, message, param), status_code=status, headers=headers)


def _error_body(status: int, message: str, param: str | None) -> dict:
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error", 429: "rate_limit_exceeded",
            503: "timeout", 504: "timeout"}.get(status, "server_error")
    code = {404: "unknown_url", 405: "method_not_allowed", 429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def json_object(raw: bytes) -> dict:
    """A request body: a JSON object in UTF-8, or BadRequest saying what is wrong with it."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def tokenized(engine: Engine, body: dict) -> dict:
    """POST /tokenize, as vLLM's: {prompt, add_special_tokens} or {messages, tools} (the chat template applied) ->
    {tokens, count, max_model_len}."""
    from kvgraph.runtime.serving.openai_messages import MessageError, template_messages, template_tools

    codec = _codec(engine)
    unknown = sorted(set(body) - {"model", "prompt", "add_special_tokens", "messages", "tools", "add_generation_prompt"})
    if unknown:
        raise BadRequest(f"unrecognized request argument: {unknown[0]}", unknown[0])
    if ("prompt" in body) == ("messages" in body):
        raise BadRequest("send either prompt (a string) or messages (a chat)", "prompt")
    if "prompt" in body:
        if not isinstance(body["prompt"], str) or not isinstance(body.get("add_special_tokens", True), bool):
            raise BadRequest("prompt must be a string and add_special_tokens true or false", "prompt")
        tokens = codec.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
    else:
        try:
            messages, tools = template_messages(body["messages"]), template_tools(body.get("tools"))
            text = codec.render_chat(messages, add_generation_prompt=bool(body.get("add_generation_prompt", True)), tools=tools)
        except MessageError as exc:
            raise BadRequest(str(exc), exc.param) from exc
        except KvgraphError as exc:
            raise BadRequest(str(exc), "messages") from exc
        tokens = codec.encode(text, add_special_tokens=False)
    limit = engine.generator.room(0)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": limit}


def detokenized(engine: Engine, body: dict) -> dict:
    """POST /detokenize, as vLLM's: {tokens} -> {prompt}."""
    codec, tokens = _codec(engine), body.get("tokens")
    vocab = engine.graphs.contract.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens):
        raise BadRequest(f"tokens must be a list of token ids in [0, {vocab})", "tokens")
    return {"prompt": codec.decode(tokens)}


def _codec(engine: Engine):
    if engine.generator.codec is None:
        raise BadRequest("this export has no tokenizer.json: it takes and gives token ids only")
    return engine.generator.codec


class Hangup:
    """A request's client connection: set() when the client hangs up, which cancels every choice of the request;
    counted as a cancellation if the request was still running."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics, self.event, self.finished = metrics, threading.Event(), False
        self.cancels: list[threading.Event] = []
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            if self.event.is_set():
                return
            self.event.set()
            if not self.finished:
                self.metrics.cancelled.inc()
        for cancel in self.cancels:
            cancel.set()

    def watch(self, cancels: list[threading.Event]) -> None:
        self.cancels = cancels
        if self.event.is_set():
            for cancel in cancels:
                cancel.set()

    def finish(self) -> None:
        with self._lock:
            self.finished = True


async def watch_disconnect(receive, hangup: Hangup) -> None:
    """Wait for the ASGI server to say the client has gone, then set the hangup."""
    while (await receive())["type"] != "http.disconnect":
        pass
    hangup.set()


class _Serving:
    """One completion request: parse, admit (or 429), run its n choices, answer as JSON or as a stream."""

    def __init__(self, engine: Engine, metrics: Metrics, model: str, max_queue: int, timeout: float | None) -> None:
        self.engine, self.metrics, self.model, self.max_queue, self.timeout = engine, metrics, model, max_queue, timeout

    async def handle(self, request, chat: bool):
        """Parse the body, then respond in a worker thread while the connection is watched (a hangup cancels)."""
        import anyio

        body = json_object(await request.body())
        hangup = Hangup(self.metrics)
        outcome: list = []

        async def work() -> None:
            try:
                outcome.append(await anyio.to_thread.run_sync(self.respond, body, chat, hangup))
            except Exception as exc:  # raised outside the task group, unwrapped, for the app's handlers
                outcome.append(exc)
            group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(work)
            await watch_disconnect(request.receive, hangup)
            # the client has gone: the worker ends at its next token; wait for it (its answer goes nowhere)
            await anyio.sleep_forever()
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    def respond(self, body: dict, chat: bool, hangup: Hangup | None = None):
        from fastapi.responses import JSONResponse

        hangup = hangup or Hangup(self.metrics)
        start = time.perf_counter()
        parsed = parse_request(self.engine, body, chat)
        options, total = parsed.options, len(parsed.prompts) * parsed.n
        engine, capacity = self.engine, self.engine.max_batch + self.max_queue
        if engine.load + total > capacity:
            return _error(429, f"the server is full ({engine.max_batch} rows busy, {self.max_queue} requests waiting); retry later", None,
                          {"Retry-After": "1"})
        created, ident = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "created": created, "model": self.model}
        if "num_beams" in options:
            return self._beams(parsed.prompts[0], parsed.n, options, chat, created, ident)
        echoed = self._echoed(parsed) if parsed.echo else None
        if options["max_new_tokens"] == 0:  # echo alone: the prompts and their log-probabilities, nothing generated
            return _echo_response(_echo_only(echoed, head, parsed, self.engine.generator.codec), body, hangup)
        cancels = [threading.Event() for _ in range(total)]  # one per choice: a choice that ends sets its own
        hangup.watch(cancels)

        def cancel() -> None:
            for event in cancels:
                event.set()

        try:
            events = self._choices(parsed, chat, cancels, start)
            first = next(events, None)  # admission and the request's own checks happen here: errors are still a 400
        except RequestTimeout as exc:  # still waiting for a row: 503, come back; late in its first token: 504
            return _error(503, str(exc), None, {"Retry-After": "1"}) if exc.queued else _error(504, str(exc), None)
        except KvgraphError as exc:
            raise BadRequest(str(exc)) from exc
        if first is None:  # cancelled before its first token: its client hung up while it waited
            hangup.finish()
            return _error(499, "the client closed the request", None)
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            shape = _Streamed(chat, parsed.logprobs is not None, self.engine.generator.codec, echoed)
            chunks = _chunks(itertools.chain([first], events), head, total, shape, usage, parsed.n)
            return _watched_stream(_sse(chunks, cancel, hangup), hangup)
        try:
            texts, results = _collect(itertools.chain([first], events), total)
        except RequestTimeout as exc:
            return _error(504, str(exc), None)
        except KvgraphError:
            if hangup.event.is_set():  # cancelled because the client hung up: nobody reads this
                return _error(499, "the client closed the request", None)
            raise
        finally:
            hangup.finish()
            cancel()
        tool_call = chat and tool_schema(body)[0] is not None
        answer = _completion(texts, results, head, chat, tool_call, parsed.n, self.engine.generator.codec, parsed.logprobs is not None)
        if echoed is not None:
            _prepend_echo(answer, echoed, parsed.n, self.engine.generator.codec)
        return JSONResponse(answer)

    def _echoed(self, parsed) -> list[tuple[list[int], str, list | None]]:
        """Per prompt: its token ids, its text, and (when logprobs are asked) each token's log-probability given those
        before it, read by the verify graph."""
        generator, out = self.engine.generator, []
        for prompt in parsed.prompts:
            try:
                ids = generator.request(prompt, 1).prompt_ids
                logprobs = generator.prompt_logprobs(ids, parsed.logprobs) if parsed.logprobs is not None else None
            except KvgraphError as exc:
                raise BadRequest(str(exc), "echo") from exc
            text = prompt if isinstance(prompt, str) else (generator.codec.decode(ids) if generator.codec else "")
            out.append((ids, text, None if logprobs is None else prompt_entries(ids, logprobs)))
        return out

    def _beams(self, prompt, n: int, options: dict, chat: bool, created: int, ident: str):
        """best_of > n: one beam search on its own cache (not on the engine's rows), the best n beams as the choices."""
        from fastapi.responses import JSONResponse

        options = {**{key: value for key, value in options.items() if key not in ("temperature", "top_p", "seed")}, "temperature": 0}
        try:
            ranked = self.engine.generator.generate(prompt, chat=False, num_return_sequences=n, **options)
        except KvgraphError as exc:
            raise BadRequest(str(exc)) from exc
        ranked = ranked if isinstance(ranked, list) else [ranked]
        return JSONResponse(_completion([r.text for r in ranked], ranked, {"id": ident, "created": created, "model": self.model}, chat, n=len(ranked)))

    def _choices(self, parsed, chat: bool, cancels: list[threading.Event], start: float) -> Iterator[tuple[int, Any]]:
        """(choice index, event) as the choices run: prompt p's choice j is index p * n + j and samples with seed + j."""
        options = dict(parsed.options)
        seed = options.pop("seed")
        if parsed.logprobs is not None:
            options["logprobs"] = parsed.logprobs
        streams = [self.metrics.timed(self.engine.events(prompt, chat=chat, cancel=cancels[p * parsed.n + j], timeout=self.timeout,
                                                         **options, seed=None if seed is None else seed + j), start)
                   for p, prompt in enumerate(parsed.prompts) for j in range(parsed.n)]
        if len(streams) == 1:
            return ((0, event) for event in streams[0])
        return _merged(streams)


_END = object()


def _merged(streams: list[Iterator]) -> Iterator[tuple[int, Any]]:
    """Several event streams at once, each pulled by its own thread: (index, event) in arrival order."""
    out: queue.Queue = queue.Queue()

    def pull(index: int, events: Iterator) -> None:
        try:
            for event in events:
                out.put((index, event))
        except Exception as exc:
            out.put((index, exc))
        finally:
            out.put((index, _END))

    for index, events in enumerate(streams):
        threading.Thread(target=pull, args=(index, events), name="kvgraph-choice", daemon=True).start()
    ended = 0
    while ended < len(streams):
        index, event = out.get()
        if event is _END:
            ended += 1
        elif isinstance(event, Exception):
            raise event
        else:
            yield index, event


def _collect(events: Iterator[tuple[int, Any]], n: int) -> tuple[list[str], list[GenerationResult]]:
    pieces: list[list[str]] = [[] for _ in range(n)]
    results: list[GenerationResult | None] = [None] * n
    for index, event in events:
        if isinstance(event, GenerationResult):
            results[index] = event
        else:
            pieces[index].append(event)
    if any(r is None for r in results):
        raise KvgraphError("the generation ended without a result")
    return ["".join(p) for p in pieces], results


def _usage(results: list[GenerationResult], n: int = 1) -> dict:
    prompt = sum(r.stats.prompt_tokens for r in results[::n])  # each prompt once, not once per choice
    new = sum(r.stats.new_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def _completion(texts: list[str], results: list[GenerationResult], head: dict, chat: bool, tool_call: bool = False, n: int = 1,
                codec=None, logprobs: bool = False) -> dict:
    choices = []
    for index, (text, result) in enumerate(zip(texts, results)):
        finish = FINISH.get(result.finish_reason, "stop")
        if tool_call:
            choices.append(_tool_choice(index, text, finish))
            continue
        scored = logprobs and result.logprobs is not None
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": chat_logprobs(codec, result.logprobs) if scored else None, "finish_reason": finish})
        else:
            choices.append({"index": index, "text": text, "finish_reason": finish,
                            "logprobs": completion_logprobs(codec, generated(result.logprobs)) if scored else None})
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": _usage(results, n)}


def _prepend_echo(answer: dict, echoed: list, n: int, codec) -> None:
    """echo: each choice's text (and logprobs) start with its prompt's."""
    for choice in answer["choices"]:
        ids, text, entries = echoed[choice["index"] // n]
        choice["text"] = text + choice["text"]
        if entries is not None and choice["logprobs"] is not None:
            mine = choice["logprobs"]
            prompt = completion_logprobs(codec, entries)
            shift = sum(map(len, prompt["tokens"]))
            choice["logprobs"] = {"tokens": prompt["tokens"] + mine["tokens"], "token_logprobs": prompt["token_logprobs"] + mine["token_logprobs"],
                                  "top_logprobs": prompt["top_logprobs"] + mine["top_logprobs"],
                                  "text_offset": prompt["text_offset"] + [o + shift for o in mine["text_offset"]]}


def _echo_only(echoed: list, head: dict, parsed, codec) -> dict:
    """max_tokens 0 with echo: every choice is its prompt, nothing generated."""
    choices = []
    for p, (ids, text, entries) in enumerate(echoed):
        for j in range(parsed.n):
            choices.append({"index": p * parsed.n + j, "text": text, "finish_reason": "length",
                            "logprobs": completion_logprobs(codec, entries) if entries is not None else None})
    prompt = sum(len(ids) for ids, _, _ in echoed)
    return {**head, "object": "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}}


def _echo_response(answer: dict, body: dict, hangup: Hangup):
    """The echo-only answer as JSON, or streamed: one chunk per choice, then the usage when asked."""
    from fastapi.responses import JSONResponse

    if not body.get("stream"):
        return JSONResponse(answer)
    chunks = [{**answer, "choices": [choice]} for choice in answer.pop("choices")]
    usage = answer.pop("usage")
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**answer, "choices": [], "usage": usage})
    return _watched_stream(_sse(iter(chunks), hangup.finish, hangup), hangup)


def _tool_choice(index: int, text: str, finish: str) -> dict:
    """A constrained answer {"name", "arguments"} as OpenAI's tool call (the text as content if it did not complete)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    function = {"name": call["name"], "arguments": json.dumps(call["arguments"])}
    message = {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}]}
    return {"index": index, "message": message, "finish_reason": "tool_calls"}


class _Streamed:
    """The shape of a streamed choice's chunks: chat deltas or completion text, each piece with the log-probabilities
    of its tokens when asked (completions' text_offset counted on per choice), an echoed prompt first."""

    def __init__(self, chat: bool, logprobs: bool, codec, echoed: list | None) -> None:
        self.chat, self.logprobs, self.codec, self.echoed = chat, logprobs, codec, echoed
        self.offsets: dict[int, int] = {}

    def opening(self, index: int, per_prompt: int) -> dict | None:
        """The choice's first chunk: chat's role; a completion's echoed prompt (None: nothing to open with)."""
        if self.chat:
            return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        if self.echoed is None:
            return None
        _, text, entries = self.echoed[index // per_prompt]
        scored = completion_logprobs(self.codec, entries) if self.logprobs and entries is not None else None
        self.offsets[index] = sum(len(token) for token in scored["tokens"]) if scored else 0
        return {"index": index, "text": text, "logprobs": scored, "finish_reason": None}

    def piece(self, index: int, piece: str) -> dict:
        if self.chat:
            choice = {"index": index, "delta": {"content": piece}, "finish_reason": None}
            if self.logprobs:
                choice["logprobs"] = chat_logprobs(self.codec, list(getattr(piece, "logprobs", ())))
            return choice
        choice = {"index": index, "text": piece, "finish_reason": None}
        if self.logprobs:
            scored = completion_logprobs(self.codec, generated(list(getattr(piece, "logprobs", ()))), self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + sum(len(token) for token in scored["tokens"])
            choice["logprobs"] = scored
        return choice

    def last(self, index: int, finish: str) -> dict:
        return {"index": index, "delta": {}, "finish_reason": finish} if self.chat else {"index": index, "text": "", "finish_reason": finish}


def _chunks(events: Iterator[tuple[int, Any]], head: dict, n: int, shape: _Streamed, usage: bool, per_prompt: int = 1) -> Iterator[dict]:
    head = {**head, "object": "chat.completion.chunk" if shape.chat else "text_completion"}
    for index in range(n):
        opening = shape.opening(index, per_prompt)
        if opening is not None:
            yield {**head, "choices": [opening]}
    results = {}
    for index, event in events:
        if isinstance(event, GenerationResult):
            yield {**head, "choices": [shape.last(index, FINISH.get(event.finish_reason, "stop"))]}
            results[index] = event
            continue
        yield {**head, "choices": [shape.piece(index, event)]}
    if usage and len(results) == n:
        yield {**head, "choices": [], "usage": _usage([results[i] for i in range(n)], per_prompt)}


def _streaming_response():
    from starlette.responses import StreamingResponse

    class Watched(StreamingResponse):
        """A server-sent event stream whose connection is watched while it streams: a client that hangs up between
        tokens (its socket closed, nothing left to send to) cancels the request at once, whatever the ASGI server's
        version reports on a send; a send to a closed connection ends the stream quietly."""

        def __init__(self, content, hangup: Hangup) -> None:
            super().__init__(content, media_type="text/event-stream")
            self.hangup = hangup

        async def __call__(self, scope, receive, send) -> None:
            import anyio

            async def stream() -> None:
                try:
                    await super(Watched, self).__call__(scope, receive, send)
                except OSError:  # the client went away mid-send
                    self.hangup.set()
                finally:
                    group.cancel_scope.cancel()

            async with anyio.create_task_group() as group:
                group.start_soon(stream)
                await watch_disconnect(receive, self.hangup)
                group.cancel_scope.cancel()

    return Watched


def _watched_stream(content, hangup: Hangup):
    """The Watched stream class is made on first use: starlette comes with the serve extra."""
    return _streaming_response()(content, hangup)


async def _sse(chunks: Iterator[dict], cancel: Callable[[], None], hangup: Hangup):
    """Server-sent events. An async generator, so a client that disconnects cancels it here (the
    finally runs at once) and the request ends at its next token, freeing its row. A request that
    fails mid-stream (its timeout) ends with an OpenAI-shaped error event and no [DONE]."""
    import anyio

    try:
        while True:
            try:
                chunk = await anyio.to_thread.run_sync(next, chunks, None)
            except KvgraphError as exc:
                yield f"data: {json.dumps(_error_body(504 if isinstance(exc, RequestTimeout) else 500, str(exc), None))}\n\n"
                return
            if chunk is None:
                break
            yield f"data: {json.dumps(chunk)}\n\n"
        hangup.finish()
        yield "data: [DONE]\n\n"
    finally:
        cancel()


def build_app(directory: str, max_batch: int, max_queue: int, timeout: float | None, threads: int | None, model: str, log=None,
              prefill_chunk: int | None = PREFILL_CHUNK, weights: str = "auto"):
    """Load the export, pick its engine and wrap it in the HTTP app: (app, engine). A Ray replica runs this too.
    weights: the weights policy (runtime.core.session.WEIGHT_POLICIES)."""
    engine, why = make_engine(Generator.load(directory, threads=threads, weights=weights), max_batch=max_batch, prefill_chunk=prefill_chunk)
    if log:
        log(f"kvgraph serve: {model}: {why}")
    return create_app(engine, model, max_queue, timeout), engine
