"""The `kvgraph` command: parses, then dispatches to the module that owns each subcommand.

The subcommands are not listed here: each package registers its own in pyproject.toml, the
package's top (entry points `kvgraph.commands`: export from the export package, inspect from
graphs, generate / vectors / bench from the runtime). So the runtime neither names nor imports the
export package; `kvgraph inspect` and `generate` work without the export extra, and
parsing never imports torch (each command module imports its heavy parts when it runs).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from importlib.metadata import entry_points

GROUP = "kvgraph.commands"
ORDER = ("export", "quantize", "inspect", "generate", "vectors", "bench", "serve", "web")  # help order; commands registered by others follow


def commands() -> dict:
    """Subcommand name -> its loaded module (add_arguments, run, HELP), from the installed entry points."""
    found = {point.name: point for point in entry_points(group=GROUP)}
    if not found:
        raise SystemExit("kvgraph: no subcommands are registered; install the package (pip install -e .)")
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return {name: found[name].load() for name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvgraph", description="Prefill + decode ONNX graphs with an explicit KV cache.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in commands().items():
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        sub.set_defaults(module=module)
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C while the subcommands' modules load is an interrupt too, not a traceback
        args = build_parser().parse_args(argv)
        from kvgraph.graphs.errors import KvgraphError
    except KeyboardInterrupt:
        print("kvgraph: interrupted", file=sys.stderr)
        return 130

    try:
        return args.module.run(args)
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
