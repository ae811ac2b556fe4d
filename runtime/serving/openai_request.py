"""An OpenAI request body as kvgraph arguments: the prompt, the number of choices, the engine's options and any
constraint (response_format, a required tool call), or BadRequest naming the field at fault (the server's 400)."""

from __future__ import annotations

from dataclasses import dataclass

from kvgraph.graphs import KvgraphError
from kvgraph.runtime.serving.engine_base import Engine
from kvgraph.runtime.serving.openai_messages import MessageError, template_messages, template_tools

# The fields of OpenAI's two APIs that kvgraph reads; any other is refused by name, as OpenAI refuses it.
# user and metadata are accepted and ignored (they label a request; they do not change its answer).
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options", "presence_penalty",
          "frequency_penalty", "logit_bias", "user", "metadata", "response_format",
          "min_tokens", "top_k", "min_p", "repetition_penalty"}  # the last four: extensions, named as vLLM names them
FIELDS = {False: COMMON | {"prompt", "best_of", "echo", "logprobs", "suffix"},
          True: COMMON | {"messages", "tools", "tool_choice", "parallel_tool_calls", "max_completion_tokens", "logprobs",
                          "top_logprobs", "store", "service_tier"}}
# Fields kvgraph knows but cannot honour yet: refused when set to anything but their "off" value.
NOT_YET = {"suffix": (None, ""), "store": (None, False), "service_tier": (None, "auto", "default")}
MAX_TOP_LOGPROBS = {False: 5, True: 20}  # OpenAI's limits: completions' logprobs, chat's top_logprobs


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Parsed:
    """A request as the server runs it: its prompts (completions may send several), n choices each, the engine's
    options, and what the answer carries besides the text."""
    prompts: list
    n: int
    options: dict
    logprobs: int | None = None  # each token's log-probability with this many alternatives (None: no logprobs)
    echo: bool = False  # completions: the prompt comes back before the completion (with its logprobs, if asked)


