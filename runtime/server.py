"""An OpenAI-compatible HTTP server over the continuous-batching engine (the `serve` extra: FastAPI, uvicorn).

    app = create_app(BatchEngine(Generator.load("out-static/"), max_batch=8), model="smollm2", max_queue=64)

Endpoints: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with
`stream` as server-sent events ending in `data: [DONE]`, and `stream_options.include_usage`).
Bad input is answered 400 with an OpenAI-shaped error body naming the field; a full queue 429 with
Retry-After; nothing a client sends is a 500.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from typing import Any, Iterator

from ..graphs import KvgraphError
from .engine import BatchEngine
from .generator import GenerationResult

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "interrupted": "stop"}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Metrics:
    """Prometheus metrics of one app (its own registry): requests by endpoint and status, tokens in and
    out, time to first token and inter-token latency, queue depth and rows in use."""

    def __init__(self, engine: BatchEngine) -> None:
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


def create_app(engine: BatchEngine, model: str, max_queue: int = 64):
    from fastapi import Body, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI(title="kvgraph")
    metrics = Metrics(engine)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
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

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "requests": engine.load}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "kvgraph"}]}

    # plain `def` endpoints: FastAPI runs them in its thread pool, where waiting on the engine blocks no one else
    @app.post("/v1/completions")
    def completions(body: dict[str, Any] = Body(...)):
        return _respond(engine, metrics, model, max_queue, body, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(body: dict[str, Any] = Body(...)):
        return _respond(engine, metrics, model, max_queue, body, chat=True)

    return app


def _error(status: int, message: str, param: str | None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status == 400 else "rate_limit_exceeded" if status == 429 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status, headers=headers)


def _respond(engine: BatchEngine, metrics: Metrics, model: str, max_queue: int, body: dict, chat: bool):
    from fastapi.responses import JSONResponse, StreamingResponse

    start = time.perf_counter()
    prompt, options = _parse(engine, body, chat)
    if engine.load >= engine.max_batch + max_queue:
        return _error(429, f"the server is full ({engine.max_batch} rows busy, {max_queue} requests waiting); retry later", None,
                      {"Retry-After": "1"})
    created, ident = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    cancel = threading.Event()
    try:
        events = metrics.timed(engine.events(prompt, chat=chat, cancel=cancel, **options), start)
        first = next(events)  # admission and the request's own checks happen here: errors are still a 400
    except KvgraphError as exc:
        raise BadRequest(str(exc)) from exc
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_sse(_chunks(first, events, ident, created, model, chat, usage), cancel), media_type="text/event-stream")
    text, result = _collect(first, events)
    return JSONResponse(_completion(text, result, ident, created, model, chat))


def _parse(engine: BatchEngine, body: dict, chat: bool) -> tuple[Any, dict]:
    """The prompt and the engine's options, or BadRequest naming the field."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} objects with string values", "messages")
        prompt = engine.generator.need_codec().encode_chat([{"role": m["role"], "content": m["content"]} for m in messages])
    else:
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            raise BadRequest("prompt must be a non-empty string or a list of token ids", "prompt")
    options = {"max_new_tokens": _number(body, "max_tokens", int, 16, 1, None),
               "min_new_tokens": _number(body, "min_tokens", int, 0, 0, None),  # an extension (vLLM's name): eos not before
               "temperature": _number(body, "temperature", (int, float), 1.0, 0, 2),
               "top_p": _number(body, "top_p", (int, float), 1.0, 0, 1)}
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("seed must be an integer", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of up to 4 strings", "stop")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1 (more choices per request are not served yet)", "n")
    if options["top_p"] == 0:
        raise BadRequest("top_p must be greater than 0", "top_p")
    return prompt, {**options, "seed": seed, "stop": tuple(stop)}


def _number(body: dict, name: str, kind, default, low, high):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, kind) or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise BadRequest(f"{name} must be a number {bounds}, got {value!r}", name)
    return value


def _collect(first, events) -> tuple[str, GenerationResult]:
    pieces = []
    for event in itertools.chain([first], events):
        if isinstance(event, GenerationResult):
            return "".join(pieces), event
        pieces.append(event)
    raise KvgraphError("the generation ended without a result")


def _usage(result: GenerationResult) -> dict:
    prompt, new = result.stats.prompt_tokens, result.stats.new_tokens
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def _completion(text: str, result: GenerationResult, ident: str, created: int, model: str, chat: bool) -> dict:
    finish = FINISH.get(result.finish_reason, "stop")
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
              else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": _usage(result)}


def _chunks(first, events, ident: str, created: int, model: str, chat: bool, usage: bool) -> Iterator[dict]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": ident, "object": kind, "created": created, "model": model}
    if chat:
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    for event in itertools.chain([first], events):
        if isinstance(event, GenerationResult):
            finish = FINISH.get(event.finish_reason, "stop")
            last = {"index": 0, "delta": {}, "finish_reason": finish} if chat else {"index": 0, "text": "", "finish_reason": finish}
            yield {**head, "choices": [last]}
            if usage:
                yield {**head, "choices": [], "usage": _usage(event)}
            return
        piece = {"index": 0, "delta": {"content": event}, "finish_reason": None} if chat else {"index": 0, "text": event, "finish_reason": None}
        yield {**head, "choices": [piece]}


async def _sse(chunks: Iterator[dict], cancel: threading.Event):
    """Server-sent events. An async generator, so a client that disconnects cancels it here (the
    finally runs at once) and the request ends at its next token, freeing its row."""
    import anyio

    try:
        while True:
            chunk = await anyio.to_thread.run_sync(next, chunks, None)
            if chunk is None:
                break
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()
