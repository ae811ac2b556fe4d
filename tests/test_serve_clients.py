"""The server as real clients use it, over HTTP on 127.0.0.1: chat content as a list of parts, the developer role,
tool calls in the history, max_completion_tokens, logit_bias, OpenAI's penalties, fields refused by name, an
OpenAI-shaped error for any body, path or method, clients that hang up (a raw socket closed mid-stream, a client
that gives up waiting), and a burst of hostile requests after which the server still answers as before.

The exports are the byte-level tiny llama of test_serve.py (ids 3..258 are the bytes): static with 96 positions,
and static with 4,096 positions where a request must run long enough to be hung up on.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from urllib.parse import urlparse

import httpx
import jinja2
import pytest

from kvgraph.runtime import Generator
from test_serve import Server, metric
from tiny_models import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def server(text_export_static):
    running = Server(text_export_static[1], max_batch=4, max_queue=4)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def alone(text_export_static):
    return Generator.load(text_export_static[1])


def _expected_prompt(messages: list[dict]) -> str:
    """The tiny chat template rendered by jinja2 itself, on messages written as the template should receive them."""
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True, bos_token="<s>")


def test_content_parts_and_the_developer_role_are_read_as_transformers_templates_read_them(client, alone):
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "developer", "content": "be brief"},
                                                                      {"role": "user", "content": parts}],
                                            temperature=0, max_tokens=8)
    expected = _expected_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"}])
    ids = alone.codec.encode(expected, add_special_tokens=False)
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.choices[0].message.content == alone.generate(ids, max_new_tokens=8).text


def test_tool_calls_in_the_history_reach_the_template(client, alone):
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}]
    answer = client.chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=4)
    expected = _expected_prompt([{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None},
                                 {"role": "tool", "content": "sunny"}])
    assert answer.usage.prompt_tokens == len(alone.codec.encode(expected, add_special_tokens=False))

    from kvgraph.runtime.serving.openai_messages import template_messages

    call = template_messages(history)[1]["tool_calls"][0]
    assert call["function"] == {"name": "weather", "arguments": {"city": "Paris"}}  # a mapping, as chat templates expect


@pytest.mark.parametrize("part, param", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "messages[0].content[1]"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "messages[0].content[1]"),
    ({"type": "text"}, "messages[0].content[1]"),
])
def test_parts_a_text_export_cannot_read_are_refused_by_name(server, part, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    if part["type"] != "text":
        assert part["type"] in response.json()["error"]["message"]


def test_max_completion_tokens_bounds_the_answer(client, server):
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                            max_completion_tokens=5, extra_body={"min_tokens": 5})
    assert answer.usage.completion_tokens == 5 and answer.choices[0].finish_reason == "length"
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                     "max_tokens": 4, "max_completion_tokens": 5}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_completion_tokens"


def test_logit_bias_forces_a_token(client, alone):
    [z] = alone.codec.encode("z", add_special_tokens=False)
    answer = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0, logit_bias={str(z): 100},
                                       extra_body={"min_tokens": 6})
    assert answer.choices[0].text == "zzzzzz"
    banned = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0, logit_bias={str(z): -100},
                                       extra_body={"min_tokens": 12})
    assert "z" not in banned.choices[0].text


def test_penalties_change_greedy_output_as_the_runtime_does(client, alone):
    plain = alone.generate("abc", max_new_tokens=40, min_new_tokens=40)
    penalised = alone.generate("abc", max_new_tokens=40, min_new_tokens=40, presence_penalty=1.5, frequency_penalty=2.0)
    assert penalised.token_ids != plain.token_ids  # the penalties do something on this model
    answer = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0, presence_penalty=1.5,
                                       frequency_penalty=2.0, extra_body={"min_tokens": 40})
    assert answer.choices[0].text == penalised.text


@pytest.mark.parametrize("endpoint, extra, param", [
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"functions": []}, "functions"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("chat/completions", {"echo": True}, "echo"),
    ("chat/completions", {"modalities": ["audio"]}, "modalities"),
    ("chat/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("chat/completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_fields_the_server_does_not_honour_are_refused_by_name(server, endpoint, extra, param):
    body = {"model": "tiny", **({"prompt": "hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]}), **extra}
    response = httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def _torch_logprobs(model, ids: list[int]):
    """log-softmax of transformers' logits at every position of ids (float64): row i predicts ids[i + 1]."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()


