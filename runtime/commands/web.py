"""`kvgraph web EXPORT`: the example web page (examples/web) and an export, served on 127.0.0.1 by
runtime/serving/page_server.py; the model runs in the browser."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from kvgraph.graphs.errors import KvgraphError
from kvgraph.graphs.manifest import MANIFEST_NAME
from kvgraph.runtime.serving.page_server import EXAMPLES, PageServer, check_page

HELP = "serve the example web page and an export on 127.0.0.1: the model runs in the browser (onnxruntime-web)"  # registered in pyproject.toml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="an export directory (from kvgraph export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--vectors", default=None, help="golden vectors (kvgraph vectors) to serve at /vectors/ for the page to check")
    parser.add_argument("--page", default=str(EXAMPLES), help="the examples directory holding web/ and js/ (default: this checkout's)")


def run(args: argparse.Namespace) -> int:
    directory, page = Path(args.directory), Path(args.page)
    if not (directory / MANIFEST_NAME).is_file():
        raise KvgraphError(f"{directory}: no {MANIFEST_NAME} here; is it a kvgraph export directory?")
    if not 0 <= args.port <= 65535:
        raise KvgraphError(f"--port must be in [0, 65535], got {args.port}")
    check_page(page)
    mounts = {"/export/": directory}
    if args.vectors is not None:
        if not (Path(args.vectors) / "vectors.json").is_file():
            raise KvgraphError(f"{args.vectors}: no vectors.json here; make them with `kvgraph vectors EXPORT {args.vectors}`")
        mounts["/vectors/"] = Path(args.vectors)
    try:
        server = PageServer(mounts, args.host, args.port, page)
    except OSError as exc:
        raise KvgraphError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    query = "export=/export/" + ("&vectors=/vectors/" if args.vectors is not None else "")
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (a background job)
        signal.signal(signum, _stop)
    print(f"open {server.url}/web/?{query}  (Ctrl-C stops)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.httpd.server_close()
    return 0


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt
