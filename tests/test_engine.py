"""Continuous batching (runtime/serving/engine.py): requests arriving at different times, with different prompt
lengths and finishing at different steps, get exactly the tokens Generator.generate gives each alone.

The model stands for SmolLM2-135M (49,152-token vocabulary, tied embedding, grouped KV heads).
"""

from __future__ import annotations

import threading
import time

import pytest

from kvgraph.graphs import KvgraphError
from kvgraph.runtime import Generator
from kvgraph.runtime.serving.engine import BatchEngine, RequestEngine, RequestTimeout


@pytest.fixture(scope="module")
def static_export(tmp_path_factory):
    from tiny_models import tiny_model

    from kvgraph.export import export_model

    model = tiny_model("llama", vocab_size=49152, tie_word_embeddings=True)
    return export_model(model, tmp_path_factory.mktemp("engine") / "static", cache="static", max_length=64).directory


# (start delay s, prompt, max_new_tokens): staggered, 5 lengths, finishing at different steps
REQUESTS = [(0.000, [1, 523, 8891, 77], 40), (0.000, [1, 4012, 33, 9, 12000, 48000, 5], 9), (0.005, [1, 9], 50),
            (0.010, [1, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86], 34), (0.015, [1, 31000, 2, 31001], 45), (0.020, [1, 600, 601], 6)]


def test_batched_tokens_equal_each_request_alone(static_export):
    alone = Generator.load(static_export)
    want = [alone.generate(prompt, max_new_tokens=new, min_new_tokens=new).token_ids for _, prompt, new in REQUESTS]
    engine = BatchEngine(Generator.load(static_export), max_batch=4)  # 6 requests, 4 rows: two wait for a free row
    got = [None] * len(REQUESTS)

    def client(i: int) -> None:
        delay, prompt, new = REQUESTS[i]
        time.sleep(delay)
        got[i] = engine.generate(prompt, max_new_tokens=new, min_new_tokens=new).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(REQUESTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    engine.close()
    assert got == want
    assert max(engine.rows_per_step) >= 2 and max(engine.rows_per_step) <= 4  # steps really were shared, never over max_batch
    assert engine.steps_run < sum(new - 1 for _, _, new in REQUESTS)  # fewer graph calls than one request at a time
    assert engine.free_rows == 4  # every row given back


def test_an_abandoned_stream_frees_its_row(text_export_static):
    engine = BatchEngine(Generator.load(text_export_static[1]), max_batch=1)
    stream = engine.stream("Once upon", max_new_tokens=40, min_new_tokens=40)
    next(stream)
    stream.close()  # the client went away
    alone = Generator.load(text_export_static[1]).generate("abc", max_new_tokens=5).token_ids
    assert engine.generate("abc", max_new_tokens=5).token_ids == alone  # the only row was free again
    engine.close()
    with pytest.raises(KvgraphError, match="the engine is closed"):
        engine.generate("abc", max_new_tokens=5)


def test_engine_refuses_a_dynamic_export_with_the_reason(text_export):
    with pytest.raises(KvgraphError, match=r"a dynamic cache grows per row and cannot share a step; continuous batching takes static-cache"):
        BatchEngine(Generator.load(text_export[1]))


@pytest.mark.parametrize("kind", ["batch", "request"])
def test_a_request_that_waits_past_its_timeout_leaves_the_queue(kind, long_export, long_export_static):
    engine = BatchEngine(Generator.load(long_export_static), max_batch=1) if kind == "batch" else RequestEngine(
        Generator.load(long_export), max_batch=1)
    with engine:
        running = engine.stream("Once upon", max_new_tokens=4000, min_new_tokens=4000)
        next(running)  # holds the only row for longer than a second
        with pytest.raises(RequestTimeout, match=r"timed out \(0.1 s\) waiting for a free row") as raised:
            engine.generate("abc", max_new_tokens=5, timeout=0.1)
        assert raised.value.queued and engine.waiting == 0
        running.close()
        deadline = time.time() + 10
        while engine.load and time.time() < deadline:
            time.sleep(0.01)
        assert engine.generate("abc", max_new_tokens=5, timeout=30).token_ids == Generator.load(long_export).generate(
            "abc", max_new_tokens=5).token_ids