def parse_request(engine: Engine, body: dict, chat: bool) -> Parsed:
    """The request's prompts, choices and options, or BadRequest naming the field."""
    _check_fields(body, chat)
    try:
        prompts = [_chat_prompt(engine, body)] if chat else _prompts(body)
    except KvgraphError as exc:
        raise BadRequest(str(exc), "messages" if chat else "prompt") from exc
    logprobs, echo = _logprobs(body, chat), bool(body.get("echo"))
    prompt = prompts[0]
    room = engine.generator.room(len(prompt)) if chat else None
    # a field the request leaves out: the export's generation config (as vLLM), then OpenAI's default
    config = engine.generator.defaults.settings
    default = config.get("max_new_tokens") or (room if chat and room else 16)  # chat: what the cache holds; completions: 16
    options = {"max_new_tokens": _max_tokens(body, chat, default, 0 if echo else 1),
               "min_new_tokens": _number(body, "min_tokens", int, 0, 0, None),  # an extension (vLLM's name): eos not before
               "temperature": _number(body, "temperature", (int, float), config.get("temperature", 1.0), 0, 2),
               "top_p": _number(body, "top_p", (int, float), config.get("top_p", 1.0), 0, 1),
               **_penalties(body, engine.graphs.contract.vocab_size), **_extensions(body)}
    n = _number(body, "n", int, 1, 1, engine.max_batch)
    best_of = _number(body, "best_of", int, n, n, 16)
    if best_of > n:  # the best n of best_of beams (beam search), as transformers' num_beams / num_return_sequences
        if options["temperature"] != 0 or body.get("stream") or logprobs is not None or echo or len(prompts) > 1:
            raise BadRequest("best_of > n runs a beam search: it needs temperature 0, one prompt, and no stream, logprobs or echo",
                             "best_of")
        options["num_beams"] = best_of
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("seed must be an integer", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of up to 4 strings", "stop")
    if options["top_p"] == 0:
        raise BadRequest("top_p must be greater than 0", "top_p")
    constraint = _constraint(engine, body, chat)
    if constraint is not None:
        if "num_beams" in options:
            raise BadRequest("best_of > n does not combine with response_format or tool_choice", "best_of")
        options["constraint"] = constraint
    return Parsed(prompts, n, {**options, "seed": seed, "stop": tuple(stop)}, logprobs, echo)


def _logprobs(body: dict, chat: bool) -> int | None:
    """Completions: logprobs k (the chosen token and k alternatives); chat: logprobs true with top_logprobs k."""
    limit = MAX_TOP_LOGPROBS[chat]
    if not chat:
        value = body.get("logprobs")
        return None if value is None else _number(body, "logprobs", int, 0, 0, limit)
    asked = body.get("logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise BadRequest("logprobs must be true or false", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not asked:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    return _number(body, "top_logprobs", int, 0, 0, limit) if asked else None


def _check_fields(body: dict, chat: bool) -> None:
    unknown = sorted(set(body) - FIELDS[chat])
    if unknown:
        raise BadRequest(f"unrecognized request argument: {unknown[0]}", unknown[0])
    for name, off in NOT_YET.items():
        if name in body and body[name] not in off:
            raise BadRequest(f"{name} is not supported by this server yet", name)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise BadRequest("stream_options must be {include_usage: true|false}", "stream_options")
    if options and not body.get("stream"):
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options")


def _max_tokens(body: dict, chat: bool, default: int, low: int) -> int:
    """max_tokens, or chat's max_completion_tokens (its newer name); both at once must agree."""
    given = {name: body[name] for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise BadRequest("max_tokens and max_completion_tokens disagree; send one", "max_completion_tokens")
    name = next(iter(given), "max_tokens")
    return _number({name: given.get(name)}, name, int, default, low, None)  # 0 only with echo: the prompt's logprobs alone


def _penalties(body: dict, vocab_size: int) -> dict:
    """presence_penalty and frequency_penalty (OpenAI's meaning, runtime/core/processors.py), and logit_bias as the
    runtime's sequence_bias over single tokens: {token id: bias} added to the logits before any processor."""
    options = {name: _number(body, name, (int, float), 0.0, -2, 2) for name in ("presence_penalty", "frequency_penalty")}
    bias = body.get("logit_bias")
    if bias is None:
        return options
    if not isinstance(bias, dict):
        raise BadRequest("logit_bias must map token ids to biases between -100 and 100", "logit_bias")
    biases = []
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else None
        if token is None or token >= vocab_size:
            raise BadRequest(f"logit_bias: {key!r} is not a token id of this export's vocabulary [0, {vocab_size})", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise BadRequest(f"logit_bias[{key!r}] must be a number between -100 and 100, got {value!r}", "logit_bias")
        biases.append(((token,), float(value)))
    return {**options, "sequence_bias": tuple(biases)} if biases else options


def _extensions(body: dict) -> dict:
    """top_k, min_p and repetition_penalty, as vLLM accepts them beside OpenAI's fields (only those sent)."""
    limits = {"top_k": (int, 0, None), "min_p": ((int, float), 0, 1), "repetition_penalty": ((int, float), 0, 10)}
    options = {name: _number(body, name, kind, None, low, high) for name, (kind, low, high) in limits.items() if body.get(name) is not None}
    if options.get("repetition_penalty") == 0:
        raise BadRequest("repetition_penalty must be greater than 0 (1 = off)", "repetition_penalty")
    return options


def _constraint(engine: Engine, body: dict, chat: bool):
    """response_format (json_object, json_schema) or a required tool call, as a grammar over the tokenizer."""
    from kvgraph.runtime.decoding.constrained import Constraint

    schema, param = tool_schema(body) if chat else (None, "tools")
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            schema, param = {"type": "object"}, "response_format"
        elif kind == "json_schema" and isinstance(fmt.get("json_schema"), dict) and isinstance(fmt["json_schema"].get("schema"), dict):
            schema, param = fmt["json_schema"]["schema"], "response_format"
        elif kind != "text":
            raise BadRequest("response_format must be {type: text}, {type: json_object} or {type: json_schema, json_schema: {name, schema}}",
                             "response_format")
    if schema is None:
        return None
    try:
        return Constraint.build(engine.generator, json_schema=schema)
    except KvgraphError as exc:
        raise BadRequest(str(exc), param) from exc


def tool_schema(body: dict) -> tuple[dict | None, str]:
    """tool_choice "required" or a named function: the answer is a call, {"name": ..., "arguments": {...}}."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or choice in (None, "auto", "none"):
        return None, "tools"
    if not isinstance(tools, list) or not tools or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise BadRequest("tools must be a non-empty list of {type: function, function: {name, parameters}}", "tools")
    functions = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) and choice["function"].get("name") in functions:
        functions = {choice["function"]["name"]: functions[choice["function"]["name"]]}
    elif choice != "required":
        raise BadRequest("tool_choice must be auto, none, required or {type: function, function: {name}} naming one of the tools",
                         "tool_choice")
    if body.get("stream"):
        raise BadRequest("a required tool call is not streamed here; ask without stream", "stream")
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters}, "required": ["name", "arguments"],
              "additionalProperties": False} for name, parameters in functions.items()]
    schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
    return {**schema, "x-guidance": {"whitespace_flexible": False}}, "tools"  # a call is compact JSON: no room to wander


def _chat_prompt(engine: Engine, body: dict) -> list[int]:
    reason = engine.graphs.steps.chat()
    if reason:
        raise BadRequest(f"{reason}; send the source to /v1/completions", "messages")
    try:
        messages, tools = template_messages(body.get("messages")), template_tools(body.get("tools"))
    except MessageError as exc:
        raise BadRequest(str(exc), exc.param) from exc
    return engine.generator.need_codec().encode_chat(messages, tools=tools)


def _prompts(body: dict) -> list:
    """A string, a list of token ids, or a batch of either (OpenAI's prompt array; lm-eval sends token-id lists)."""
    prompt = body.get("prompt")
    batch = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
    prompts = prompt if batch else [prompt]
    for i, one in enumerate(prompts):
        if not (isinstance(one, str) and one) and not (isinstance(one, list) and one and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in one)):
            where = f"prompt[{i}]" if batch else "prompt"
            raise BadRequest(f"{where} must be a non-empty string or a list of token ids", "prompt")
    return prompts


def _number(body: dict, name: str, kind, default, low, high):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, kind) or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise BadRequest(f"{name} must be a number {bounds}, got {value!r}", name)
    return value
