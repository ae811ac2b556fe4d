"""A Generator inside someone else's service: concurrent requests, a memory budget checked up front,
Ctrl-C mid-generation, and exports that are byte-for-byte reproducible."""

from __future__ import annotations

import filecmp
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import STATIC_LENGTH
from tiny_models import tiny_model
from kvgraph.export import export_model
from kvgraph.graphs import KvgraphError
from kvgraph.runtime import GenerationInterrupted, Generator
from kvgraph.runtime.commands.main import main
from kvgraph.runtime.core.budget import cache_need

REQUESTS = ["Once upon a time", "a", "héllo wörld €", "The quick brown fox jumps over", "1 2 3 4 5 6 7 8", "x y",
            "abc" * 5, "Tell me", "zz", "Why is the sky blue? Because"]


@pytest.fixture(scope="module", params=["dynamic", "static"])
def directory(request, text_export, text_export_static):
    return (text_export if request.param == "dynamic" else text_export_static)[1]


def test_concurrent_requests_equal_sequential(directory):
    """4 threads x 10 requests on one Generator: every call owns its cache, so the tokens match one-by-one runs."""
    gen = Generator.load(directory)
    jobs = [(prompt, 6 + i % 5) for i, prompt in enumerate(REQUESTS)]
    sequential = [gen.generate(p, max_new_tokens=n).token_ids for p, n in jobs]
    assert len({tuple(t) for t in sequential}) > 5  # the requests really differ

    def worker(offset: int) -> list[list[int]]:
        order = jobs[offset:] + jobs[:offset]  # each thread in its own order, so different requests overlap
        tokens = [gen.generate(p, max_new_tokens=n).token_ids for p, n in order]
        return tokens[len(jobs) - offset:] + tokens[: len(jobs) - offset]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(worker, [0, 3, 5, 8]))
    assert all(result == sequential for result in results)
    batched = [r.token_ids for r in gen.generate([p for p, _ in jobs[:4]], max_new_tokens=6)]
    with ThreadPoolExecutor(max_workers=4) as pool:  # batches in parallel too
        assert list(pool.map(lambda _: [r.token_ids for r in gen.generate([p for p, _ in jobs[:4]], max_new_tokens=6)], range(4))) == [batched] * 4


def test_cache_budget_is_checked_before_running(directory, monkeypatch):
    gen = Generator.load(directory)
    contract = gen.graphs.contract
    prompts = [gen.codec.encode("Once upon a time"), gen.codec.encode("a")]
    need, how = cache_need(contract, [len(p) for p in prompts], 10)
    positions = contract.max_length if contract.static else len(prompts[0]) + 10
    copies = 1 if contract.static else 2
    assert need == copies * 2 * positions * contract.num_layers * 2 * contract.num_kv_heads * contract.head_dim * 4
    assert f"2 rows x {positions} positions x {contract.num_layers} layers x 2 x {contract.num_kv_heads} KV heads" in how

    tight = Generator.load(directory, max_cache_bytes=need - 1)
    ran = []
    monkeypatch.setattr("kvgraph.runtime.core.steppers.prefill", lambda *a, **k: ran.append(1))
    with pytest.raises(KvgraphError, match=rf"this request needs {need / 1e3:.2f} kB of KV cache \(2 rows x {positions} positions.*"
                                           rf"over the cache budget of {(need - 1) / 1e3:.2f} kB"):
        tight.generate(prompts, max_new_tokens=10)
    assert ran == []  # refused before any graph ran
    monkeypatch.undo()
    assert len(Generator.load(directory, max_cache_bytes=need).generate(prompts, max_new_tokens=10)) == 2
    assert Generator.load(directory).max_cache_bytes > 10**8  # default: half of physical memory
    assert Generator.load(directory, max_cache_bytes=None).max_cache_bytes is None


def test_cache_budget_from_the_command_line(text_export, capsys):
    directory = str(text_export[1])
    assert main(["inspect", directory]) == 0  # what a budget is made of: 2 layers x (key, value) x 2 KV heads x 16 x 4 bytes
    assert "cache 512 bytes per token per row" in capsys.readouterr().out
    assert main(["generate", directory, "--prompt", "Once upon a time", "--max-cache-memory", "1kB"]) == 1
    err = capsys.readouterr().err
    assert "KV cache" in err and "over the cache budget of 1.00 kB" in err and "--max-cache-memory" in err
    assert main(["generate", directory, "--prompt", "hi", "--max-new-tokens", "2", "--max-cache-memory", "1.5MiB"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", directory, "--prompt", "hi", "--max-cache-memory", "lots"])
    assert exit_info.value.code == 2 and "not a size: 'lots'" in capsys.readouterr().err


def _interrupt_at_decode_step(monkeypatch, step: int) -> None:
    """Raise KeyboardInterrupt (what SIGINT raises) as the given decode step starts."""
    from kvgraph.runtime.core import steppers

    real, calls = steppers.decode_one, []

    def decode_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(steppers, "decode_one", decode_one)  # where the generator's stepper calls it


def test_ctrl_c_during_generate_keeps_what_was_generated(directory, monkeypatch, capsys):
    gen = Generator.load(directory)
    full = gen.generate(["Once upon a time", "a"], max_new_tokens=12)
    _interrupt_at_decode_step(monkeypatch, 5)
    with pytest.raises(GenerationInterrupted) as info:
        gen.generate(["Once upon a time", "a"], max_new_tokens=12)
    partial = info.value.results
    assert [r.token_ids for r in partial] == [r.token_ids[:5] for r in full]  # prefill's token + 4 decode steps
    assert [r.finish_reason for r in partial] == ["interrupted", "interrupted"]
    assert partial[0].text == gen.codec.decode(full[0].token_ids[:5]) and partial[0].text

    _interrupt_at_decode_step(monkeypatch, 5)
    assert main(["generate", str(directory), "--prompt", "Once upon a time", "--max-new-tokens", "12"]) == 130
    captured = capsys.readouterr()
    assert captured.out == partial[0].text + "\n" and "[interrupted]" in captured.err and "interrupted" in captured.err.splitlines()[-1]

    _interrupt_at_decode_step(monkeypatch, 5)
    assert main(["generate", str(directory), "--prompt", "Once upon a time", "--max-new-tokens", "12", "--stream"]) == 130
    assert capsys.readouterr().out == partial[0].text + "\n"  # streamed pieces plus what was held back


def test_exports_are_reproducible_byte_for_byte(export_cache, tmp_path):
    first = export_cache("llama", "static")  # the suite's own export of the same model (same seed, same options)
    second = export_model(tiny_model("llama"), tmp_path / "again", cache="static", max_length=STATIC_LENGTH)
    names = sorted(p.name for p in first.directory.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir()) and "kvgraph.json" in names
    _, mismatch, errors = filecmp.cmpfiles(first.directory, tmp_path / "again", names, shallow=False)
    assert mismatch == [] and errors == [], f"differ between two exports of the same model: {mismatch}"
    assert first.manifest == second.manifest
