"""What lets a quantized export hold less than the float weights: the relaid linear weights live in a scratch file
(export/layout.py), and a module's file pages leave the process once it has run (export/reference.py). Both leave
every value of the model as it was. Linux only (the resident set is read from /proc)."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from kvgraph.export import memory
from kvgraph.export.layout import linear_weights, transposed_storage
from kvgraph.export.reference import pages_dropped_after_use

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def _model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)  # 4 layers of 512 x 2048: about 70 MB of linear weights
    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


def _file_resident() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssFile:")).split()[1]) * 1024


def test_scratch_layout_keeps_values_and_puts_the_weights_in_a_file(tmp_path):
    model = _model()
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        before = model(ids).logits
        values = [w.clone() for w in linear_weights(model)]
        with transposed_storage(model, restore=True, scratch=tmp_path) as weights:
            assert all(memory.file_backed(w.data_ptr()) for w in weights)  # the scratch file's pages, not the process's own
            assert all(w.stride() == (1, w.shape[0]) for w in weights)  # stored (in, out)
            assert all(torch.equal(w, v) for w, v in zip(weights, values))  # every value as it was
            torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)  # another summation order only
        assert all(w.is_contiguous() and not memory.file_backed(w.data_ptr()) for w in linear_weights(model))  # laid back
        assert all(torch.equal(w, v) for w, v in zip(linear_weights(model), values))
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_pages_of_a_module_leave_memory_once_it_has_run(tmp_path):
    model = _model()
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    weights_bytes = sum(w.numel() * w.element_size() for w in linear_weights(model))
    with torch.no_grad(), transposed_storage(model, restore=False, scratch=tmp_path):
        start = _file_resident()
        plain = model(ids).logits  # reads every weight: their pages come back into the process
        grown = _file_resident() - start
        for w in linear_weights(model):
            memory.drop_file_pages(w.data_ptr(), w.numel() * w.element_size())
        start = _file_resident()
        with pages_dropped_after_use(model):
            dropped = model(ids).logits
        kept = _file_resident() - start
    torch.testing.assert_close(dropped, plain, rtol=0, atol=0)
    assert grown > 0.9 * weights_bytes, (grown, weights_bytes)
    assert kept < 0.1 * weights_bytes, (kept, weights_bytes)


def test_laid_out_weights_stream_into_the_weights_file_once_each(tmp_path):
    from kvgraph.export.stream import WeightStream
    from kvgraph.graphs.weight_store import WeightStore, content_key

    model = _model()
    store = WeightStore()
    with torch.no_grad(), transposed_storage(model, restore=True) as weights, WeightStream(tmp_path / "w.data", weights + weights[:1], store) as stream:
        file = stream.join()
        size = file.close()
        assert len(file.tensors) == len(weights) == len(store.known)  # the repeated one written once
        data = (tmp_path / "w.data").read_bytes()
        assert size == len(data)
        for weight in weights:
            stored = weight.t().contiguous().numpy()  # (in, out): what the graph stores
            key = content_key(1, stored.shape, stored.reshape(-1).view(np.uint8))
            entry = file.tensors[file.slots[key]]
            assert entry["offset"] % 64 == 0 and entry["shape"] == list(stored.shape)
            assert data[entry["offset"]: entry["offset"] + entry["length"]] == stored.tobytes()
            assert store.put(weight.t().numpy(), 1) == key  # the graphs' own pass gets the same key (from the stream's record)
        held = weakref.ref(store)
        del store  # as the export does once the graphs are written: the store's blobs (views of the weights) must go with it
        assert held() is None, "the stream still holds the weight store (and through it every weight)"
