"""The step adapters (graphs/modes.py): what each cache mode and graph kind feeds a step, by hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from kvgraph.graphs import GraphContract, KvgraphError
from kvgraph.graphs.modes import step_adapter

DYNAMIC = GraphContract(2, 2, 4, 100)
STATIC = GraphContract(2, 2, 4, 100, cache="static", max_length=16)
SEQ2SEQ_STATIC = GraphContract(2, 2, 4, 100, cache="static", max_length=16, kind="encoder-decoder", hidden_size=8)


def test_dynamic_decode_feeds_the_grown_mask_and_the_count_of_real_tokens():
    steps = step_adapter(DYNAMIC)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left-padded by 2, then the new token
    host = steps.host_feeds("decode", np.array([[7], [8]]), mask, written=4)
    assert sorted(host) == ["attention_mask", "input_ids", "position_ids"]
    assert host["position_ids"].tolist() == [[2], [4]]  # real tokens before the new one
    assert host["attention_mask"] is mask
    assert steps.graph("decode") == "decode" and steps.graph("extend") == "extend"
    assert steps.device_outputs("decode") == DYNAMIC.present_names()


def test_a_mask_of_the_wrong_width_is_named():
    with pytest.raises(ValueError, match=r"1 new tokens after 4 cached positions expects attention_mask of shape \(1, 5\), got \(1, 4\)"):
        step_adapter(DYNAMIC).host_feeds("decode", np.array([[7]]), np.ones((1, 4), dtype=np.int64), written=4)


def test_static_extend_is_prefill_at_the_write_index_over_zeroed_buffers():
    steps = step_adapter(STATIC)
    assert steps.graph("extend") == "prefill" and steps.graph("decode") == "decode"
    host = steps.host_feeds("extend", np.array([[5, 6]]), np.ones((1, 5), dtype=np.int64), written=3)
    assert host["write_indices"].tolist() == [3]
    assert host["attention_mask"].tolist() == [[1] * 5 + [0] * 11]  # (B, N): unwritten positions are 0
    assert host["position_ids"].tolist() == [[3, 4]]
    past = [np.full((1, 2, 3, 4), 2.0, dtype=np.float32) for _ in STATIC.cache_slots()]
    buffers = steps.cache_feeds(past, batch=1)
    assert list(buffers) == STATIC.past_names()
    for buffer in buffers.values():
        assert buffer.shape == (1, 2, 16, 4) and (buffer[:, :, :3] == 2).all() and not buffer[:, :, 3:].any()
    assert steps.device_outputs("prefill") == []  # the presents are the buffers, bound as inputs and outputs


def test_static_room_is_refused_with_the_numbers():
    with pytest.raises(KvgraphError, match="the static cache holds 16 positions; 15 are used and 2 more do not fit"):
        step_adapter(STATIC).host_feeds("extend", np.array([[5, 6]]), np.ones((1, 17), dtype=np.int64), written=15)


def test_encoder_decoder_feeds_the_source_mask_and_keeps_cross_kv_from_prefill_only():
    steps = step_adapter(SEQ2SEQ_STATIC)
    source_mask = np.array([[1, 1, 1, 0]])  # right-padded source
    host = steps.host_feeds("decode", np.array([[9]]), source_mask, written=2)
    assert sorted(host) == ["encoder_attention_mask", "input_ids", "write_indices"]
    assert host["encoder_attention_mask"] is source_mask and host["write_indices"].tolist() == [2]
    assert steps.device_outputs("prefill") == SEQ2SEQ_STATIC.cross_names() and steps.device_outputs("decode") == []
    need = steps.kind.positions(prompt=4, new=10)
    assert (need.decoder, need.source) == (11, 4)  # the start token + 10 decoder positions; the source is the encoder's


def test_run_feeds_a_graph_in_its_declared_order_and_cuts_presents_to_their_valid_prefix():
    steps = step_adapter(STATIC)
    seen = {}

    def runner(graph, feeds):
        seen[graph] = list(feeds)
        return {"logits": np.zeros((1, 1, 100), dtype=np.float32),
                **{name: np.ones((1, 2, 16, 4), dtype=np.float32) for name in STATIC.present_names()}}

    _, outputs = steps.run(runner, "prefill", np.array([[1, 2, 3]]), np.ones((1, 3), dtype=np.int64), [])
    assert seen["prefill"] == [spec.name for spec in STATIC.graphs()["prefill"][0]]
    assert all(outputs[name].shape == (1, 2, 3, 4) for name in STATIC.present_names())
