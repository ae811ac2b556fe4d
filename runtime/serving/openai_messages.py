"""Chat messages as OpenAI clients send them, as the model's chat template takes them.

- content: a string, or a list of parts; text parts are joined with newlines (as vLLM joins them). Image, audio and
  file parts are refused by name: a text export cannot read them.
- roles: system, developer (passed to the template as system, as OpenAI's own models read it), user, assistant, tool.
- an assistant's tool_calls and a tool message's tool_call_id go to the template as transformers passes them (the
  arguments parsed from their JSON string, as chat templates expect a mapping); the request's tools too.

Every refusal is (message, param) naming the message and field at fault, for the server's 400.
"""

from __future__ import annotations

import json

ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT_PART = "text"
OTHER_PARTS = ("image_url", "input_audio", "file", "refusal")


class MessageError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def template_messages(messages) -> list[dict]:
    """The request's messages as the chat template takes them, or MessageError."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list of {role, content} objects", "messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def template_tools(tools) -> list[dict] | None:
    """The request's tools for the template (None when it sends none)."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise MessageError("tools must be a list of {type: function, function: {name, description, parameters}}", "tools")
    return tools


def _message(message, where: str) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise MessageError(f"{where} must be an object with a role and content", where)
    role = message["role"]
    if role not in ROLES:
        raise MessageError(f"{where}.role {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
    out = {"role": "system" if role == "developer" else role, "content": _content(message.get("content"), role, where)}
    if role == "assistant" and message.get("tool_calls") is not None:
        out["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
    elif out["content"] is None:
        raise MessageError(f"{where}.content is missing: only an assistant message with tool_calls may leave it out", f"{where}.content")
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise MessageError(f"{where}.tool_call_id must be the id of the call this message answers", f"{where}.tool_call_id")
        out["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _content(content, role: str, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MessageError(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == TEXT_PART and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in OTHER_PARTS:
            raise MessageError(f"{at} is a {kind} part: this export reads text only (send text parts)", at)
        else:
            raise MessageError(f"{at} must be a content part such as {{type: text, text: ...}}", at)
    return "\n".join(texts)


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise MessageError(f"{where} must be a list of {{id, type: function, function: {{name, arguments}}}}", where)
    out = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise MessageError(f"{where}[{k}] must be {{id, type: function, function: {{name, arguments}}}}", f"{where}[{k}]")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise MessageError(f"{where}[{k}].function.arguments is not JSON: {exc}", f"{where}[{k}].function.arguments") from exc
        out.append({"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out
