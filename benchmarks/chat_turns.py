"""How much a kept cache saves on a follow-up chat turn.

    python benchmarks/chat_turns.py EXPORT_DIR [--repeats 5]

Turn 1 asks a question; turn 2 asks a follow-up. With the conversation's cache, turn 2 runs only
its new tokens through the graphs; without it, the whole rendered conversation is prefilled again.
Prints tokens processed before the first new token and the time to that token (median of repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from kvgraph.runtime import Generator

TURNS = ("What is the capital of France?", "And what is it famous for? Answer in one sentence.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    generator = Generator.load(args.directory)
    kept, fresh, kept_tokens, fresh_tokens = [], [], 0, 0
    for _ in range(args.repeats):  # alternate the two ways, so machine noise hits both alike
        conversation = generator.chat()
        first = conversation.send(TURNS[0], max_new_tokens=args.max_new_tokens)
        second = conversation.send(TURNS[1], max_new_tokens=args.max_new_tokens)
        kept.append(second.stats.prefill_ms)
        kept_tokens = conversation.processed_tokens[1]
        messages = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": first.text},
                    {"role": "user", "content": TURNS[1]}]
        ids = generator.codec.encode_chat(messages)
        again = generator.generate(ids, max_new_tokens=args.max_new_tokens)
        assert again.token_ids == second.token_ids, "continuation must equal one-shot generation"
        fresh.append(again.stats.prefill_ms)
        fresh_tokens = len(ids)
    print("| turn 2, before the first new token | tokens run | time (median ms) |")
    print("|---|---|---|")
    print(f"| conversation cache kept | {kept_tokens} | {statistics.median(kept):.1f} |")
    print(f"| whole conversation prefilled again | {fresh_tokens} | {statistics.median(fresh):.1f} |")
    print(f"\nsaving: {1 - kept_tokens / fresh_tokens:.0%} of the tokens, "
          f"time ratio {statistics.median(fresh) / statistics.median(kept):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
