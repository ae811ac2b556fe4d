"""The OpenAI-compatible server over real HTTP on 127.0.0.1, driven by the official `openai` client and by plain
HTTP: completions, chat, streaming, n choices, stop strings, usage, errors, a full queue, timeouts, a
drain on SIGTERM, and the exports the batch engine does not take (dynamic cache, encoder-decoder).

The exports are byte-level models (they stand for ByT5-like byte vocabularies; the runtime's text
handling needs every id to be a byte): the tiny text llama with a chat template and a static cache of
96 positions; the same llama with 4,096 positions and a dynamic cache (a request long enough to time
out); a BART-shaped encoder-decoder with the byte vocabulary.
"""

from __future__ import annotations

import json
import shutil
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kvgraph.runtime import Generator
from kvgraph.runtime.serving.engine import BatchEngine, RequestEngine, make_engine
from kvgraph.runtime.serving.app import create_app


class Server:
    def __init__(self, directory, max_batch: int, max_queue: int, timeout: float | None = None) -> None:
        import uvicorn

        self.engine = make_engine(Generator.load(directory), max_batch=max_batch)[0]
        config = uvicorn.Config(create_app(self.engine, "tiny", max_queue, timeout), host="127.0.0.1", port=0, log_level="warning")
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
    running = Server(text_export_static[1], max_batch=4, max_queue=8)
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
    ({"prompt": "hi", "n": 5}, "n"),  # more choices than rows
    ({"prompt": "hi", "n": 2, "best_of": 3}, "best_of"),
    ({"prompt": [1, True]}, "prompt"),
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
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0].content"
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 10_000}, timeout=30)
    assert "exceeds the static cache's 96 positions" in response.json()["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after(text_export_static):
    small = Server(text_export_static[1], max_batch=1, max_queue=0)  # one row, nobody may wait
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
    small = Server(text_export_static[1], max_batch=1, max_queue=4)
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
    before = metric(server, "kvgraph_completion_tokens_total")
    client.completions.create(model="tiny", prompt="abc", max_tokens=7, temperature=0, extra_body={"min_tokens": 7})
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "abc", "temperature": -1}, timeout=10)
    assert metric(server, "kvgraph_completion_tokens_total") == before + 7
    assert metric(server, 'kvgraph_requests_total{endpoint="/v1/completions",status="400"}') >= 1
    assert metric(server, "kvgraph_time_to_first_token_seconds_count") >= 1 and metric(server, "kvgraph_inter_token_latency_seconds_count") >= 1
    assert metric(server, "kvgraph_rows_in_use") == 0 and metric(server, "kvgraph_queue_depth") == 0


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if not line.startswith("#") and line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_n_choices_sample_with_seed_plus_index(client, alone, server):
    assert isinstance(server.engine, BatchEngine)
    want = [alone.generate("Once upon", max_new_tokens=12, temperature=1.0, seed=7 + i).text for i in range(3)]
    out = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=1.0, seed=7, n=3)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == want and len(set(want)) > 1
    assert out.usage.completion_tokens == sum(len(alone.generate("Once upon", max_new_tokens=12, temperature=1.0, seed=7 + i).token_ids)
                                              for i in range(3))
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
                                                 temperature=1.0, seed=3, n=2, stream=True, stream_options={"include_usage": True}))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i) for i in range(2)]
    assert texts == [alone.generate("Hi", chat=True, max_new_tokens=10, temperature=1.0, seed=3 + i).text for i in range(2)]
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 2 and chunks[-1].usage is not None


def test_best_of_runs_a_beam_search_and_returns_the_best_n(client, alone):
    out = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, temperature=0, n=2, best_of=3)
    want = alone.generate("Once upon", max_new_tokens=10, num_beams=3, num_return_sequences=2)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [r.text for r in want]


def test_response_format_and_required_tool_calls_are_constrained(client, server):
    import jsonschema
    import openai

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count"}], max_tokens=40, seed=seed,
                                             response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": schema}})
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    started = client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert started.choices[0].text.lstrip().startswith("{")
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}
    call = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}], max_tokens=60,
                                          tools=[weather, clock], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert call.choices[0].finish_reason == "tool_calls"
    function = call.choices[0].message.tool_calls[0].function
    assert function.name == "get_weather" and json.loads(function.arguments)["city"] in ("Paris", "Oslo")
    anyone = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Help"}], max_tokens=60,
                                            tools=[weather, clock], tool_choice="required")
    assert anyone.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    for bad, param in (({"response_format": {"type": "xml"}}, "response_format"),
                       ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3,
                                                                                                             "maximum": 1}}}}, "response_format"),
                       ({"tools": [weather], "tool_choice": "sometimes"}, "tool_choice")):
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], **bad}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_chat_without_max_tokens_may_fill_the_cache(client, alone):
    """OpenAI's chat default: as many tokens as the context holds (completions keep 16)."""
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                         extra_body={"min_tokens": 200})
    prompt = len(alone.codec.encode_chat([{"role": "user", "content": "Hi"}]))
    assert out.usage.completion_tokens == 96 - prompt and out.choices[0].finish_reason == "length"


LONG = {"prompt": "abc", "max_tokens": 3000, "min_tokens": 3000}


