"""Text in and out: the saved tokenizer.json, the model's chat template, incremental decoding."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from kvgraph.graphs import KvgraphError
from kvgraph.graphs.safety import check_inside

INCOMPLETE = "\ufffd"  # what a decoder yields for a partial multi-byte character


class TextCodec:
    """Tokenizer plus chat template of one export directory."""

    def __init__(self, directory: Path) -> None:
        path = check_inside(directory, "tokenizer.json", str(directory))
        if not path.is_file():
            raise KvgraphError(f"{path}: no tokenizer in this export; pass token ids instead of text")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise KvgraphError(f"{path}: cannot read the tokenizer: {exc}") from exc
        config = _read_json(check_inside(directory, "tokenizer_config.json", str(directory)))
        self.special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token")}
        template_path = check_inside(directory, "chat_template.jinja", str(directory))
        self.chat_template = template_path.read_text(encoding="utf-8") if template_path.is_file() else config.get("chat_template")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's own text, special tokens included (a piece of a multi-byte character shows as U+FFFD)."""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The model's own chat template, rendered in a sandbox (no access to Python internals); tools as
        transformers' apply_chat_template passes them (None: the template's own default)."""
        if not self.chat_template:
            raise KvgraphError("this export has no chat template (chat_template.jinja); use a plain prompt")
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_template_error
        try:
            template = environment.from_string(self.chat_template)
            extra = {"tools": tools} if tools is not None else {}
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra, **self.special)
        except TemplateError as exc:
            raise KvgraphError(f"the chat template failed to render: {exc}") from exc

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        # The rendered template already holds any special tokens it wants (as transformers does).
        return self.encode(self.render_chat(messages, tools=tools), add_special_tokens=False)


class IncrementalText:
    """Text of a growing token list, released only once characters are complete.

    `push` returns the new text since the last call; the concatenation of all pushes plus
    `finish()` equals decode(all ids). `hold` characters are kept back (for stop strings).
    """

    def __init__(self, codec: TextCodec, hold: int = 0) -> None:
        self.codec = codec
        self.hold = hold
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith(INCOMPLETE):
            return ""
        return self._release(text, len(text) - self.hold)

    def finish(self, text: str) -> str:
        """The rest of the final text (after stop-string cutting)."""
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = text[self.emitted:upto]
        self.emitted = upto
        return piece


def _raise_template_error(message: str):
    raise TemplateError(message)


def _token_text(value) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KvgraphError(f"{path}: cannot read: {exc}") from exc
    return data if isinstance(data, dict) else {}
