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


def _each_alone(export) -> list[list[int]]:
    alone = Generator.load(export)
    return [alone.generate(prompt, max_new_tokens=new, min_new_tokens=new).token_ids for _, prompt, new in REQUESTS]


def _run_requests(engine: BatchEngine) -> list[list[int]]:
    """REQUESTS from one thread each, at their delays; every request's tokens, then the engine closed."""
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
    return got


def test_batched_tokens_equal_each_request_alone(static_export):
    want = _each_alone(static_export)
    engine = BatchEngine(Generator.load(static_export), max_batch=4)  # 6 requests, 4 rows: two wait for a free row
    assert _run_requests(engine) == want
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


def test_prompts_prefilled_in_chunks_give_the_same_tokens(static_export):
    """Chunks of 3 prompt tokens (the prefill graph, then the extend graph on the same one-row cache) between decode
    steps: every request's tokens are still those of Generator.generate alone."""
    want = _each_alone(static_export)
    engine = BatchEngine(Generator.load(static_export), max_batch=4, prefill_chunk=3)
    assert _run_requests(engine) == want
    assert engine.calls.count("prefill") == sum(-(-len(prompt) // 3) for _, prompt, _ in REQUESTS)
    assert engine.free_rows == 4
    with pytest.raises(KvgraphError, match="prefill_chunk must be >= 1"):
        BatchEngine(Generator.load(static_export), max_batch=1, prefill_chunk=0)


def test_a_long_prompt_does_not_stall_the_running_streams(long_export_static):
    """A 2,000-token prompt arrives while a stream runs: with chunks of 128 the running row takes decode steps between
    the prompt's chunks (without chunks it would wait for the whole prefill), and the long request's tokens equal
    Generator.generate's, which prefills it at once."""
    prompt = [3 + (i * 7) % 250 for i in range(2000)]
    engine = BatchEngine(Generator.load(long_export_static), max_batch=2, prefill_chunk=128)
    running = threading.Thread(target=engine.generate, args=([1, 60, 61],), kwargs={"max_new_tokens": 3000, "min_new_tokens": 3000})
    running.start()
    while engine.steps_run < 5:
        time.sleep(0.001)
    mine = engine.generate(prompt, max_new_tokens=8, min_new_tokens=8).token_ids
    calls = list(engine.calls)
    engine.close()
    running.join(timeout=120)
    first, last = calls.index("prefill", 1), len(calls) - 1 - calls[::-1].index("prefill")
    assert calls[first:last + 1].count("prefill") == 16  # 2,000 tokens in chunks of 128
    assert "decode" in calls[first:last]  # the running stream stepped while the prompt was prefilled
    assert mine == Generator.load(long_export_static).generate(prompt, max_new_tokens=8, min_new_tokens=8).token_ids
