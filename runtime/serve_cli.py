"""`kvgraph serve EXPORT`: the OpenAI-compatible server (runtime/server.py) on 127.0.0.1, over continuous batching."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "serve a static-cache export over HTTP with the OpenAI API (continuous batching)"  # registered in pyproject.toml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a decoder-only export with a static cache (kvgraph export --cache static)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row; beyond, 429 (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the export directory's name)")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as exc:
        print(f"kvgraph serve needs the serve extra (pip install 'kvgraph[serve]'): {exc}", file=sys.stderr)
        return 2
    from ..graphs import KvgraphError
    from .engine import BatchEngine
    from .generator import Generator
    from .server import create_app

    if args.max_queue < 0:
        raise KvgraphError(f"--max-queue must be >= 0, got {args.max_queue}")
    engine = BatchEngine(Generator.load(args.directory, threads=args.threads), max_batch=args.max_batch)
    app = create_app(engine, args.model_name or Path(args.directory).resolve().name, args.max_queue)
    try:  # Ctrl-C or SIGTERM: uvicorn stops accepting and lets running requests finish (up to 30 s)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    finally:
        engine.close()
    return 0
