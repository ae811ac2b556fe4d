"""Decode step time of a mixture-of-experts export against a dense export of the same active size.

    python benchmarks/moe_step.py [--rounds 5] [--new-tokens 64]

Two random-init models, built from configs (nothing downloaded), exported with kvgraph (dynamic
cache, validated against PyTorch):

- moe:   Mixtral layout, hidden 512, 4 layers, 8 query / 2 KV heads, 8 experts of intermediate 1024, top-2;
- dense: the same model with one MLP of intermediate 2048 (= 2 active experts) per layer: the same
         active parameters per token; the MoE stores 4x the MLP weights.

Each round runs both exports' greedy decode (prompt 32 tokens) in turn in this process, two threads;
the table gives the median decode step time and the ratio. An ideal MoE costs the dense model's step
(same active weights read) plus its routing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

SHARED = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              max_position_embeddings=4096, tie_word_embeddings=False)
MODELS = {
    "moe (8 experts x 1024, top-2)": ("mixtral", dict(SHARED, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2)),
    "dense (intermediate 2048)": ("mistral", dict(SHARED, intermediate_size=2048, sliding_window=None)),
}


def export(model_type: str, config: dict, out: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvgraph.export import export_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()
    export_model(model, out)
    return sum(p.numel() for p in model.parameters())


def step_ms(generator, new_tokens: int) -> float:
    result = generator.generate(list(range(3, 35)), new_tokens, min_new_tokens=new_tokens)
    assert len(result.token_ids) == new_tokens
    return 1000 / result.stats.decode_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    from kvgraph.runtime import Generator

    with tempfile.TemporaryDirectory() as tmp:
        parameters, generators = {}, {}
        for name, (model_type, config) in MODELS.items():
            parameters[name] = export(model_type, config, Path(tmp) / model_type)
            generators[name] = Generator.load(Path(tmp) / model_type, threads=2)
        times = {name: [] for name in MODELS}
        for name, generator in generators.items():
            step_ms(generator, 8)  # warm-up
        for _ in range(args.rounds):
            for name, generator in generators.items():
                times[name].append(step_ms(generator, args.new_tokens))
    dense = statistics.median(times["dense (intermediate 2048)"])
    print("| model | parameters | decode step (median of %d) | vs dense |" % args.rounds)
    print("|---|---|---|---|")
    for name in MODELS:
        median = statistics.median(times[name])
        print(f"| {name} | {parameters[name] / 1e6:.1f} M | {median:.2f} ms | {median / dense:.2f}x |")


if __name__ == "__main__":
    main()
