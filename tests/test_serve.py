"""The OpenAI-compatible server over real HTTP on 127.0.0.1, driven by the official `openai` client and by plain
HTTP: completions, chat, streaming, stop strings, usage, errors, a full queue.

The export is the tiny byte-level text model with a chat template, static cache of 96 positions.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from kvgraph.runtime import Generator
from kvgraph.runtime.engine import BatchEngine
from kvgraph.runtime.server import create_app


class _Server:
    def __init__(self, directory, max_batch: int, max_queue: int) -> None:
        import uvicorn

        self.engine = BatchEngine(Generator.load(directory), max_batch=max_batch)
        config = uvicorn.Config(create_app(self.engine, "tiny", max_queue), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


@pytest.fixture(scope="module")
def server(text_export_static):
    running = _Server(text_export_static[1], max_batch=4, max_queue=8)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def alone(text_export_static):
    return Generator.load(text_export_static[1])


def test_completions_and_chat_equal_generate_alone(client, alone):
    out = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0)
    want = alone.generate("Once upon", max_new_tokens=12)
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish_reason]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (want.stats.prompt_tokens, want.stats.new_tokens)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}], max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == alone.generate("Hi there", chat=True, max_new_tokens=10).text
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streams_concatenate_to_the_whole_answer_and_report_usage(client):
    whole = client.completions.create(model="tiny", prompt="The sea", max_tokens=16, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="The sea", max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell"}], max_tokens=8,
                                               temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text(client, alone):
    full = alone.generate("Once upon", max_new_tokens=20).text
    stop = full[3:5]
    out = client.completions.create(model="tiny", prompt="Once upon", max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_concurrent_clients_get_their_own_tokens(client, alone):
    prompts = ["abc", "Once upon a time", "x", "Hello world, this is", "zz", "The"]
    want = [alone.generate(p, max_new_tokens=15, min_new_tokens=15).text for p in prompts]
    got = [None] * len(prompts)

    def ask(i):
        got[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=15, temperature=0,
                                           extra_body={"min_tokens": 15}).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert got == want


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "max_tokens": 10_000}, None),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "stop": 7}, "stop"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "seed": "x"}, "seed"),
    ({"prompt": "hi", "n": 3}, "n"),
])
def test_bad_requests_get_400_with_an_openai_error_body(server, body, param):
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_bad_bodies_and_chat_messages_get_400(server):
    for raw in (b"{not json", b"[1, 2]"):
        response = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == 400 and "error" in response.json()
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user"}]}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 10_000}, timeout=30)
    assert "exceeds the static cache's 96 positions" in response.json()["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after(text_export_static):
    small = _Server(text_export_static[1], max_batch=1, max_queue=0)  # one row, nobody may wait
    try:
        answers = []

        def ask():
            answers.append(httpx.post(f"{small.url}/v1/completions", json={"prompt": "abc", "max_tokens": 80, "min_tokens": 80},
                                      timeout=60))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        codes = sorted(a.status_code for a in answers)
        assert set(codes) == {200, 429} and codes.count(200) >= 1, codes
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_exceeded"
        assert httpx.post(f"{small.url}/v1/completions", json={"prompt": "abc", "max_tokens": 5}, timeout=30).status_code == 200
    finally:
        small.close()


def test_a_client_that_goes_away_frees_its_row(text_export_static):
    small = _Server(text_export_static[1], max_batch=1, max_queue=4)
    try:
        with httpx.stream("POST", f"{small.url}/v1/completions", json={"prompt": "abc", "max_tokens": 90, "min_tokens": 90,
                                                                      "stream": True}, timeout=60) as response:
            next(response.iter_lines())  # admitted and streaming; then the client hangs up
        deadline = time.time() + 10
        while small.engine.load and time.time() < deadline:
            time.sleep(0.02)
        assert small.engine.load == 0 and small.engine.free_rows == 1
        assert httpx.post(f"{small.url}/v1/completions", json={"prompt": "abc", "max_tokens": 5}, timeout=30).status_code == 200
    finally:
        small.close()


def test_health_and_metrics(server, client):
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
    assert json.loads(httpx.get(f"{server.url}/v1/models", timeout=10).text)["object"] == "list"
    before = _metric(server, "kvgraph_completion_tokens_total")
    client.completions.create(model="tiny", prompt="abc", max_tokens=7, temperature=0, extra_body={"min_tokens": 7})
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "abc", "temperature": -1}, timeout=10)
    assert _metric(server, "kvgraph_completion_tokens_total") == before + 7
    assert _metric(server, 'kvgraph_requests_total{endpoint="/v1/completions",status="400"}') >= 1
    assert _metric(server, "kvgraph_time_to_first_token_seconds_count") >= 1 and _metric(server, "kvgraph_inter_token_latency_seconds_count") >= 1
    assert _metric(server, "kvgraph_rows_in_use") == 0 and _metric(server, "kvgraph_queue_depth") == 0


def _metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if not line.startswith("#") and line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
