"""Export at a real size: a random-init model of Qwen2.5-0.5B's exact shape (494 M parameters, 1.98 GB in fp32),
saved as a Hugging Face directory and exported from that path as a user would (the export loads it, holds the
weights once and frees them before validating). Its greedy tokens must equal transformers' generate.

Slow (about two minutes): the 1B-shaped figures are benchmarks/export_scale.py's, not a test's.
"""

from __future__ import annotations

import pytest
import torch

from kvgraph.export import export_model
from kvgraph.runtime import Generator

pytestmark = pytest.mark.slow

QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
                  initializer_range=0.05)  # wider than 0.02 so that the top two logits are not a numeric tie
PARAMETERS = 494_032_768  # Qwen2.5-0.5B's card: 0.49 B
PROMPTS = [[151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198], [9707, 11, 1879, 0, 358, 1079]]
NEW_TOKENS = 8


def test_qwen25_05b_shape_exports_from_its_directory_and_generates_like_transformers(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN25_05B)).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    model.save_pretrained(tmp_path / "hf")
    result = export_model(str(tmp_path / "hf"), tmp_path / "onnx")
    assert result.manifest.validation["passed"]
    weights = (tmp_path / "onnx" / "model.onnx.data").stat().st_size
    assert weights <= 4 * PARAMETERS * 1.01  # the tied embedding once
    ours = [r.token_ids for r in Generator.load(tmp_path / "onnx").generate(PROMPTS, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)]
    with torch.no_grad():
        theirs = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=151643)[0, len(p):].tolist()
                  for p in PROMPTS]
    assert ours == theirs
    assert ours[0] != ours[1]  # the prompts lead to different tokens: the comparison has teeth
