"""The `kvgraph` command: parses, then dispatches to the module that owns each subcommand.

Subcommand modules are named, not imported, so `kvgraph inspect` works without the export
extra installed and the runtime never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

COMMANDS = {
    "export": ("kvgraph.export.cli", "export a Hugging Face causal LM to prefill + decode ONNX graphs"),
    "inspect": ("kvgraph.graphs.inspect", "show what an export directory holds"),
    "generate": ("kvgraph.runtime.generate_cli", "generate text from an export directory with onnxruntime"),
    "vectors": ("kvgraph.runtime.vectors_cli", "write golden vectors for an export (every step's inputs and expected outputs), or --check them"),
    "bench": ("kvgraph.runtime.bench", "measure prefill, decode speed, step latency, memory and driver overhead"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvgraph", description="Prefill + decode ONNX graphs with an explicit KV cache.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        _load(module).add_arguments(sub)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C while the subcommands' modules load is an interrupt too, not a traceback
        args = build_parser().parse_args(argv)
        from kvgraph.graphs.errors import KvgraphError
    except KeyboardInterrupt:
        print("kvgraph: interrupted", file=sys.stderr)
        return 130

    try:
        return _load(args.module).run(args)
    except KvgraphError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"kvgraph {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kvgraph {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