def test_chat_logprobs_are_the_models_own(client, alone, text_export_static):
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                            max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"min_tokens": 6})
    ids = alone.codec.encode_chat([{"role": "user", "content": "hi"}])
    new = alone.generate(ids, max_new_tokens=6, min_new_tokens=6).token_ids
    reference = _torch_logprobs(text_export_static[0], ids + new)
    content = answer.choices[0].logprobs.content
    assert [c.token for c in content] == [alone.codec.token_text(t) for t in new]
    for i, (entry, token) in enumerate(zip(content, new)):
        row = reference[len(ids) - 1 + i]
        assert entry.logprob == pytest.approx(row[token], abs=1e-4)
        best = row.argsort()[::-1][:3]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row[best].tolist(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_echo_logprobs_score_the_prompt_as_pytorch_does(client, alone, text_export_static):
    """What lm-evaluation-harness's local-completions sends to score a continuation: token ids, echo, logprobs, and 1 or
    0 new tokens; the prompt's log-probabilities equal PyTorch's log-softmax to 1e-4."""
    prompts = [alone.codec.encode("the cat sat"), alone.codec.encode("a dog ran far")]
    answer = client.completions.create(model="tiny", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1]
    for choice, ids in zip(answer.choices, prompts):
        new = alone.generate(ids, max_new_tokens=1).token_ids
        reference = _torch_logprobs(text_export_static[0], ids + new)
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
        assert lp.token_logprobs[1:] == pytest.approx([reference[i, t] for i, t in enumerate((ids + new)[1:])], abs=1e-4)
        assert [max(top.values()) for top in lp.top_logprobs[1:]] == pytest.approx(reference[:len(ids)].max(-1).tolist(), abs=1e-4)
        assert choice.text == alone.codec.decode(ids) + alone.codec.decode(new)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert answer.usage.prompt_tokens == sum(map(len, prompts)) and answer.usage.completion_tokens == 2

    scored = client.completions.create(model="tiny", prompt="the cat sat", echo=True, logprobs=0, max_tokens=0)
    ids = alone.codec.encode("the cat sat")
    assert scored.choices[0].text == "the cat sat" and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [row[t] for row, t in zip(_torch_logprobs(text_export_static[0], ids), ids[1:])], abs=1e-4)


def test_streamed_logprobs_are_those_of_the_answer_at_once(client):
    """Each streamed chunk carries its own tokens' log-probabilities: gathered, they are the non-streamed answer's (chat,
    and completions with echo, where the prompt and its log-probabilities come first and text_offset runs on)."""
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=7, logprobs=True,
                top_logprobs=2, extra_body={"min_tokens": 7})
    whole = client.chat.completions.create(**chat).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**chat, stream=True) if c.choices]
    streamed = [entry for c in chunks if c.logprobs for entry in c.logprobs.content]
    assert [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in whole.logprobs.content]
    assert "".join(c.delta.content or "" for c in chunks) == whole.message.content

    completion = dict(model="tiny", prompt="the cat", echo=True, logprobs=2, max_tokens=5, temperature=0, extra_body={"min_tokens": 5})
    whole = client.completions.create(**completion).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**completion, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text and whole.text.startswith("the cat")
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in chunks if c.logprobs for v in getattr(c.logprobs, key)] == getattr(whole.logprobs, key), key