def test_a_dynamic_export_is_served_one_cache_per_request(long_export):
    alone = Generator.load(long_export)
    with _Served(long_export, max_batch=2, max_queue=4) as server:
        assert isinstance(server.engine, RequestEngine) and httpx.get(f"{server.url}/health").json()["engine"] == "one cache per request"
        prompts = ["abc", "Once upon a time", "x", "Hello"]
        got = [None] * 4

        def ask(i):
            got[i] = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompts[i], "max_tokens": 30, "temperature": 0},
                                timeout=60).json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert got == [alone.generate(p, max_new_tokens=30).text for p in prompts]


def test_requests_past_their_timeout_end_and_free_their_row(long_export):
    with _Served(long_export, max_batch=1, max_queue=4, timeout=0.2) as server:
        late = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=60)  # 3,000 tokens take longer than 0.2 s
        assert late.status_code == 504 and "timed out (0.2 s) after" in late.json()["error"]["message"]
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200 and len(events) > 2 and "[DONE]" not in events[-1]
        assert json.loads(events[-1][6:])["error"]["type"] == "timeout"
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=60)))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(timeout=60)
        assert [a.status_code for a in answers] in ([504, 504], [504, 503])  # the second got the row once the first let go, or never
        assert server.engine.load == 0
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "abc", "max_tokens": 5}, timeout=30).status_code == 200


@pytest.fixture(scope="module")
def seq2seq_text_export(tmp_path_factory):
    """A BART-shaped encoder-decoder on the byte vocabulary (pad 0, bos 1, eos 2 = decoder start), with its tokenizer."""
    from tiny_models import byte_tokenizer, tiny_seq2seq
    from kvgraph.export import export_model

    model_dir = tmp_path_factory.mktemp("hf") / "byte-bart"
    tiny_seq2seq("bart", vocab_size=260, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    return export_model(model_dir, tmp_path_factory.mktemp("exports") / "byte-bart").directory


def test_an_encoder_decoder_export_serves_completions(seq2seq_text_export):
    import openai

    alone = Generator.load(seq2seq_text_export)
    with _Served(seq2seq_text_export, max_batch=2, max_queue=2) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="tiny", prompt="translate this", max_tokens=12, temperature=0, extra_body={"min_tokens": 12})
        want = alone.generate("translate this", max_new_tokens=12, min_new_tokens=12)
        assert out.choices[0].text == want.text and out.usage.completion_tokens == 12 == len(want.token_ids)
        with pytest.raises(openai.BadRequestError, match="encoder-decoder: it has no chat turns"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


class _Served(Server):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_sigterm_drains_running_requests_then_exits(long_export):
    """kvgraph serve as a process: SIGTERM stops accepting, lets the running stream finish, exits 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "kvgraph.runtime.commands.main", "serve", str(long_export), "--port", str(port),
                                "--grace", "30"], stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_healthy(url, process)
        with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(f"{url}/health", timeout=5)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_serve_weights_mapped_answers_as_generate_alone(text_export_static, alone):
    """kvgraph serve --weights mapped (the least memory): the same greedy completion as the default policy's Generator."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "kvgraph.runtime.commands.main", "serve", str(text_export_static[1]), "--port",
                                str(port), "--weights", "mapped"], stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_healthy(url, process)
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Once upon", "max_tokens": 12, "temperature": 0}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == alone.generate("Once upon", max_new_tokens=12).text
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_healthy(url: str, process, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"kvgraph serve exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError("kvgraph serve did not become healthy")


@pytest.mark.parametrize("argv,message", [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--replicas", "2"], "--replicas, --max-replicas and --ray-address need --ray"),
    (["--ray", "--replicas", "3", "--max-replicas", "2"], "--max-replicas (2) must be >= --replicas (3)"),
    (["--request-timeout", "-1"], "--request-timeout must be >= 0"),
])
def test_serve_refuses_bad_options_in_one_line(text_export_static, capsys, argv, message):
    from kvgraph.runtime.commands.main import main

    assert main(["serve", str(text_export_static[1]), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_serve_refuses_a_directory_that_is_not_an_export(tmp_path, capsys):
    from kvgraph.runtime.commands.main import main

    assert main(["serve", str(tmp_path)]) == 1
    assert "not a kvgraph export (no kvgraph.json)" in capsys.readouterr().err


def test_fields_a_request_leaves_out_come_from_the_generation_config(text_export_static, tmp_path):
    """A checkpoint that samples with top_k 1 and asks for 7 new tokens: a request with neither temperature nor max_tokens
    gets exactly the greedy 7 tokens, over HTTP; one that names them gets its own."""
    import openai

    served = tmp_path / "export"
    shutil.copytree(text_export_static[1], served)
    (served / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 1, "temperature": 1.3, "max_new_tokens": 7}))
    running = Server(served, max_batch=2, max_queue=2)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="tiny", prompt="Once upon")
        want = Generator.load(text_export_static[1]).generate("Once upon", max_new_tokens=7)
        assert out.choices[0].text == want.text and out.usage.completion_tokens == want.stats.new_tokens
        own = client.completions.create(model="tiny", prompt="Once upon", max_tokens=3, temperature=0)
        assert own.usage.completion_tokens == 3 and want.text.startswith(own.choices[0].text)
    finally:
        running.close()