def test_a_batch_of_prompts_answers_each_as_alone(client, alone):
    answer = client.completions.create(model="tiny", prompt=["abc", "xyz"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    expected = [alone.generate(p, max_new_tokens=5).text for p in ("abc", "xyz")]
    assert [c.text for c in answer.choices] == [expected[0], expected[0], expected[1], expected[1]]


def test_user_and_metadata_are_accepted_and_change_nothing(client, alone):
    answer = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0, user="someone",
                                       extra_body={"metadata": {"run": "1"}})
    assert answer.choices[0].text == alone.generate("abc", max_new_tokens=6).text


@pytest.mark.parametrize("method, path, content, status", [
    ("POST", "/v1/completions", b'{"prompt": "hi",', 400),
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
    ("POST", "/v1/completions", b'"just a string"', 400),
    ("POST", "/v1/chat/completions", b"", 400),
    ("GET", "/v1/nothing-here", None, 404),
    ("GET", "/v1/completions", None, 405),
    ("DELETE", "/v1/chat/completions", None, 405),
])
def test_every_error_is_openai_shaped(server, method, path, content, status):
    response = httpx.request(method, f"{server.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]


def _running(server) -> int:
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    return health["running"] + health["waiting"]


def _wait_idle(server, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while _running(server) and time.time() < deadline:
        time.sleep(0.02)


@pytest.fixture
def long_server(long_export_static):
    running = Server(long_export_static, max_batch=2, max_queue=2)
    yield running
    running.close()


LONG = {"prompt": "abc", "max_tokens": 4000, "min_tokens": 4000}


def test_a_stream_whose_socket_is_closed_frees_its_row(long_server):
    """As Python's http.client hangs up: 200 bytes of the stream read, then the socket closed."""
    before = metric(long_server, "kvgraph_cancelled_requests_total")
    url = urlparse(long_server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({**LONG, "stream": True}), {"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and len(response.read(200)) == 200
    connection.sock.close()
    connection.close()
    _wait_idle(long_server)
    assert _running(long_server) == 0
    assert long_server.engine.steps_run < 4000 - 1  # it ended early, not at max_tokens
    assert metric(long_server, "kvgraph_cancelled_requests_total") == before + 1


def test_a_client_that_gives_up_waiting_frees_its_row(long_server):
    """A non-streaming request whose client times out: its row is freed, not kept until max_tokens."""
    before = metric(long_server, "kvgraph_cancelled_requests_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{long_server.url}/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.3))
    _wait_idle(long_server)
    assert _running(long_server) == 0 and long_server.engine.steps_run < 4000 - 1
    assert metric(long_server, "kvgraph_cancelled_requests_total") == before + 1
    answer = httpx.post(f"{long_server.url}/v1/completions", json={"prompt": "abc", "max_tokens": 5, "temperature": 0}, timeout=30)
    assert answer.status_code == 200


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_abuse_gets_no_500_no_traceback_and_every_row_back(long_server, long_export_static, capfd):
    records = _Records()
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "kvgraph"):
        logging.getLogger(name).addHandler(records)
    statuses: list[int] = []
    lock = threading.Lock()

    def note(status: int) -> None:
        with lock:
            statuses.append(status)

    hostile = [b"{", b"\xff" * 64, b"[]", b"null", json.dumps({"prompt": "x" * 5000}).encode(),
               json.dumps({"prompt": "hi", "max_tokens": -1}).encode(), json.dumps({"messages": "hi"}).encode(),
               json.dumps({"prompt": [[1, 2]]}).encode(), json.dumps({"prompt": "hi", "n": 10 ** 9}).encode()]

    def send_hostile(raw: bytes) -> None:
        for path in ("/v1/completions", "/v1/chat/completions"):
            note(httpx.post(f"{long_server.url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=30).status_code)

    def abandon_stream() -> None:
        url = urlparse(long_server.url)
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        connection.request("POST", "/v1/completions", json.dumps({**LONG, "stream": True}), {"content-type": "application/json"})
        response = connection.getresponse()
        note(response.status)
        response.read(64)
        connection.sock.close()

    def give_up() -> None:
        try:
            note(httpx.post(f"{long_server.url}/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.2)).status_code)
        except httpx.ReadTimeout:
            pass

    def burst() -> None:
        note(httpx.post(f"{long_server.url}/v1/completions", json={"prompt": "abc", "max_tokens": 200, "min_tokens": 200}, timeout=60).status_code)

    try:
        jobs = [*(lambda raw=raw: send_hostile(raw) for raw in hostile), *[abandon_stream] * 6, *[give_up] * 4, *[burst] * 24]
        threads = [threading.Thread(target=job) for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        _wait_idle(long_server, 60)
        assert _running(long_server) == 0 and long_server.engine.free_rows == 2
        assert statuses and all(status < 500 for status in statuses), sorted(statuses)
        assert {200, 400, 429} <= set(statuses)
        mine = httpx.post(f"{long_server.url}/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0}, timeout=30)
        assert mine.json()["choices"][0]["text"] == Generator.load(long_export_static).generate("abc", max_new_tokens=8).text
    finally:
        for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "kvgraph"):
            logging.getLogger(name).removeHandler(records)
    tracebacks = [r.getMessage() for r in records.records if r.exc_info or "Traceback" in r.getMessage()]
    assert tracebacks == []
    assert "Traceback" not in capfd.readouterr().err


def test_tokenize_and_detokenize_round_trip_as_the_export_tokenizes(server, alone):
    reply = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "prompt": "héllo"}, timeout=30).json()
    assert reply["tokens"] == alone.codec.encode("héllo") and reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 96
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
                      timeout=30).json()
    assert chat["tokens"] == alone.codec.encode(_expected_prompt([{"role": "user", "content": "hi"}]), add_special_tokens=False)
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": reply["tokens"]}, timeout=30).json()
    assert back == {"prompt": "héllo"}
    for path, body, param in (("/tokenize", {"prompt": 3}, "prompt"), ("/tokenize", {}, "prompt"),
                              ("/detokenize", {"tokens": [10 ** 6]}, "tokens"), ("/tokenize", {"text": "x"}, "text")):
        response = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (path, body, response.text)
